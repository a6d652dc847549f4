"""The study manifest: key, schema round trip, atomic save, state history, inter-process locking."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.store.manifest import (
    Manifest,
    Note,
    load_manifest,
    manifest_path,
    save_manifest,
    set_state,
    study_key,
    update_manifest,
)


def _manifest() -> Manifest:
    key = study_key("1.2.3", "1.2.3.9")
    return Manifest(study_key=key, study_instance_uid="1.2.3", frame_of_reference_uid="1.2.3.9")


def test_study_key_is_pinned() -> None:
    assert study_key("1.2.3", "4.5.6") == hashlib.sha256(b"1.2.3/4.5.6").hexdigest()[:16]
    assert study_key("1.2.3", "4.5.6") != study_key("1.2.3", "4.5.7")
    assert manifest_path(Path("/d"), "abc") == Path("/d/studies/abc/manifest.json")


def test_round_trip_and_schema_field(tmp_path: Path) -> None:
    m = _manifest()
    set_state(m, "collecting")
    path = manifest_path(tmp_path, m.study_key)
    save_manifest(m, path)
    raw = json.loads(path.read_text())
    assert raw["schema"] == 1 and raw["state"] == "collecting" and raw["reason"] is None
    for k in ("phases", "references", "geometry", "identifiers", "history", "task_id", "results"):
        assert k in raw
    assert load_manifest(path) == m
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]  # no temp file left behind


def test_unknown_fields_survive(tmp_path: Path) -> None:
    """A newer writer's extra fields are kept by an older reader that rewrites the manifest."""
    path = manifest_path(tmp_path, "k")
    data = json.loads(_manifest().to_json())
    data["future_field"] = {"x": 1}
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    update_manifest(path, lambda m: set_state(m, "held", "why"))
    assert json.loads(path.read_text())["future_field"] == {"x": 1}


def test_set_state_appends_history() -> None:
    m = _manifest()
    set_state(m, "collecting")
    set_state(m, "held", "2 series claim phase 50%")
    set_state(m, "collecting", "new instances after hold; re-assessing")
    assert [h.state for h in m.history] == ["collecting", "held", "collecting"]
    assert m.reason == "new instances after hold; re-assessing"
    assert m.updated_at == m.history[-1].at
    with pytest.raises(ValueError):
        set_state(m, "finished")


def test_invalid_state_rejected_on_load(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    data = json.loads(_manifest().to_json())
    data["state"] = "bogus"
    path.write_text(json.dumps(data))
    with pytest.raises(ValidationError):
        load_manifest(path)


def _append_notes(path: str, who: int, n: int) -> None:
    for i in range(n):
        update_manifest(Path(path), lambda m, i=i: m.notes.append(Note(at="t", text=f"{who}:{i}")))  # type: ignore[misc]


def test_update_is_serialised_across_processes(tmp_path: Path) -> None:
    path = manifest_path(tmp_path, "k")
    save_manifest(_manifest(), path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_notes, args=(str(path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    texts = sorted(n.text for n in load_manifest(path).notes)
    assert texts == sorted(f"{w}:{i}" for w in range(4) for i in range(15))  # no lost update

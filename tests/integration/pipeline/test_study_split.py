"""A study split into phase groups (worker.study_split) gives the unsplit result byte for byte, on the phantom
with the tiny random SAM 3 (every score kept, so it paints masks): groups run in any order, a group run
twice computes nothing the second time, a group that never ran or a damaged mask file is computed by the
finishing task, and a task of a superseded run does nothing. The chord itself, with two real Celery
workers, is in tests/e2e/test_split_workers.py."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from service.dicomio import rtstruct
from service.ops.status import format_detail, study_detail
from service.store.layout import DataLayout
from service.store.manifest import load_manifest, manifest_path
from tests.support.tiny_runs import FixedNow, tiny_config
from worker.engine_settings import EngineConfig, LoadedSegmenter
from worker.pipeline import process_study
from worker.split_plan import Split, plan_groups
from worker.study_split import SUPERSEDED, finish_study, segment_group

pytestmark = pytest.mark.timeout(300)








def _results(data_dir: Path, key: str) -> dict[str, bytes]:
    m = load_manifest(manifest_path(data_dir, key))
    assert m.state == "done", m.reason
    # the RTSTRUCT(s); the QA report states the timings, which differ between runs
    names = [Path(f).name for f in m.results["files"]]
    rs = {n: (data_dir / f).read_bytes() for n, f in zip(names, m.results["files"], strict=True)
          if n.startswith("RS")}
    assert rs
    return rs


def _start_split(data_dir: Path, key: str, config: EngineConfig, tiny: LoadedSegmenter,
                 n_groups: int) -> tuple[str, list[list[int]]]:
    sent: list[tuple[str, str, list[list[int]]]] = []
    out = process_study(key, data_dir, config, tiny, [], task_id="coordinator-1",
                        split=Split(n_groups, lambda *a: sent.append(a)))
    assert out.state == "processing" and not out.files
    ((skey, run, groups),) = sent
    m = load_manifest(manifest_path(data_dir, key))
    assert skey == key and m.state == "processing" and m.results["split"] == {"run": run, "groups": groups}
    return run, groups


@pytest.fixture
def unsplit(assembled: tuple[Path, str, Any], tiny: LoadedSegmenter, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str, dict[str, bytes]]:
    """A copy of the assembled study to split, and the unsplit run's result files (creation time fixed)."""
    data_dir, key, _ = assembled
    monkeypatch.setattr(rtstruct, "datetime", FixedNow)
    copy = tmp_path / "split"
    shutil.copytree(data_dir, copy)
    out = process_study(key, data_dir, tiny_config(), tiny, [], task_id="unsplit")
    assert out.state == "done"
    return copy, key, _results(data_dir, key)


def test_plan_groups_is_contiguous_and_balanced() -> None:
    assert plan_groups(10, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert plan_groups(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert plan_groups(3, 8) == [[0], [1], [2]]
    assert plan_groups(4, 1) == [[0, 1, 2, 3]]
    assert Split(1, lambda *a: None).groups(10) is None and Split(4, lambda *a: None).groups(1) is None
    with pytest.raises(ValueError):
        plan_groups(0, 2)


def test_split_equals_unsplit_in_any_order_and_redelivery_is_free(
        unsplit: tuple[Path, str, dict[str, bytes]], tiny: LoadedSegmenter) -> None:
    data_dir, key, expected = unsplit
    config = tiny_config()
    run, groups = _start_split(data_dir, key, config, tiny, 2)
    assert groups == [[0, 1], [2, 3]]
    records = [segment_group(key, data_dir, config, lambda: tiny, run, g) for g in reversed(groups)]
    assert [r["computed"] for r in records] == [[2, 3], [0, 1]]
    assert all(r["busy"]["segmenter"] > 0 for r in records)
    again = segment_group(key, data_dir, config, lambda: tiny, run, groups[0])  # a re-delivered group
    assert again["computed"] == [] and again["masks_key"] == records[0]["masks_key"]
    stale = segment_group(key, data_dir, config, lambda: tiny, "another-run", groups[0])
    assert stale["skipped"] == SUPERSEDED

    out = finish_study(key, data_dir, config, tiny, [], run, records, task_id="finish-1")
    assert out.state == "done"
    assert _results(data_dir, key) == expected  # byte-identical RTSTRUCT
    m = load_manifest(manifest_path(data_dir, key))
    assert len(m.results["split"]["done"]) == 2 and m.results["split"]["computed_here"] == []
    assert m.results["timings"]["segmenter"] == pytest.approx(sum(r["busy"]["segmenter"] for r in records),
                                                              abs=1e-3)
    assert "finish-1" in m.results["task_ids"]
    text = format_detail(study_detail(data_dir, key))  # itvnode status KEY
    assert "split into 2 phase groups" in text and "phases [0, 1]: ? " in text
    assert not DataLayout(data_dir).phase_masks(key).exists()  # intermediate files removed
    # the finishing task delivered twice: the study is no longer in that run, nothing happens
    assert finish_study(key, data_dir, config, tiny, [], run, records).reason == SUPERSEDED


def test_finish_computes_lost_groups_and_damaged_files(
        unsplit: tuple[Path, str, dict[str, bytes]], tiny: LoadedSegmenter) -> None:
    data_dir, key, expected = unsplit
    config = tiny_config()
    run, groups = _start_split(data_dir, key, config, tiny, 4)
    assert groups == [[0], [1], [2], [3]]
    records = [segment_group(key, data_dir, config, lambda: tiny, run, g) for g in groups[:3]]  # 3 lost
    store = DataLayout(data_dir).phase_masks(key) / records[0]["masks_key"]
    damaged = store / "phase_001.npz"
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])  # e.g. a power cut after the rename, before the data
    out = finish_study(key, data_dir, config, tiny, [], run, records)
    assert out.state == "done"
    assert _results(data_dir, key) == expected
    assert load_manifest(manifest_path(data_dir, key)).results["split"]["computed_here"] == [1, 3]


def test_a_group_that_keeps_dying_fails_the_study_instead_of_looping(
        unsplit: tuple[Path, str, dict[str, bytes]], tiny: LoadedSegmenter) -> None:
    """A re-delivered task (its process died, acks_late) starts again; after MAX_INTERRUPTED starts of one
    group in one run the study is failed with the reason, as an unsplit study is."""
    from worker.pipeline import MAX_INTERRUPTED

    data_dir, key, _ = unsplit
    config = tiny_config()
    run, groups = _start_split(data_dir, key, config, tiny, 2)
    for _ in range(MAX_INTERRUPTED):
        assert "skipped" not in segment_group(key, data_dir, config, lambda: tiny, run, groups[0])
    last = segment_group(key, data_dir, config, lambda: tiny, run, groups[0])
    assert "started 4 times" in last["skipped"]
    m = load_manifest(manifest_path(data_dir, key))
    assert m.state == "failed" and "phase group [0, 1] was started 4 times" in (m.reason or "")
    assert m.results["split"]["starts"] == {"phases 0-1": 4}
    assert segment_group(key, data_dir, config, lambda: tiny, run, groups[1])["skipped"] == SUPERSEDED

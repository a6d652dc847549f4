"""``itvnode status`` on a data_dir the assembler filled (run as a subprocess, like a site script would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from assembly_helpers import SMALL, all_files, ingest, make_assembler, rewrite_series

from service.intake.queue import Enqueuer
from service.store.manifest import study_key
from service.store.spool import Spool

Factory = Callable[..., Any]


def itvnode(data_dir: Path, *args: str, quiet: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ITVNODE_DATA_DIR=str(data_dir), ITVNODE_QUIET_PERIOD=str(quiet))
    env.pop("ITVNODE_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "itvnode.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[3])


def test_status_json_and_table(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                               embedded: Enqueuer, tmp_path: Path) -> None:
    ok = phantom_dicom_factory("siemens", with_avg=True, uid_seed="status-ok", **SMALL)
    dup = phantom_dicom_factory("philips", uid_seed="status-dup", **SMALL)
    plain = phantom_dicom_factory("siemens", with_extra_ct="other-for", uid_seed="status-plain", **SMALL)
    copy = rewrite_series(dup.by_percent(0.0).files, tmp_path / "dup", new_series=True)
    ingest(spool, all_files(ok) + all_files(dup) + copy + plain.extra[0].files)
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0)
    last = max(spool.last_received(s.study_instance_uid) or 0 for s in (ok, dup, plain))
    asm.poll_once(last + 31)

    res = itvnode(data_dir, "status", "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["study_instance_uid"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {ok.study_instance_uid, dup.study_instance_uid, plain.study_instance_uid}

    r = rows[ok.study_instance_uid]
    assert r["state"] == "queued" and r["reason"] is None
    assert r["study_key"] == study_key(ok.study_instance_uid, ok.frame_of_reference_uid)
    assert r["phases"] == [{"percent": s.percent, "series_instance_uid": s.series_instance_uid, "slices": 12}
                           for s in ok.phases]
    assert [x["kind"] for x in r["references"]] == ["AVG"]
    assert r["task_id"] and r["updated"]

    r = rows[dup.study_instance_uid]
    assert r["state"] == "held" and "2 series claim phase 0%" in r["reason"]

    r = rows[plain.study_instance_uid]  # a plain CT just received: no manifest, shown from the spool index
    assert r["state"] == "receiving" and r["phases"] == [] and r["study_key"] is None

    res = itvnode(data_dir, "status", "--json", quiet=0.0)
    rows = {r["study_instance_uid"]: r for r in json.loads(res.stdout)}
    assert rows[plain.study_instance_uid]["state"] == "ignored"
    assert "not a 4DCT" in rows[plain.study_instance_uid]["reason"]

    res = itvnode(data_dir, "status")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["STUDY", "KEY", "STATE"]
    assert any("queued" in ln and "0,25,50,75" in ln and ok.study_instance_uid in ln for ln in lines)
    assert any(ln.strip().startswith("reason: 2 series claim phase 0%") for ln in lines)
    assert "PHANTOM^4DCT" not in res.stdout and ok.patient_id not in res.stdout  # no patient identifiers


def test_status_empty_data_dir(tmp_path: Path) -> None:
    res = itvnode(tmp_path / "nothing", "status", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []
    assert not (tmp_path / "nothing").exists()  # reading status creates nothing

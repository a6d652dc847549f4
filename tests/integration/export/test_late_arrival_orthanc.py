"""A late phase (or a late AVG) after ``done`` is a new result version with new UIDs, delivered to Orthanc.

Regression (issue 9, item 2): the second job used to send different content under the first RTSTRUCT's SOP
Instance UID; Orthanc kept the stale first copy while the node said ``done``. Here the node's own pieces run
for real (spool, assembler, embedded broker, a real Celery worker running ``itvnode.segment_study`` and
``itvnode.export_item``, C-STORE) against a real Orthanc.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from service.store.manifest import iter_manifests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _rtstructs(orthanc: Any, study_uid: str) -> dict[str, pydicom.Dataset]:
    """SOP Instance UID -> dataset of every RTSTRUCT Orthanc holds for ``study_uid``."""
    found = orthanc.post("/tools/find", json.dumps(
        {"Level": "Instance", "Query": {"Modality": "RTSTRUCT", "StudyInstanceUID": study_uid}}))
    out = {}
    for instance_id in found:
        ds = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{instance_id}/file")))
        out[str(ds.SOPInstanceUID)] = ds
    return out


def _referenced_series(ds: pydicom.Dataset) -> set[str]:
    return {str(s.SeriesInstanceUID) for f in ds.ReferencedFrameOfReferenceSequence
            for st in f.RTReferencedStudySequence for s in st.RTReferencedSeriesSequence}


def _wait(pred: Callable[[], Any], timeout: float, what: str, diagnose: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {diagnose()}")


@pytest.mark.parametrize("late", ["phase", "AVG"])
def test_late_arrival_after_done_is_delivered_as_a_new_instance(
    late: str, tmp_path: Path, orthanc: Any, phantom_dicom_factory: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery.contrib.testing.worker import start_worker

    from service.intake.assembler import Assembler
    from service.intake.queue import Enqueuer
    from service.ops.status import collect_status
    from service.store.header_scan import meta_from_bytes
    from service.store.spool import Spool
    from worker.celery_app import create_app

    phantom = phantom_dicom_factory("siemens", with_avg=True, uid_seed=f"late-{late}")
    if late == "phase":
        late_series = phantom.phases[-1]
        first = [f for s in phantom.series if s is not late_series and s.kind in ("phase", "AVG")
                 for f in s.files]
    else:
        (late_series,) = phantom.references
        first = [f for s in phantom.phases for f in s.files]
    data_dir = tmp_path / "data"
    for k, v in {"ITVNODE_DATA_DIR": str(data_dir), "ITVNODE_DESTINATIONS": orthanc.address,
                 "ITVNODE_AE_TITLE": "ITVNODE", "ITVNODE_EXPORT_RETRY_BASE": "1",
                 "ITVNODE_EXPORT_RETRY_MAX_DELAY": "1", "ITVNODE_DEVICE": "cpu"}.items():
        monkeypatch.setenv(k, v)
    for k in ("ITVNODE_BROKER_URL", "ITVNODE_CONFIG", "ITVNODE_SAM3_DIR", "ITVNODE_ADAPTER_DIR"):
        monkeypatch.delenv(k, raising=False)

    spool = Spool(data_dir / "spool", fsync=False)
    enqueuer = Enqueuer(None, data_dir)
    # the first delivery has 3 of the cycle's 4 phases: processed and flagged rather than held, so that the
    # late fourth phase makes version 2 (holding incomplete sets has its own tests)
    assembler = Assembler(spool, data_dir, enqueuer.segment_study, quiet_period=0.0, expected_phases=None,
                          settle=0.0, incomplete_cycle="process")

    def receive(files: list[Path]) -> None:
        for f in files:
            encoded = f.read_bytes()
            spool.store(meta_from_bytes(encoded), encoded)
        assembler.poll_once(time.time() + 1.0)

    def manifest() -> dict[str, Any]:
        ((_, m),) = list(iter_manifests(data_dir))
        return m.model_dump()

    def done_at(version: int) -> bool:
        m = manifest()
        return m["state"] == "done" and m["results"].get("version") == version

    app = create_app(None, data_dir, include=["worker.tasks"], main="itvnode-late-test")
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            receive(first)
            _wait(lambda: done_at(1), 120, "version 1 delivered", lambda: json.dumps(manifest())[-1500:])
            v1 = _rtstructs(orthanc, phantom.study_instance_uid)
            assert len(v1) == 1
            (uid1,) = v1
            assert manifest()["results"]["rtstruct_sop_instance_uids"] == [uid1]
            assert late_series.series_instance_uid not in _referenced_series(v1[uid1])

            receive(late_series.files)  # after done: the study is re-collected and queued again
            _wait(lambda: done_at(2), 120, "version 2 delivered", lambda: json.dumps(manifest())[-1500:])
    finally:
        enqueuer.close()
        spool.close()

    held = _rtstructs(orthanc, phantom.study_instance_uid)
    m = manifest()
    (uid2,) = m["results"]["rtstruct_sop_instance_uids"]
    assert uid2 != uid1
    assert set(held) == {uid1, uid2}  # Orthanc holds both versions; nothing was silently kept stale
    new, old = held[uid2], held[uid1]
    assert late_series.series_instance_uid in _referenced_series(new)
    assert new.SeriesInstanceUID != old.SeriesInstanceUID
    assert " v2 " in str(new.SeriesDescription) and " v1 " in str(old.SeriesDescription)
    n_phases = len([p for p in m["phases"]])
    assert f"Version 2, from {n_phases} phases" in str(new.StructureSetDescription)
    if late == "AVG":
        assert "+ AVG" in str(new.StructureSetDescription) and "+ AVG" not in str(old.StructureSetDescription)
    assert int(new.SeriesNumber) == int(old.SeriesNumber) + 100

    (row,) = [r for r in collect_status(data_dir) if r["study_key"] == m["study_key"]]
    assert row["state"] == "done" and row["version"] == 2
    assert [v["version"] for v in row["versions"]] == [1, 2]
    assert row["versions"][1]["sop_instance_uids"] == [uid2]
    assert row["versions"][0]["sop_instance_uids"] == [uid1]
    if late == "phase":
        assert late_series.percent in row["versions"][1]["phases"]
        assert late_series.percent not in row["versions"][0]["phases"]
    else:
        assert row["versions"][1]["references"] == ["AVG"] and row["versions"][0]["references"] == []

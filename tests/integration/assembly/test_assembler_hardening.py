"""Issue 9, items 4, 5 and 9: mixed frames of reference, a study that breaks assembly, corrected re-sends."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from assembly_helpers import SMALL, broker_messages, ingest, make_assembler, manifest
from pydicom import dcmread
from pydicom.uid import generate_uid

from service.intake.queue import Enqueuer
from service.net.scp import StorageSCP
from service.ops.status import collect_status
from service.store.header_scan import meta_from_bytes
from service.store.manifest import manifest_path, set_state, study_key, update_manifest
from service.store.spool import Spool

Factory = Callable[..., Any]
STORESCU = "/usr/bin/storescu"


def _rewrite(files: list[Path], out_dir: Path, **attrs: Any) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        ds = dcmread(f)
        for kw, value in attrs.items():
            setattr(ds, kw, value)
        p = out_dir / f.name
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


@pytest.mark.parametrize("expected_phases", [None, 4])
def test_phases_in_two_frames_of_reference_are_held(phantom_dicom_factory: Factory, spool: Spool,
                                                    data_dir: Path, embedded: Enqueuer, tmp_path: Path,
                                                    expected_phases: int | None) -> None:
    """Item 4: three phases used to go done while the fourth was dropped into a study of its own."""
    ph = phantom_dicom_factory("siemens", uid_seed="asm-mixed-for", **SMALL)
    other_for = generate_uid(entropy_srcs=["asm-mixed-for", "second FoR"])
    moved = _rewrite(ph.by_percent(75.0).files, tmp_path / "for2", FrameOfReferenceUID=other_for)
    ingest(spool, [f for s in ph.phases if s.percent != 75.0 for f in s.files] + moved)
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0,
                         expected_phases=expected_phases)
    last = spool.last_received(ph.study_instance_uid) or 0
    asm.poll_once(last + 5)
    asm.poll_once(last + 31)
    series75 = ph.by_percent(75.0).series_instance_uid
    for for_uid in (ph.frame_of_reference_uid, other_for):
        m = manifest(data_dir, study_key(ph.study_instance_uid, for_uid))
        reason = m.reason or ""
        assert m.state == "held", (for_uid, m.state, reason)
        assert reason.startswith("phases disagree on the frame of reference")
        assert "75% (series" in reason and series75[-10:] in reason and other_for[-10:] in reason
        assert ph.frame_of_reference_uid not in reason and "…" in reason  # UIDs shortened
    assert broker_messages(data_dir) == []
    rows = collect_status(data_dir, now=last + 31)
    assert {r["state"] for r in rows if r["study_instance_uid"] == ph.study_instance_uid} == {"held"}


def test_one_broken_study_does_not_stop_the_others(phantom_dicom_factory: Factory, spool: Spool,
                                                  data_dir: Path, embedded: Enqueuer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Item 5: NaN positions (stored before the SCP refused them) made an unreadable manifest and a traceback
    every poll; now the study is held with the reason, logged once, and the other study is queued."""
    bad = phantom_dicom_factory("siemens", uid_seed="asm-nan", **SMALL)
    good = phantom_dicom_factory("philips", uid_seed="asm-nan-good", **SMALL)
    for i, f in enumerate(f for s in bad.phases for f in s.files):
        raw = f.read_bytes()
        meta = meta_from_bytes(raw)
        if i % 12 == 3:  # one slice per phase: what a pre-fix spool may hold
            meta = dataclasses.replace(meta, image_position=(float("nan"), 0.0, 0.0))
        spool.store(meta, raw)
    ingest(spool, [f for s in good.phases for f in s.files])
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0, expected_phases=None)
    bad_key = study_key(bad.study_instance_uid, bad.frame_of_reference_uid)
    good_key = study_key(good.study_instance_uid, good.frame_of_reference_uid)
    last = max(spool.last_received(ph.study_instance_uid) or 0 for ph in (bad, good))
    caplog.set_level(logging.DEBUG, logger="service.intake.assembler")
    for t in range(31, 31 + 120, 1):  # two minutes of one-second polls: backoff, no flood
        asm.poll_once(last + t)
    assert manifest(data_dir, good_key).state == "queued"
    m = manifest(data_dir, bad_key)
    assert m.state == "held" and (m.reason or "").startswith("assembly failed: ValidationError")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and bad_key in errors[0].getMessage()
    assert [x["args"][0] for x in broker_messages(data_dir)] == [good_key]
    rows = {r["study_key"]: r for r in collect_status(data_dir, now=last + 200)}
    assert rows[bad_key]["state"] == "held" and "assembly failed" in rows[bad_key]["reason"]

    # an unreadable manifest (written by an older version) is moved aside, the study held, logged once
    path = manifest_path(data_dir, bad_key)
    path.write_text('{"study_key": "x", "geometry": {"positions": [[NaN]]')
    caplog.clear()
    ingest(spool, bad.phases[0].files[:1])  # new activity for the study
    last = spool.last_received(bad.study_instance_uid) or 0
    for t in range(31, 40):
        asm.poll_once(last + t)
    assert manifest(data_dir, bad_key).state == "held"
    assert list(path.parent.glob("manifest.unreadable-*.json"))
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR and bad_key in r.getMessage()]) <= 2


def _storescu(port: int, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STORESCU, "-aet", "PACS", "-aec", "ITVNODE", "-to", "10", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=120)


def test_failed_study_reopened_by_corrected_resend(phantom_dicom_factory: Factory, spool: Spool,
                                                   data_dir: Path, embedded: Enqueuer,
                                                   tmp_path: Path) -> None:
    """Item 9, through the SCP with dcmtk storescu: an identical re-send leaves a failed study alone; the
    corrected instance (same SOP Instance UID, changed content) re-opens it: collecting, quiet period, a new
    job."""
    ph = phantom_dicom_factory("siemens", uid_seed="asm-reopen", **SMALL)
    files = [f for s in ph.phases for f in s.files]
    scp = StorageSCP(spool, host="127.0.0.1", port=0)
    port = scp.start()
    try:
        assert _storescu(port, files).returncode == 0
        asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0)
        key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)
        path = manifest_path(data_dir, key)
        last = spool.last_received(ph.study_instance_uid) or 0
        asm.poll_once(last + 3)
        assert manifest(data_dir, key).state == "queued"
        update_manifest(path, lambda m: set_state(m, "failed", "segmentation failed: bad slice"))

        assert _storescu(port, files[:5]).returncode == 0  # the same instances again
        last = spool.last_received(ph.study_instance_uid) or 0
        asm.poll_once(last + 60)
        assert manifest(data_dir, key).state == "failed" and len(broker_messages(data_dir)) == 1

        [fixed] = _rewrite(files[7:8], tmp_path / "fixed", WindowCenter=40, WindowWidth=400)
        assert dcmread(fixed).SOPInstanceUID == dcmread(files[7]).SOPInstanceUID
        assert _storescu(port, [fixed]).returncode == 0
        assert spool.revisions(ph.study_instance_uid) == {str(dcmread(fixed).SOPInstanceUID): 1}
        last = spool.last_received(ph.study_instance_uid) or 0
        asm.poll_once(last + 1)
        m = manifest(data_dir, key)
        assert m.state == "collecting" and "content changed after failed" in (m.history[-1].reason or "")
        assert m.task_id is None
        asm.poll_once(last + 31)  # the quiet period: a new job on the corrected content
        m = manifest(data_dir, key)
        assert m.state == "queued" and m.task_id is not None
        assert len(broker_messages(data_dir)) == 2
    finally:
        scp.stop()

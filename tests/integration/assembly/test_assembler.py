"""The assembler on phantom series through the real spool, with a controllable clock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from assembly_helpers import (
    SMALL,
    all_files,
    broker_messages,
    ingest,
    make_assembler,
    manifest,
    rewrite_series,
    shuffled,
    to_enhanced_ct,
)

from service.dicomio.volume import read_phases
from service.intake.phases import compile_rules
from service.intake.queue import TASK_SEGMENT, Enqueuer
from service.setting_values import PhaseRule
from service.store.manifest import manifest_path, set_state, study_key, update_manifest
from service.store.spool import Spool

Factory = Callable[..., Any]


@pytest.mark.parametrize("vendor", ["siemens", "philips", "enhanced"])
def test_vendor_series_shuffled_complete_by_count(vendor: str, phantom_dicom_factory: Factory, spool: Spool,
                                                 data_dir: Path, embedded: Enqueuer) -> None:
    ph = phantom_dicom_factory(vendor, with_avg=True, with_mip=True, uid_seed=f"asm-{vendor}", **SMALL)
    ingest(spool, shuffled(all_files(ph), seed=len(vendor)))
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=60.0, expected_phases=4)
    last = spool.last_received(ph.study_instance_uid)
    assert last is not None
    key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)

    asm.poll_once(last + 0.5)  # all four phases there, but inside the settle time
    assert manifest(data_dir, key).state == "collecting"
    assert broker_messages(data_dir) == []

    assert asm.poll_once(last + 2.5) == [key]
    m = manifest(data_dir, key)
    assert m.state == "queued", m.reason
    assert [h.state for h in m.history] == ["collecting", "complete", "queued"]
    assert "all 4 expected phases" in (m.history[1].reason or "")
    assert [p.percent for p in m.phases] == [0.0, 25.0, 50.0, 75.0]
    for p in m.phases:
        info = ph.by_percent(p.percent)
        assert p.series_instance_uid == info.series_instance_uid
        assert p.slices == 12
        # sorted along the slice normal (z ascending) whatever order they arrived in
        z = [float(dcm_z) for dcm_z in (_z(data_dir / f) for f in p.files)]
        assert z == sorted(z) and len(set(z)) == 12
    assert sorted(r.kind for r in m.references) == ["AVG", "MIP"]
    assert all(len(r.files) == 12 for r in m.references)
    g = m.geometry
    assert g is not None and (g.rows, g.columns) == (64, 64)
    assert g.pixel_spacing == pytest.approx([500 / 64, 500 / 64], abs=1e-4)
    assert g.slice_spacing == pytest.approx(5.0)
    assert len(g.positions) == 12
    assert m.identifiers["PatientName"] == "PHANTOM^4DCT" and m.identifiers["StudyID"] == "PHANTOM"
    hu, geoms = read_phases(m, data_dir)  # the worker's reader accepts the manifest as written
    assert hu.shape == (4, 12, 64, 64) and len(geoms) == 4
    msgs = broker_messages(data_dir)
    assert [(x["task"], x["args"], x["queue"]) for x in msgs] == [(TASK_SEGMENT, [key], "inference")]
    assert m.task_id == msgs[0]["id"]

    # nothing new: polling again changes nothing and sends nothing
    assert asm.poll_once(last + 100) == []
    assert len(broker_messages(data_dir)) == 1


def _z(path: Path) -> float:
    from pydicom import dcmread

    return float(dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


def test_two_studies_interleaved_and_non4d_ct(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                                             embedded: Enqueuer) -> None:
    a = phantom_dicom_factory("siemens", with_extra_ct="other-for", uid_seed="asm-a", **SMALL)
    b = phantom_dicom_factory("philips", with_extra_ct="same-for", uid_seed="asm-b", **SMALL)
    fa, fb = shuffled(all_files(a), 1), shuffled(all_files(b), 2)
    mixed = [f for pair in zip(fa, fb, strict=True) for f in pair]
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0, expected_phases=10)
    ingest(spool, mixed[: len(mixed) // 2])
    t0 = max(spool.last_received(a.study_instance_uid) or 0, spool.last_received(b.study_instance_uid) or 0)
    asm.poll_once(t0 + 5)
    ka = study_key(a.study_instance_uid, a.frame_of_reference_uid)
    kb = study_key(b.study_instance_uid, b.frame_of_reference_uid)
    assert manifest(data_dir, ka).state == manifest(data_dir, kb).state == "collecting"
    ingest(spool, mixed[len(mixed) // 2:])
    t1 = max(spool.last_received(a.study_instance_uid) or 0, spool.last_received(b.study_instance_uid) or 0)
    asm.poll_once(t1 + 5)  # expected 10 phases, only 4: waits for the quiet period
    assert manifest(data_dir, ka).state == "collecting"
    changed = asm.poll_once(t1 + 31)
    assert sorted(changed) == sorted([ka, kb])
    for key in (ka, kb):  # 4 phases every 25 % where 10 are expected: held, not treated
        m = manifest(data_dir, key)
        assert m.state == "held"
        assert (m.reason or "").startswith("4 of 10 phases: ")
        assert [p.slices for p in m.phases] == [12, 12, 12, 12]
    assert broker_messages(data_dir) == []
    from service.ops.admin import release_study

    for key in (ka, kb):
        assert [r.ok for r in release_study(data_dir, key)] == [True]
    asm.poll_once(t1 + 32)  # the changed manifests wake the settled studies
    for key in (ka, kb):
        m = manifest(data_dir, key)
        assert m.state == "queued", m.reason
        assert (m.history[-2].reason or "").startswith("released by admin (was held: 4 of 10 phases")
        assert m.released is not None and m.released.fingerprint == m.fingerprint
    assert sorted(x["args"][0] for x in broker_messages(data_dir)) == sorted([ka, kb])
    # study A's plain CT has its own frame of reference: no manifest, no job
    extra_a = a.extra[0]
    key_extra = study_key(a.study_instance_uid, extra_a.frame_of_reference_uid)
    assert not manifest_path(data_dir, key_extra).exists()
    # study B's plain CT shares the frame of reference: listed as ignored, not a phase
    mb = manifest(data_dir, kb)
    assert [s.series_instance_uid for s in mb.ignored_series] == [b.extra[0].series_instance_uid]
    assert sorted(x["args"][0] for x in broker_messages(data_dir)) == sorted([ka, kb])


def test_quiet_period_with_count_unknown(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                                         embedded: Enqueuer) -> None:
    ph = phantom_dicom_factory("siemens", uid_seed="asm-quiet", **SMALL)
    ingest(spool, all_files(ph))
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=20.0, expected_phases=None)
    last = spool.last_received(ph.study_instance_uid) or 0
    key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)
    asm.poll_once(last + 19.9)
    assert manifest(data_dir, key).state == "collecting"
    asm.poll_once(last + 20.0)
    assert manifest(data_dir, key).state == "queued"


def test_new_instance_restarts_the_clocks(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                                          embedded: Enqueuer) -> None:
    ph = phantom_dicom_factory("siemens", uid_seed="asm-clock", **SMALL)
    files = all_files(ph)
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=20.0, expected_phases=4)
    key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)
    ingest(spool, files[:-1])  # one slice of the last phase missing: counts differ
    last = spool.last_received(ph.study_instance_uid) or 0
    asm.poll_once(last + 10)
    assert manifest(data_dir, key).state == "collecting"
    ingest(spool, files[-1:])
    last2 = spool.last_received(ph.study_instance_uid) or 0
    asm.poll_once(last2 + 1.0)  # complete counts, inside the settle time
    assert manifest(data_dir, key).state == "collecting"
    asm.poll_once(last2 + 2.0)
    assert manifest(data_dir, key).state == "queued"


def test_mismatched_positions_held(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                                   embedded: Enqueuer, tmp_path: Path) -> None:
    ph = phantom_dicom_factory("philips", uid_seed="asm-mismatch", **SMALL)
    shifted = rewrite_series(ph.by_percent(50.0).files, tmp_path / "shifted", dz=1.25)
    others = [f for s in ph.phases if s.percent != 50.0 for f in s.files]
    ingest(spool, shuffled(others + shifted, 3))
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0, expected_phases=4)
    last = spool.last_received(ph.study_instance_uid) or 0
    key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)
    asm.poll_once(last + 5)  # four phases, but positions differ: never complete by count
    assert manifest(data_dir, key).state == "collecting"
    asm.poll_once(last + 30)
    m = manifest(data_dir, key)
    assert m.state == "held"
    assert "phase 50%" in (m.reason or "") and "slice positions differ" in (m.reason or "")
    assert "1.250 mm" in (m.reason or "")
    assert broker_messages(data_dir) == []


def test_missing_slice_held_then_fixed(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                                       embedded: Enqueuer) -> None:
    ph = phantom_dicom_factory("siemens", uid_seed="asm-missing", **SMALL)
    missing = ph.by_percent(25.0).files[5]
    ingest(spool, [f for f in all_files(ph) if f != missing])
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0, expected_phases=4)
    key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)
    last = spool.last_received(ph.study_instance_uid) or 0
    asm.poll_once(last + 30)
    m = manifest(data_dir, key)
    assert m.state == "held" and "11 slices vs 12" in (m.reason or "")
    assert asm.poll_once(last + 60) == []  # held stays held without news
    ingest(spool, [missing])  # the PACS re-sends the missing slice
    last = spool.last_received(ph.study_instance_uid) or 0
    asm.poll_once(last + 0.1)
    m = manifest(data_dir, key)
    assert m.state == "collecting" and m.reason == "new instances after hold; re-assessing"
    asm.poll_once(last + 2.5)
    assert manifest(data_dir, key).state == "queued"
    assert len(broker_messages(data_dir)) == 1


def test_uneven_spacing_in_every_phase_held(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                                            embedded: Enqueuer) -> None:
    ph = phantom_dicom_factory("siemens", uid_seed="asm-gap", **SMALL)
    ingest(spool, [f for s in ph.phases for i, f in enumerate(s.files) if i != 6])
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0, expected_phases=4)
    last = spool.last_received(ph.study_instance_uid) or 0
    asm.poll_once(last + 5)  # equal counts and positions, but a gap: not complete by count
    key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)
    assert manifest(data_dir, key).state == "collecting"
    asm.poll_once(last + 30)
    m = manifest(data_dir, key)
    assert m.state == "held" and "uneven slice spacing" in (m.reason or "")


def test_duplicate_percent_held(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                                embedded: Enqueuer, tmp_path: Path) -> None:
    ph = phantom_dicom_factory("siemens", uid_seed="asm-dup", **SMALL)
    dup = rewrite_series(ph.by_percent(25.0).files, tmp_path / "dup", new_series=True)
    ingest(spool, shuffled(all_files(ph) + dup, 4))
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0, expected_phases=4)
    last = spool.last_received(ph.study_instance_uid) or 0
    key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)
    asm.poll_once(last + 5)
    assert manifest(data_dir, key).state == "collecting"
    asm.poll_once(last + 30)
    m = manifest(data_dir, key)
    assert m.state == "held"
    assert "2 series claim phase 25%" in (m.reason or "")
    assert broker_messages(data_dir) == []


def test_single_phase_held(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                           embedded: Enqueuer) -> None:
    ph = phantom_dicom_factory("siemens", uid_seed="asm-single", **SMALL)
    ingest(spool, ph.by_percent(0.0).files)
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0, expected_phases=4)
    last = spool.last_received(ph.study_instance_uid) or 0
    asm.poll_once(last + 30)
    m = manifest(data_dir, study_key(ph.study_instance_uid, ph.frame_of_reference_uid))
    assert m.state == "held" and "1 distinct respiratory phase" in (m.reason or "")


def test_plain_ct_alone_never_triggers(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                                       embedded: Enqueuer) -> None:
    ph = phantom_dicom_factory("siemens", with_extra_ct="other-for", uid_seed="asm-plain", **SMALL)
    ingest(spool, ph.extra[0].files)
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0, expected_phases=4)
    last = spool.last_received(ph.study_instance_uid) or 0
    assert asm.poll_once(last + 300) == []
    assert not (data_dir / "studies").exists() or not any((data_dir / "studies").iterdir())
    assert broker_messages(data_dir) == []


def test_broker_down_keeps_complete_then_retries(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                                                 embedded: Enqueuer, free_port: int) -> None:
    ph = phantom_dicom_factory("enhanced", uid_seed="asm-down", **SMALL)
    ingest(spool, all_files(ph))
    down = Enqueuer(f"redis://127.0.0.1:{free_port}/0", data_dir)  # nothing listens there
    try:
        asm = make_assembler(spool, data_dir, down.segment_study, enqueue_retry_interval=5.0)
        last = spool.last_received(ph.study_instance_uid) or 0
        key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)
        asm.poll_once(last + 3)
        m = manifest(data_dir, key)
        assert m.state == "complete"
        assert (m.reason or "").startswith("enqueue failed, retrying")
        n_history = len(m.history)
        asm.poll_once(last + 8.5)  # retried after 5 s, fails again: next try 10 s later
        assert manifest(data_dir, key).state == "complete"
        asm.enqueue = embedded.segment_study  # the broker comes back
        asm.poll_once(last + 15)  # inside the doubled back-off: not tried
        assert manifest(data_dir, key).state == "complete"
        assert len(manifest(data_dir, key).history) == n_history  # the same failure is not re-recorded
        asm.poll_once(last + 18.6)
        assert manifest(data_dir, key).state == "queued"
        assert [x["args"] for x in broker_messages(data_dir)] == [[key]]
    finally:
        down.close()


def test_restart_resumes(phantom_dicom_factory: Factory, data_dir: Path, embedded: Enqueuer,
                         free_port: int) -> None:
    a = phantom_dicom_factory("siemens", uid_seed="asm-restart-a", **SMALL)
    b = phantom_dicom_factory("philips", uid_seed="asm-restart-b", **SMALL)
    ka = study_key(a.study_instance_uid, a.frame_of_reference_uid)
    kb = study_key(b.study_instance_uid, b.frame_of_reference_uid)
    # first life: A half received; B complete but the broker is down
    spool1 = Spool(data_dir / "spool", fsync=False)
    down = Enqueuer(f"redis://127.0.0.1:{free_port}/0", data_dir)
    ingest(spool1, all_files(a)[:20])
    ingest(spool1, all_files(b))
    asm1 = make_assembler(spool1, data_dir, down.segment_study)
    t = max(spool1.last_received(a.study_instance_uid) or 0, spool1.last_received(b.study_instance_uid) or 0)
    asm1.poll_once(t + 3)
    assert manifest(data_dir, ka).state == "collecting"
    assert manifest(data_dir, kb).state == "complete"
    down.close()
    spool1.close()
    # second life: fresh objects on the same data_dir
    spool2 = Spool(data_dir / "spool", fsync=False)
    try:
        asm2 = make_assembler(spool2, data_dir, embedded.segment_study)
        asm2.poll_once(t + 3.5)
        assert manifest(data_dir, kb).state == "queued"  # completed-but-unqueued gets queued
        assert manifest(data_dir, ka).state == "collecting"
        ingest(spool2, all_files(a)[20:])
        last = spool2.last_received(a.study_instance_uid) or 0
        asm2.poll_once(last + 2.5)
        assert manifest(data_dir, ka).state == "queued"
        assert sorted(x["args"][0] for x in broker_messages(data_dir)) == sorted([ka, kb])
    finally:
        spool2.close()


def test_late_instances_and_resend(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                                   embedded: Enqueuer, tmp_path: Path) -> None:
    ph = phantom_dicom_factory("siemens", with_avg=True, uid_seed="asm-resend", **SMALL)
    phases = [f for s in ph.phases for f in s.files]
    ingest(spool, phases)
    asm = make_assembler(spool, data_dir, embedded.segment_study)
    key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)
    path = manifest_path(data_dir, key)
    last = spool.last_received(ph.study_instance_uid) or 0
    asm.poll_once(last + 3)
    assert manifest(data_dir, key).state == "queued"
    update_manifest(path, lambda m: set_state(m, "processing"))  # what the segment task does

    # the AVG arrives while the job runs: noted once, not re-queued
    ingest(spool, ph.references[0].files)
    last = spool.last_received(ph.study_instance_uid) or 0
    assert asm.poll_once(last + 3) == [key]
    m = manifest(data_dir, key)
    assert m.state == "processing" and len(m.notes) == 1 and "after completion" in m.notes[0].text
    asm2 = make_assembler(spool, data_dir, embedded.segment_study)  # a restart does not repeat the note
    asm2.poll_once(last + 4)
    assert len(manifest(data_dir, key).notes) == 1
    assert len(broker_messages(data_dir)) == 1

    update_manifest(path, lambda m: set_state(m, "done"))
    # once done, the content that arrived during the job (the AVG) is assembled and queued again
    asm2.poll_once(last + 5)
    assert manifest(data_dir, key).state == "queued"
    assert len(broker_messages(data_dir)) == 2
    update_manifest(path, lambda m: set_state(m, "done"))
    ingest(spool, phases)  # the PACS sends the same instances again
    last = spool.last_received(ph.study_instance_uid) or 0
    assert asm2.poll_once(last + 60) == []
    assert manifest(data_dir, key).state == "done"
    assert len(broker_messages(data_dir)) == 2

    # changed content after done (a re-reconstructed phase with new SOP instances): re-collected, re-queued
    redo = rewrite_series(ph.by_percent(50.0).files, tmp_path / "redo", new_series=True,
                          description="RespCT  3.0  B30f  50% Ex redo")
    ingest(spool, redo)
    last = spool.last_received(ph.study_instance_uid) or 0
    asm2.poll_once(last + 0.5)
    m = manifest(data_dir, key)
    assert m.state == "collecting" and "content changed after done" in (m.history[-1].reason or "")
    assert m.task_id is None
    asm2.poll_once(last + 30)  # the old and the redone 50 % now both claim 50 %: held, not guessed
    m = manifest(data_dir, key)
    assert m.state == "held" and "2 series claim phase 50%" in (m.reason or "")
    assert len(broker_messages(data_dir)) == 2


def test_multiframe_enhanced_ct_phases(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                                       embedded: Enqueuer, tmp_path: Path) -> None:
    """Enhanced CT: one multi-frame instance per phase, percent in the per-frame Frame Content items."""
    ph = phantom_dicom_factory("siemens", uid_seed="asm-mf", **SMALL)
    files = [to_enhanced_ct(s.files, tmp_path / f"mf{i}.dcm", s.percent or 0.0)
             for i, s in enumerate(ph.phases)]
    ingest(spool, files)
    asm = make_assembler(spool, data_dir, embedded.segment_study)
    last = spool.last_received(ph.study_instance_uid) or 0
    asm.poll_once(last + 2.5)
    m = manifest(data_dir, study_key(ph.study_instance_uid, ph.frame_of_reference_uid))
    assert m.state == "queued", m.reason
    assert [(p.percent, p.slices, len(p.files)) for p in m.phases] == [
        (0.0, 12, 1), (25.0, 12, 1), (50.0, 12, 1), (75.0, 12, 1)]
    assert m.geometry is not None
    z = [p[2] for p in m.geometry.positions]
    assert z == sorted(z) and m.geometry.slice_spacing == pytest.approx(5.0)
    assert m.geometry.pixel_spacing == pytest.approx([500 / 64, 500 / 64], abs=1e-4)
    # the manifest is what the worker's reader consumes: same voxels as the classic phantom series
    hu, _ = read_phases(m, data_dir)
    ref, _ = read_phases([s.files for s in ph.phases])
    assert hu.shape == (4, 12, 64, 64) and np.array_equal(hu, ref)


def test_held_study_reassessed_after_restart_with_site_rule(phantom_dicom_factory: Factory, spool: Spool,
                                                            data_dir: Path, embedded: Enqueuer,
                                                            tmp_path: Path) -> None:
    """A site whose scanner writes ``4DCT bin25``: held until a site phase rule is configured, then queued."""
    ph = phantom_dicom_factory("siemens", uid_seed="asm-rule", **SMALL)
    files = []
    for s in ph.phases:
        desc = "4DCT 0%" if s.percent == 0.0 else f"4DCT bin{s.percent:g}"
        files += rewrite_series(s.files, tmp_path / f"p{s.percent:g}", description=desc)
    ingest(spool, files)
    key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)
    last = spool.last_received(ph.study_instance_uid) or 0
    make_assembler(spool, data_dir, embedded.segment_study).poll_once(last + 30)
    m = manifest(data_dir, key)
    assert m.state == "held" and "1 distinct respiratory phase" in (m.reason or "")
    assert len(m.ignored_series) == 3
    n_history = len(m.history)
    make_assembler(spool, data_dir, embedded.segment_study).poll_once(last + 40)  # restart, same rules
    assert len(manifest(data_dir, key).history) == n_history  # still held, nothing rewritten
    rules = compile_rules([PhaseRule(pattern=r"bin(?P<pct>\d+)")])
    make_assembler(spool, data_dir, embedded.segment_study, site_rules=rules).poll_once(last + 50)
    m = manifest(data_dir, key)
    assert m.state == "queued", m.reason
    assert [p.percent for p in m.phases] == [0.0, 25.0, 50.0, 75.0] and m.ignored_series == []


def test_series_mixing_phases_held(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                                   embedded: Enqueuer, tmp_path: Path) -> None:
    """All phases in ONE series, told apart only by (0020,9245) per instance: held with the reason."""
    from pydicom import dcmread

    ph = phantom_dicom_factory("enhanced", uid_seed="asm-mixed", **SMALL)
    one = rewrite_series(ph.phases[0].files, tmp_path / "one")
    series_uid = str(dcmread(one[0]).SeriesInstanceUID)
    for s in ph.phases[1:]:
        moved = rewrite_series(s.files, tmp_path / f"p{s.percent:g}", new_series=True)
        for f in moved:
            ds = dcmread(f)
            ds.SeriesInstanceUID = series_uid
            ds.save_as(f, enforce_file_format=True)
        one += moved
    ingest(spool, one)
    asm = make_assembler(spool, data_dir, embedded.segment_study)
    last = spool.last_received(ph.study_instance_uid) or 0
    asm.poll_once(last + 30)
    m = manifest(data_dir, study_key(ph.study_instance_uid, ph.frame_of_reference_uid))
    assert m.state == "held" and "mixes 4 respiratory phases" in (m.reason or "")


def test_downtime_does_not_count_as_quiet(phantom_dicom_factory: Factory, data_dir: Path,
                                          embedded: Enqueuer) -> None:
    """Half a study arrived, then the node was down longer than the quiet period (the peer could not send):
    the restarted loop keeps collecting instead of completing the partial 4D set at once."""
    import sqlite3
    import threading
    import time

    ph = phantom_dicom_factory("siemens", uid_seed="asm-downtime", **SMALL)
    spool1 = Spool(data_dir / "spool", fsync=False)
    ingest(spool1, all_files(ph)[:24])  # phases 0 % and 25 % of four
    spool1.close()
    with sqlite3.connect(data_dir / "spool" / "index.sqlite") as con:  # received an hour before the restart
        con.execute("UPDATE instances SET received_at = received_at - 3600")
    con.close()
    key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)
    spool2 = Spool(data_dir / "spool", fsync=False)
    stop = threading.Event()
    try:
        asm = make_assembler(spool2, data_dir, embedded.segment_study, quiet_period=30.0)
        loop = threading.Thread(target=asm.run, kwargs={"stop_event": stop, "interval": 0.05})
        loop.start()
        deadline = time.monotonic() + 10
        while not manifest_path(data_dir, key).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a few more polls
        stop.set()
        loop.join(timeout=10)
        m = manifest(data_dir, key)
        assert m.state == "collecting", m.reason
        assert broker_messages(data_dir) == []
        # the quiet period runs from the restart: polled a full quiet period later, the set is assessed, and
        # half a cycle is held (not treated)
        assert asm.poll_once(time.time() + 30.5) == [key]
        m = manifest(data_dir, key)
        assert m.state == "held"
        assert (m.reason or "").startswith("2 of 4 phases: 50 %, 75 % missing")
    finally:
        stop.set()
        spool2.close()

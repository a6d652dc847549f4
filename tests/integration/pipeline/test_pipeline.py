"""worker.pipeline.process_study on a real assembled study: states, reasons, timings, idempotency, export.

SAM 3 is absent here (threshold structures only, SAM 3 ones skipped), which keeps these tests fast; the tiny
SAM 3 runs in tests/e2e.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from service.ops.status import collect_status
from service.setting_values import Destination
from service.settings import load_settings
from service.store.manifest import load_manifest, manifest_path, save_manifest
from service.store.outbox import Outbox, RetryPolicy
from tests.support.net import free_port
from worker.delivery import sync_export_state
from worker.engine_settings import EngineConfig, LoadedSegmenter, engine_config, roi_styles
from worker.pipeline import process_study
from worker.result_files import results_dir
from worker.stages import PipelineError

NO_SAM3 = LoadedSegmenter(None, "SAM 3 unavailable: no SAM 3 model directory configured")


def _config(**overrides: Any) -> EngineConfig:
    settings = load_settings(**{"sam3_dir": None, "adapter_dir": None, **overrides})
    return engine_config(settings)


def test_no_destination_keeps_result_done_with_skipped_reason(assembled: tuple[Path, str, Any]) -> None:
    data_dir, key, series = assembled
    out = process_study(key, data_dir, _config(), NO_SAM3, [], task_id="t1")
    assert out.state == "done" and out.computed
    m = load_manifest(manifest_path(data_dir, key))
    assert m.state == "done"
    assert "no destinations configured" in (m.reason or "")
    assert "skipped: Lung_L: SAM 3 unavailable" in (m.reason or "")  # the status line says both
    (row,) = [r for r in collect_status(data_dir) if r["study_key"] == key]
    assert set(row["skipped"]) == {"Lung_L", "Lung_R", "Heart", "GTVp", "ITV"}
    assert set(m.results["skipped"]) == {"Lung_L", "Lung_R", "Heart", "GTVp", "ITV"}
    assert all(v.startswith("SAM 3 unavailable") for v in m.results["skipped"].values())
    assert [h.state for h in m.history][-2:] == ["processing", "done"]
    assert set(m.results["timings"]) >= {"model", "load", "inference", "filter", "rtstruct", "outbox",
                                         "segmenter", "phase_cpu", "overlap_wall", "segmenter_idle",
                                         "processing"}
    (rs,) = out.files
    assert rs.parent == results_dir(data_dir, key) and rs.is_file()
    ds = pydicom.dcmread(rs)
    assert "Not contoured" in ds.StructureSetDescription and "SAM 3 unavailable" in ds.StructureSetDescription
    refs = {s.SeriesInstanceUID for fr in ds.ReferencedFrameOfReferenceSequence
            for st in fr.RTReferencedStudySequence for s in st.RTReferencedSeriesSequence}
    assert {p.series_instance_uid for p in series.phases} <= refs
    qa = json.loads((results_dir(data_dir, key) / "qa.json").read_text())
    assert qa["algorithm"]["sam3"].startswith("SAM 3 unavailable")
    n = len(series.phases)
    assert f"ITV from {n} of {n} phases." in ds.StructureSetDescription  # a complete cycle says so too
    assert qa["qa"]["phases"]["complete"] and qa["qa"]["phases"]["used"] == n
    assert row["warnings"] == [] or all("phases" not in w for w in row["warnings"])
    assert m.results["qa"]["phases"] == qa["qa"]["phases"]


def test_rerun_resends_kept_result_instead_of_computing(assembled: tuple[Path, str, Any]) -> None:
    data_dir, key, _ = assembled
    dest = [Destination.parse(f"RX@127.0.0.1:{free_port()}")]
    sent: list[str] = []
    first = process_study(key, data_dir, _config(), NO_SAM3, dest, enqueue_export=sent.append, task_id="a")
    assert first.state == "exporting" and first.computed and sent == first.item_ids
    m = load_manifest(manifest_path(data_dir, key))
    uids = m.results["rtstruct_sop_instance_uids"]

    # the same message delivered twice: nothing happens
    dup = process_study(key, data_dir, _config(), NO_SAM3, dest, enqueue_export=sent.append, task_id="a")
    assert not dup.computed and sent == first.item_ids

    # a new request while the item is still pending: the same item is enqueued again, nothing recomputed
    again = process_study(key, data_dir, _config(), NO_SAM3, dest, enqueue_export=sent.append, task_id="b")
    assert not again.computed and again.item_ids == first.item_ids and sent == first.item_ids * 2
    assert load_manifest(manifest_path(data_dir, key)).results["rtstruct_sop_instance_uids"] == uids


def test_segmenter_factory_runs_after_processing_is_recorded(assembled: tuple[Path, str, Any]) -> None:
    data_dir, key, _ = assembled
    seen: list[str] = []

    def factory() -> LoadedSegmenter:
        seen.append(load_manifest(manifest_path(data_dir, key)).state)
        return NO_SAM3

    process_study(key, data_dir, _config(), factory, [])
    assert seen == ["processing"]


def test_unreadable_phase_fails_with_reason(assembled: tuple[Path, str, Any]) -> None:
    data_dir, key, _ = assembled
    path = manifest_path(data_dir, key)
    m = load_manifest(path)
    (data_dir / m.phases[1].files[3]).unlink()
    with pytest.raises(PipelineError, match="phases rejected"):
        process_study(key, data_dir, _config(), NO_SAM3, [])
    m = load_manifest(path)
    assert m.state == "failed"
    assert m.reason is not None and m.reason.startswith("load: phases rejected")


def test_held_study_is_not_processed(assembled: tuple[Path, str, Any]) -> None:
    data_dir, key, _ = assembled
    path = manifest_path(data_dir, key)
    m = load_manifest(path)
    m.state = "held"
    save_manifest(m, path)
    out = process_study(key, data_dir, _config(), NO_SAM3, [])
    assert out.state == "held" and not out.computed
    assert load_manifest(path).state == "held"


def test_export_to_real_storescp_marks_study_done(tmp_path: Path, assembled: tuple[Path, str, Any]) -> None:
    from worker.export_task import run_export

    data_dir, key, _ = assembled
    port = free_port()
    rx_dir = tmp_path / "rx"
    rx_dir.mkdir()
    scp = subprocess.Popen(["/usr/bin/storescp", "-aet", "RX", "-od", str(rx_dir), str(port)],
                           env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        out = process_study(key, data_dir, _config(), NO_SAM3, [Destination.parse(f"RX@127.0.0.1:{port}")])
        assert out.state == "exporting"
        policy = RetryPolicy(base=1.0, max_delay=1.0, horizon=60.0)
        deadline = time.monotonic() + 30
        assert len(out.item_ids) == 2  # the RTSTRUCT's item, then the QA report's (send_qa_report)
        for item_id in out.item_ids:
            while True:
                states = run_export(item_id, data_dir, "ITVNODE", policy)
                if states and all(s == "delivered" for s in states.values()):
                    break
                assert time.monotonic() < deadline, f"not delivered: {states}"
                time.sleep(0.5)
        assert sync_export_state(data_dir, key, Outbox(data_dir / "outbox")) == "done"
        m = load_manifest(manifest_path(data_dir, key))
        assert m.state == "done" and "export" in m.results["timings"]
        assert (m.reason or "").startswith("skipped: ")  # still visible in itvnode status
        doc_uid = Path(m.results["report"]["document"]).name.removeprefix("DOC.").removesuffix(".dcm")
        doc = f"PDF.{doc_uid}"  # storescp names files by SOP class
        assert sorted(f.name for f in rx_dir.iterdir()) == sorted(
            [doc, f"RS.{m.results['rtstruct_sop_instance_uids'][0]}"])

        # asked again after delivery: the kept result goes out again in a new item, nothing is recomputed
        again = process_study(key, data_dir, _config(), NO_SAM3, [Destination.parse(f"RX@127.0.0.1:{port}")],
                              task_id="operator-resend")
        assert not again.computed and again.item_ids and again.item_ids != out.item_ids
        assert load_manifest(manifest_path(data_dir, key)).state == "exporting"
        states = run_export(again.item_ids[0], data_dir, "ITVNODE", policy)
        assert set(states.values()) == {"delivered"}
        assert sync_export_state(data_dir, key) == "done"
        assert load_manifest(manifest_path(data_dir, key)).results["rtstruct_sop_instance_uids"] == [
            pydicom.dcmread(next(rx_dir.glob("RS.*"))).SOPInstanceUID]
    finally:
        scp.terminate()
        scp.wait(timeout=10)


def test_engine_config_mirrors_settings() -> None:
    cfg = _config(layout="per-series", batch_size=2, temporal_min_phases=4)
    assert [s.name for s in cfg.structures] == ["External", "Lung", "Heart", "GTVp"]
    assert cfg.structures[0].method == "threshold" and cfg.structures[0].hu_range == (-350.0, 3000.0)
    assert cfg.structures[1].split_laterality and cfg.structures[3].envelope_name == "ITV"
    assert (cfg.layout, cfg.batch_size, cfg.temporal.min_phases) == ("per-series", 2, 4)
    assert cfg.sam3_dir is None and cfg.needs_sam3
    styles = roi_styles(cfg)
    assert set(styles) == {"External", "Lung_L", "Lung_R", "Heart", "GTVp", "ITV"}
    assert styles["External"].interpreted_type == "EXTERNAL" and styles["ITV"].color == (255, 0, 0)


def test_empty_sam3_dir_setting_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITVNODE_SAM3_DIR", "")
    assert engine_config(load_settings()).sam3_dir is None


def test_missing_model_is_reported_not_raised(tmp_path: Path) -> None:
    from worker.engine_settings import load_segmenter

    seg = load_segmenter(_config(sam3_dir=tmp_path / "nothing-here"))
    assert seg.segmenter is None
    assert seg.unavailable_reason is not None and "does not exist" in seg.unavailable_reason


def test_per_series_layout_one_rtstruct_per_phase_and_reference(assembled: tuple[Path, str, Any]) -> None:
    data_dir, key, series = assembled
    dest = [Destination.parse(f"RX@127.0.0.1:{free_port()}")]
    from service.structure_settings import StructureSetting

    body = StructureSetting(name="External", method="threshold", hu_range=(-350.0, 3000.0),
                            interpreted_type="EXTERNAL", envelope=True, envelope_name="BodyEnvelope")
    cfg = _config(layout="per-series", structures=[body])
    assert not cfg.needs_sam3
    out = process_study(key, data_dir, cfg, NO_SAM3, dest)
    assert out.skipped == {}
    assert len(out.files) == len(series.phases) + len(series.references)
    referenced = set()
    for f in out.files:
        ds = pydicom.dcmread(f)
        refs = {s.SeriesInstanceUID for fr in ds.ReferencedFrameOfReferenceSequence
                for st in fr.RTReferencedStudySequence for s in st.RTReferencedSeriesSequence}
        assert len(refs) == 1
        referenced |= refs
    assert referenced == {s.series_instance_uid for s in series.series if s.kind in ("phase", "AVG")}
    item_id, report_item = out.item_ids  # the RTSTRUCTs' item, then the QA report's
    assert len(Outbox(data_dir / "outbox").get(item_id).files) == len(out.files)
    assert [f.sop_class_uid for f in Outbox(data_dir / "outbox").get(report_item).files] == [
        "1.2.840.10008.5.1.4.1.1.104.1"]  # Encapsulated PDF


def test_study_that_keeps_killing_the_worker_fails_instead_of_looping(
    assembled: tuple[Path, str, Any],
) -> None:
    # acks_late + reject_on_worker_lost re-deliver the message of a pool process that died (OOM kill,
    # segfault); without a bound the same study would be processed, and kill the worker, forever.
    from service.store.manifest import set_state

    data_dir, key, _ = assembled
    path = manifest_path(data_dir, key)
    m = load_manifest(path)
    for _ in range(2):  # two earlier attempts died mid-processing: a third one is still made
        set_state(m, "processing", None)
    save_manifest(m, path)
    assert process_study(key, data_dir, _config(), NO_SAM3, []).computed

    m = load_manifest(path)
    set_state(m, "collecting", "content changed after done; re-collecting")
    set_state(m, "complete", None)
    set_state(m, "queued", None)
    for i in range(3):
        set_state(m, "processing", None)
        if i == 1:  # orphan recovery in between counts too
            set_state(m, "queued", "worker w stopped during processing; re-queued")
    save_manifest(m, path)
    seen: list[int] = []
    with pytest.raises(PipelineError, match="interrupted 3 times"):
        process_study(key, data_dir, _config(), lambda: seen.append(1) or NO_SAM3, [])
    m = load_manifest(path)
    assert m.state == "failed" and "interrupted 3 times" in (m.reason or "") and not seen


def test_write_seg_setting_adds_one_seg_per_phase(assembled: tuple[Path, str, Any]) -> None:
    # docs/rtstruct.md: settings.write_seg gives one binary DICOM SEG per phase series next to the RTSTRUCT
    pytest.importorskip("highdicom")
    data_dir, key, series = assembled
    out = process_study(key, data_dir, _config(write_seg=True), NO_SAM3, [])
    segs = [pydicom.dcmread(f) for f in out.files if f.name.startswith("SEG.")]
    assert len(segs) == len(series.phases)
    referenced = {s.ReferencedSeriesSequence[0].SeriesInstanceUID for s in segs}
    assert referenced == {p.series_instance_uid for p in series.phases}
    assert all(s.Modality == "SEG" for s in segs)
    assert any(f.name.startswith("RS.") for f in out.files)

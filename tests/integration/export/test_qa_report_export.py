"""The QA report travels with the RTSTRUCT: the pipeline renders it after the RTSTRUCT's outbox item is
queued, wraps it as a DICOM Encapsulated PDF (same study, own series, deterministic UIDs) and puts it in an
outbox item of its own; a real dcmtk storescp receives it and dciodvfy finds no error."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import EncapsulatedPDFStorage, RTStructureSetStorage

pytest.importorskip("matplotlib")


def _process(src: Any, data_dir: Path, destinations: list[Any], **overrides: Any) -> tuple[str, Any]:
    from itvnode.commands.offline import intake
    from service.settings import load_settings
    from worker.engine_settings import LoadedSegmenter, engine_config
    from worker.pipeline import process_study

    settings = load_settings(**overrides)
    files = sorted(p for p in Path(src.root).rglob("*.dcm") if "ground_truth" not in p.parts)
    ((_, m),) = intake("segment", Path(src.root), files, data_dir, settings)
    queued: list[str] = []
    outcome = process_study(m.study_key, data_dir, engine_config(settings), LoadedSegmenter(None),
                            destinations, enqueue_export=queued.append)
    return m.study_key, (outcome, queued)


def test_encapsulated_pdf_reaches_storescp(
    phantom_dicom_factory: Callable[..., Any], storescp: Callable[..., Any], tmp_path: Path
) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (tests/peers.sh)")
    from service.net.scu import deliver_item
    from service.setting_values import Destination
    from service.store.manifest import load_manifest, manifest_path
    from service.store.outbox import Outbox

    series = phantom_dicom_factory("siemens", with_avg=True)
    scp = storescp()
    data_dir = tmp_path / "data"
    key, (outcome, queued) = _process(series, data_dir, [Destination.parse(scp.address)])

    m = load_manifest(manifest_path(data_dir, key))
    report = m.results["report"]
    assert [Path(p).name for p in report["pages"]] == [f"page-{i}.png" for i in range(1, 5)]
    assert Path(report["document"]).name.startswith("DOC.")
    # the RTSTRUCT's item was queued first; the report's is a second item
    assert len(queued) == 2 and queued[0] == m.results["items"][0] and queued[1] in report["items"]
    assert any(Path(f).name.startswith("DOC.") for f in m.results["files"])  # a re-send sends it too
    assert {f.name for f in outcome.report_files} >= {"report.pdf", "page-1.png"}

    outbox = Outbox(data_dir / "outbox")
    for item_id in queued:
        states = deliver_item(outbox, item_id, "ITVNODE", force=True)
        assert all(st.status == "delivered" for st in states.values()), states

    received = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID): f for f in scp.received()}
    assert set(received) == {RTStructureSetStorage, EncapsulatedPDFStorage}
    doc = pydicom.dcmread(received[EncapsulatedPDFStorage])
    rs = pydicom.dcmread(received[RTStructureSetStorage], stop_before_pixels=True)
    assert doc.StudyInstanceUID == rs.StudyInstanceUID == m.study_instance_uid
    assert doc.SeriesInstanceUID != rs.SeriesInstanceUID and doc.Modality == "DOC"
    assert doc.PatientID == rs.PatientID
    assert doc.SourceInstanceSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    pdf = (data_dir / report["pdf"]).read_bytes()
    assert bytes(doc.EncapsulatedDocument)[: len(pdf)] == pdf and doc.EncapsulatedDocumentLength == len(pdf)

    res = subprocess.run(["dciodvfy", str(received[EncapsulatedPDFStorage])], capture_output=True, text=True,
                         timeout=60)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
    assert errors == [], errors


def test_send_qa_report_off_keeps_the_report_local(
    phantom_dicom_factory: Callable[..., Any], tmp_path: Path
) -> None:
    from service.setting_values import Destination
    from service.store.manifest import load_manifest, manifest_path

    series = phantom_dicom_factory("siemens", with_avg=True)
    data_dir = tmp_path / "data"
    key, (outcome, queued) = _process(series, data_dir, [Destination.parse("PEER@127.0.0.1:9")],
                                      send_qa_report=False)
    m = load_manifest(manifest_path(data_dir, key))
    assert len(queued) == 1 and m.results["report"]["document"] is None
    assert (data_dir / m.results["report"]["pdf"]).is_file()
    assert not any(Path(f).name.startswith("DOC.") for f in m.results["files"])

"""The QA report in the pipeline (rendering: worker.qa_report): its slices are taken while the CT is in
memory, it is rendered after the RTSTRUCT is on its way, and with ``send_qa_report`` its Encapsulated PDF goes
through the outbox as an item of its own. A report never fails a study: failures are logged and recorded."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.setting_values import Destination
from service.store.manifest import Manifest, load_manifest, manifest_path
from service.store.outbox import Outbox
from worker.delivery import EnqueueExport, enqueue_exports, to_outbox
from worker.engine_settings import EngineConfig, roi_styles
from worker.result_files import results_dir
from worker.study_inputs import change_manifest, phases_note

log = logging.getLogger(__name__)


def report_data(
    study_key: str,
    hu: Any,
    geoms: Sequence[Any],
    m: Manifest,
    result: Any,
    ref_volume: tuple[str, Any] | None,
    skipped: dict[str, str],
    algorithm: dict[str, Any],
    config: EngineConfig,
) -> Any:
    """The slices and numbers of the QA report (worker.qa_report.extract), taken while the CT is in memory;
    None (logged) when that fails: the report never fails a study."""
    try:
        from worker.qa_report import extract

        colors = {k: "#{:02x}{:02x}{:02x}".format(*s.color) for k, s in roi_styles(config).items()}
        return extract(
            study_key, hu, geoms[0].spacing, geoms[0].origin, [p.percent for p in m.phases],
            result.masks, result.envelopes, result.qa, skipped=skipped, algorithm=algorithm,
            reference=ref_volume, colors=colors, notes=[phases_note(m)],
        )
    except Exception:
        log.exception("study %s: QA report: could not take its slices; no report", study_key)
        return None


def write_report(
    study_key: str,
    data_dir: Path,
    data: Any,
    config: EngineConfig,
    *,
    destinations: Sequence[Destination] = (),
    outbox: Outbox | None = None,
    enqueue_export: EnqueueExport | None = None,
    uid_prefix: str | None = None,
) -> list[Path]:
    """Render the QA report into ``results/report/`` (report.pdf, page-N.png) and, with ``send_qa_report``,
    its Encapsulated PDF (``results/DOC.<uid>.dcm``) through the outbox to ``destinations`` as an item of
    its own (same retries and dead letters as the RTSTRUCT). Recorded in the manifest (``results.report``;
    the DOC joins ``results.files`` and ``results.items`` so that a re-send sends it too). Returns the files
    written; a failure is logged and recorded, never raised."""
    if data is None:
        return []
    from pydicom.filereader import read_file_meta_info

    from service.dicomio.encapsulated_pdf import build_encapsulated_pdf, write_encapsulated_pdf
    from worker.qa_render import render
    from worker.qa_report import REPORT_DIR

    data_dir = Path(data_dir)
    path = manifest_path(data_dir, study_key)
    out = results_dir(data_dir, study_key)
    t0 = time.perf_counter()
    try:
        files = render(data, out / REPORT_DIR)
        written = [files.pdf, *files.pages]
        doc: Path | None = None
        m = load_manifest(path)
        if config.send_qa_report:
            rtstructs = [f for f in (Path(data_dir) / n for n in m.results.get("files") or [])
                         if f.name.startswith("RS.") and f.is_file()]
            sources = []
            for f in rtstructs:
                meta = read_file_meta_info(f)
                sources.append((str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)))
            ds = build_encapsulated_pdf(
                files.pdf.read_bytes(), study_instance_uid=m.study_instance_uid, identifiers=m.identifiers,
                content_key=str(m.results.get("content_key") or study_key),
                uid_prefix=uid_prefix or config.uid_root, version=int(m.results.get("version") or 1),
                sources=sources,
            )
            doc = write_encapsulated_pdf(ds, out)
            written.append(doc)
        item_ids: list[str] = []
        if doc is not None and destinations and outbox is not None:
            item_ids = to_outbox(outbox, [doc], destinations, study_key)
        secs = round(time.perf_counter() - t0, 4)

        def record(mm: Manifest) -> None:
            mm.results["report"] = {
                "pdf": str(files.pdf.relative_to(data_dir)),
                "pages": [str(p.relative_to(data_dir)) for p in files.pages],
                "document": str(doc.relative_to(data_dir)) if doc else None,
                "items": item_ids,
                "seconds": secs,
            }
            mm.results.setdefault("timings", {})["report"] = secs
            if doc is not None:
                rel = str(doc.relative_to(data_dir))
                mm.results["files"] = [*(f for f in mm.results.get("files") or [] if f != rel), rel]
            if item_ids:
                mm.results["items"] = [*(mm.results.get("items") or []), *item_ids]

        change_manifest(path, record)
    except Exception as exc:
        log.exception("study %s: QA report not written", study_key)
        error = f"{type(exc).__name__}: {exc}"[:500]

        def failed(mm: Manifest) -> None:
            mm.results["report"] = {"error": error}

        try:
            change_manifest(path, failed)
        except Exception:
            log.exception("study %s: could not record the report failure", study_key)
        return []
    log.info("study %s: QA report written in %.2f s%s", study_key, secs,
             f", sent as outbox item(s) {', '.join(item_ids)}" if item_ids else "")
    enqueue_exports(study_key, item_ids, enqueue_export)
    return written

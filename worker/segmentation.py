"""Running the engine on a study (models.engine.segment_volume: SAM 3 per slice, threshold structures,
temporal filter, connectivity, ITV) and what the result records about the model that made it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.store.manifest import Manifest
from service.store.state import StudyState
from worker.engine_settings import EngineConfig, LoadedSegmenter
from worker.report_output import report_data
from worker.result_files import qa_summary, write_results
from worker.stages import Stages
from worker.study_inputs import add_cycle_qa, load_phases

log = logging.getLogger(__name__)


@dataclass
class StudyOutcome:
    """What :func:`worker.pipeline.process_study` did to a study, and the result it computed or re-sent."""

    study_key: str
    state: StudyState
    reason: str | None = None
    files: list[Path] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    computed: bool = False  # False when an earlier result was re-used (re-send) or nothing was done
    content_key: str | None = None  # service.dicomio.uids: what the output UIDs derive from
    version_record: dict[str, Any] = field(default_factory=dict)  # this result's entry in results.versions
    qa: dict[str, Any] = field(default_factory=dict)  # qa_summary() of the computed result
    report: Any = None  # worker.qa_report.ReportData, rendered once the RTSTRUCT is on its way
    report_files: list[Path] = field(default_factory=list)  # report.pdf, page PNGs, the DOC instance


def run_engine(
    study_key: str,
    data_dir: Path,
    m: Manifest,
    config: EngineConfig,
    segmenter: LoadedSegmenter,
    stages: Stages,
    uid_prefix: str | None,
) -> StudyOutcome:
    """Load the phases, run the engine, take the QA report's slices and write the result files; the
    outcome is still ``processing`` (the caller hands it to the outbox)."""
    from models.engine import segment_volume

    hu, geoms, references, ref_volume = load_phases(study_key, data_dir, m, stages)
    with stages.stage("engine"):
        result = segment_volume(
            hu,
            geoms[0].spacing,
            list(config.structures),
            segmenter.segmenter,
            temporal=config.temporal,
            phase_percents=[p.percent for p in m.phases],
            study_key=study_key,
            qa_params=config.qa,
        )
    add_cycle_qa(result.qa, m)
    skipped = dict(result.skipped)
    if segmenter.segmenter is None and segmenter.unavailable_reason:
        # the engine only knows "no segmenter": say why (missing directory, incomplete files, bad weights)
        skipped = {k: segmenter.unavailable_reason for k in skipped}
    report = report_data(study_key, hu, geoms, m, result, ref_volume, skipped, algorithm_record(segmenter),
                         config)
    del hu, ref_volume
    engine_total = stages.timings.pop("engine")
    timing = result.qa.get("timing_s") if isinstance(result.qa, dict) else None
    post = float(timing.get("postprocess", 0.0)) if isinstance(timing, dict) else 0.0
    stages.timings["inference"] = round(max(0.0, engine_total - post), 4)  # SAM 3 + threshold structures
    stages.timings["filter"] = round(post, 4)  # temporal filter, connectivity, envelopes, QA

    if skipped:
        log.warning(
            "study %s: structures SKIPPED: %s", study_key, "; ".join(f"{k}: {v}" for k, v in skipped.items())
        )
    files, record = write_results(
        study_key, data_dir, m, geoms, references, result, skipped, config, rtstruct_algorithm(segmenter),
        {"algorithm": algorithm_record(segmenter)}, stages, uid_prefix,
    )
    return StudyOutcome(study_key, StudyState.PROCESSING, files=files, skipped=skipped, computed=True,
                        content_key=record["content_key"], version_record=record, qa=qa_summary(result.qa),
                        report=report)


def rtstruct_algorithm(seg: LoadedSegmenter) -> Any:
    """The model and adapter as the RTSTRUCT names them (service.dicomio.rtstruct.Algorithm)."""
    from service.dicomio.output import Algorithm

    info = seg.version_info
    if seg.segmenter is None:
        return Algorithm(model="SAM 3", model_version="not loaded", adapter_version="none")
    adapter = info.get("adapter")
    adapter_version = "none"
    if isinstance(adapter, dict):
        adapter_version = f"{adapter.get('name', 'adapter')} {str(adapter.get('sha256', ''))[:12]}".strip()
    name = str(info.get("model", "SAM 3"))
    version = str(info.get("version", "unknown"))
    version = version[len(name) :].strip() if version.startswith(name) else version  # name is its prefix
    model = f"{name} (UNTRAINED)" if info.get("trained") is False else name
    return Algorithm(model=model, model_version=version or "unknown", adapter_version=adapter_version)


def model_record(seg: LoadedSegmenter, skipped: dict[str, str]) -> dict[str, Any]:
    """``results.model`` of a manifest: was SAM 3 loaded for this run, and if not why (``cause`` is a
    ``models.sam3.model_files.ModelCause`` value; ``broken``: a configured model that does not work, which
    makes /health unhealthy); the structures skipped for it."""
    from models.sam3.model_files import BROKEN_CAUSES

    cause = None if seg.segmenter is not None else (seg.unavailable_cause or "load_error")
    return {
        "loaded": seg.segmenter is not None,
        "cause": cause,
        "broken": cause in BROKEN_CAUSES,
        "reason": seg.unavailable_reason if seg.segmenter is None else None,
        "skipped": sorted(skipped),
        "at": time.time(),
    }


def algorithm_record(seg: LoadedSegmenter) -> dict[str, Any]:
    """:func:`rtstruct_algorithm` as ``results.algorithm`` and qa.json keep it, with SAM 3's load state."""
    a = rtstruct_algorithm(seg)
    return {
        "model": a.model,
        "model_version": a.model_version,
        "adapter_version": a.adapter_version,
        "sam3": "loaded" if seg.segmenter is not None else (seg.unavailable_reason or "not loaded"),
    }

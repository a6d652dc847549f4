"""Running the engine on a study (models.engine.segment_volume: SAM 3 per slice, threshold structures,
temporal filter, connectivity, ITV) and what the result records about the model that made it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.store.manifest import Manifest
from service.store.state import StudyState
from worker.engine_settings import EngineConfig, LoadedSegmenter
from worker.report_output import report_data
from worker.result_files import qa_summary, write_results
from worker.stages import Stages
from worker.study_inputs import add_cycle_qa, load_phases, open_phases, read_phase, read_references

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
    *,
    overlap: bool = True,
    inputs: Callable[..., Inputs] | None = None,
) -> StudyOutcome:
    """Read the phases and run the engine on them, overlapped per phase (:func:`segment_overlapped`), take
    the QA report's slices and write the result files; the outcome is still ``processing`` (the caller hands
    it to the outbox). ``overlap=False``: read everything, then segment (the reference the overlap equals).
    ``inputs``: what reads and segments instead (a split study's finishing task: worker.study_split)."""
    t0 = time.perf_counter()
    run = inputs or (segment_overlapped if overlap else segment_sequential)
    result, hu, geoms, references, ref_volume = run(study_key, data_dir, m, config, segmenter, stages)
    add_cycle_qa(result.qa, m)
    skipped = dict(result.skipped)
    if segmenter.segmenter is None and segmenter.unavailable_reason:
        # the engine only knows "no segmenter": say why (missing directory, incomplete files, bad weights)
        skipped = {k: segmenter.unavailable_reason for k in skipped}
    report = report_data(study_key, hu, geoms, m, result, ref_volume, skipped, algorithm_record(segmenter),
                         config)
    del hu, ref_volume

    if skipped:
        log.warning(
            "study %s: structures SKIPPED: %s", study_key, "; ".join(f"{k}: {v}" for k, v in skipped.items())
        )
    files, record = write_results(
        study_key, data_dir, m, geoms, references, result, skipped, config, rtstruct_algorithm(segmenter),
        {"algorithm": algorithm_record(segmenter)}, stages, uid_prefix,
    )
    stages.timings["processing"] = round(time.perf_counter() - t0, 4)  # read .. RTSTRUCT written
    return StudyOutcome(study_key, StudyState.PROCESSING, files=files, skipped=skipped, computed=True,
                        content_key=record["content_key"], version_record=record, qa=qa_summary(result.qa),
                        report=report)


Inputs = tuple[Any, Any, list[Any], dict[str, Any], tuple[str, Any] | None]


def segment_overlapped(study_key: str, data_dir: Path, m: Manifest, config: EngineConfig,
                       segmenter: LoadedSegmenter, stages: Stages) -> Inputs:
    """Phase k+1 read while the segmenter works on phase k and phase k-1's CPU work runs
    (:func:`models.phase_overlap.run_phases`); the references are read after the last phase, still beside
    the segmenter; then the cross-phase post-processing. ``(result, hu, geometries, references, the QA
    report's reference volume)``; busy times into ``stages.timings`` (:func:`record_busy`)."""
    reader = open_phases(m, data_dir, stages)
    geoms = reader.geoms
    log.info("study %s: volume %s, spacing %s mm", study_key, reader.hu.shape, geoms[0].spacing)
    refs: list[tuple[dict[str, Any], tuple[str, Any] | None]] = []

    def phases() -> Iterator[tuple[int, Any]]:
        for p in range(reader.n_phases):
            yield p, read_phase(reader, p)
        refs.append(read_references(study_key, data_dir, m, geoms[0]))

    result, feed = _segment(study_key, reader.hu, geoms[0].spacing, phases(), config, segmenter, m, stages,
                            overlap=True)
    stages.timings["load"] = round(stages.timings.get("load", 0.0) + feed, 4)
    references, ref_volume = refs[0]
    return result, reader.hu, geoms, references, ref_volume


def segment_sequential(study_key: str, data_dir: Path, m: Manifest, config: EngineConfig,
                       segmenter: LoadedSegmenter, stages: Stages) -> Inputs:
    """Every phase read, then segmented phase after phase without overlap (the same result)."""
    from models.phase_overlap import array_phases

    hu, geoms, references, ref_volume = load_phases(study_key, data_dir, m, stages)
    result, _ = _segment(study_key, hu, geoms[0].spacing, array_phases(hu), config, segmenter, m, stages,
                         overlap=False)
    return result, hu, geoms, references, ref_volume


def _segment(study_key: str, hu: Any, spacing: Any, phases: Iterator[tuple[int, Any]], config: EngineConfig,
             segmenter: LoadedSegmenter, m: Manifest, stages: Stages, *, overlap: bool) -> tuple[Any, float]:
    """The engine over ``phases`` (they fill ``hu``), then across phases: ``(EngineResult, seconds spent
    waiting for ``phases``)``."""
    from models.phase_overlap import run_phases
    from models.phase_segmentation import PhaseSegmentation

    seg = PhaseSegmentation(hu.shape, spacing, list(config.structures), segmenter.segmenter,
                            study_key=study_key)
    with stages.stage("segment"):
        times = run_phases(seg, phases, overlap=overlap)
    with stages.stage("filter"):
        result = seg.finish(hu, config.temporal, qa_params=config.qa,
                            phase_percents=[p.percent for p in m.phases])
    del stages.timings["segment"]
    record_busy(stages, seg.busy, times.wall)
    return result, times.feed


def record_busy(stages: Stages, busy: dict[str, float], overlap_wall: float) -> None:
    """``results.timings``: busy seconds per stage (``segmenter``: its predict calls; ``phase_cpu``:
    thresholds, slice choice, side split; ``filter``: cross-phase post-processing), ``inference`` = segmenter
    + phase_cpu (its meaning before the overlap), the overlapped section's wall time and the segmenter's idle
    time in it (``segmenter_idle``: the GPU waiting for the node)."""
    t = stages.timings
    t["segmenter"] = round(busy["segmenter"], 4)
    t["phase_cpu"] = round(busy["phase_cpu"], 4)
    t["inference"] = round(busy["segmenter"] + busy["phase_cpu"], 4)
    t["filter"] = round(busy["postprocess"], 4)
    t["overlap_wall"] = round(overlap_wall, 4)
    t["segmenter_idle"] = round(max(0.0, overlap_wall - busy["segmenter"]), 4)


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

"""The segmentation pipeline of one study, a plain function (the Celery task and ``itvnode segment`` call it).

manifest -> 4D HU volume + geometry (service.dicomio.volume) -> engine (models.engine.segment_volume: SAM 3
per slice,
temporal filter, connectivity, ITV) -> RTSTRUCT(s) (service.dicomio.rtstruct) -> result files kept with the
study -> outbox (service.store.outbox) -> export enqueued.

State lives in the manifest (``processing`` -> ``exporting`` -> ``done`` | ``failed``) with the reason and the
timings of each stage under ``results``; nothing else is needed to resume or to report.

Idempotency (a re-delivered or re-queued message):

* the same task id that already finished the study does nothing;
* a finished study (``exporting``/``done``) whose result files are kept is not computed again: its outbox item
  is re-enqueued while still active, or its files are put into a fresh outbox item (same SOP Instance UIDs, so
  the receiver replaces instead of duplicating) when the earlier delivery is finished;
* otherwise the study is computed; output UIDs are deterministic, so a computation interrupted by a crash and
  run again produces the same objects.

Versions (a late phase or a late AVG after ``done``): the assembler re-collects the study and queues it again;
the new inputs give a new content key (service.dicomio.uids), hence new SOP Instance and Series UIDs, and the
next
version number (``results.versions``: one record per distinct content key, never reset). The receiver then
holds both versions side by side; the descriptions say which version and which phases each one used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from service.ops.reconcile import ReconcilePolicy, schedule_retry
from service.setting_values import Destination
from service.store.durable import DIR_MODE
from service.store.layout import DataLayout
from service.store.manifest import (
    Manifest,
    load_manifest,
    manifest_path,
    set_state,
    update_manifest,
    utcnow_iso,
)
from service.store.outbox import Outbox, RetryPolicy
from worker.engine_settings import EngineConfig, LoadedSegmenter, roi_styles

log = logging.getLogger(__name__)

RESULTS_DIR = "results"  # data_dir/studies/<key>/results: the RTSTRUCT(s) and qa.json of the last run
QA_FILE = "qa.json"
RUNNABLE_STATES = frozenset({"complete", "queued", "processing", "failed", "exporting", "done"})
# Attempts that died mid-processing (pool process killed: OOM, segfault) before a study is failed instead of
# being re-delivered forever (acks_late + reject_on_worker_lost re-queue the message of a lost worker).
MAX_INTERRUPTED = 3

EnqueueExport = Callable[[str], Any]


class PipelineError(RuntimeError):
    """A study cannot be processed; the message is the reason recorded in the manifest."""


@dataclass
class StudyOutcome:
    study_key: str
    state: str
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


class _Stages:
    """Wall time per stage, in the order run."""

    def __init__(self, study_key: str) -> None:
        self.study_key = study_key
        self.timings: dict[str, float] = {}
        self.current = ""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.current = name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 4)
        log.info("study %s: %s done in %.2f s", self.study_key, name, self.timings[name])


def results_dir(data_dir: Path, study_key: str) -> Path:
    return DataLayout(data_dir).results(study_key)


def _receive_timings(data_dir: Path, m: Manifest) -> dict[str, float]:
    """``receive`` (first to last instance) and ``quiet`` (last instance to queued) from the spool index."""
    from service.store.spool_index import SpoolIndexReader

    out: dict[str, float] = {}
    try:
        span = SpoolIndexReader(DataLayout(data_dir).spool_index).receive_span(m.study_instance_uid)
    except sqlite3.Error as exc:
        log.debug("study %s: no receive timings: %s", m.study_key, exc)
        return out
    if span is None:
        return out
    first, last = span
    out["receive"] = round(last - first, 4)
    # the assembler's decision: the first "complete" after the last "collecting"
    start = max((i for i, h in enumerate(m.history) if h.state == "collecting"), default=-1)
    assembled = [h.at for h in m.history[start + 1 :] if h.state in ("complete", "queued")][:1]
    if assembled:
        try:
            at = datetime.fromisoformat(assembled[-1].replace("Z", "+00:00")).timestamp()
            out["quiet"] = round(max(0.0, at - last), 4)
        except ValueError:
            pass
    return out


def _update(path: Path, fn: Callable[[Manifest], None]) -> Manifest:
    def apply(m: Manifest) -> Manifest:
        fn(m)
        return m

    return update_manifest(path, apply)


def _kept_files(data_dir: Path, m: Manifest) -> list[Path]:
    names = m.results.get("files") or []
    files = [Path(data_dir) / n for n in names]
    return files if files and all(f.is_file() for f in files) else []


def _worker_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "ppid": os.getppid()}


def _algorithm(seg: LoadedSegmenter) -> Any:
    from service.dicomio.rtstruct import Algorithm

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


def process_study(
    study_key: str,
    data_dir: Path,
    config: EngineConfig,
    segmenter: LoadedSegmenter | Callable[[], LoadedSegmenter],
    destinations: Sequence[Destination],
    *,
    enqueue_export: EnqueueExport | None = None,
    retry_policy: RetryPolicy | None = None,
    task_id: str | None = None,
    uid_prefix: str | None = None,
    worker_info: dict[str, Any] | None = None,
    retry: ReconcilePolicy | None = None,
) -> StudyOutcome:
    """Segment the study ``study_key`` under ``data_dir`` and hand its RTSTRUCT(s) to the outbox.

    ``segmenter``: the process's :class:`LoadedSegmenter`, or a function returning it (called once the study
    is marked ``processing``; its time is the ``model`` stage). Its ``segmenter`` None: SAM 3 structures are
    skipped with its ``unavailable_reason``). ``destinations``: where the export sends the result (none: the
    result is kept with the study and the study is ``done`` with a note). ``enqueue_export(item_id)`` queues
    the delivery; None leaves that to the outbox sweep. Failures are recorded in the manifest (state
    ``failed`` with the stage and reason) and re-raised.
    """
    data_dir = Path(data_dir)
    path = manifest_path(data_dir, study_key)
    if not path.is_file():
        raise PipelineError(f"study {study_key}: no manifest at {path}")
    m = load_manifest(path)
    if m.state not in RUNNABLE_STATES:
        reason = f"state is {m.state!r}{f' ({m.reason})' if m.reason else ''}: not assembled, nothing to do"
        log.warning("study %s: %s", study_key, reason)
        return StudyOutcome(study_key, m.state, reason)

    handled = list(m.results.get("task_ids") or [])
    if task_id is not None and task_id in handled and m.state in ("exporting", "done"):
        log.info(
            "study %s: task %s already finished this study (duplicate delivery): nothing to do",
            study_key,
            task_id,
        )
        return StudyOutcome(
            study_key, m.state, "duplicate delivery", item_ids=list(m.results.get("items", []))
        )

    outbox = Outbox(data_dir / "outbox", retry_policy or RetryPolicy())
    kept = _kept_files(data_dir, m)
    export_failed = m.state == "failed" and bool(m.results.get("items"))
    if kept and (m.state in ("exporting", "done") or export_failed):
        resent = _resend(path, m, kept, outbox, destinations, enqueue_export, task_id)
        report = m.results.get("report") or {}
        kept_report = [data_dir / str(f) for f in [report.get("pdf"), *(report.get("pages") or [])] if f]
        resent.report_files = [f for f in kept_report if f.is_file()]  # already rendered: hand them out
        return resent

    interrupted = interrupted_attempts(m)
    if interrupted >= MAX_INTERRUPTED:
        reason = (
            f"setup: processing was interrupted {interrupted} times (the worker process died: out of "
            "memory?); not retried automatically"
        )

        def give_up(mm: Manifest) -> None:
            if mm.state in ("processing", "queued"):
                set_state(mm, "failed", reason)

        _update(path, give_up)
        log.error("study %s FAILED: %s", study_key, reason)
        raise PipelineError(reason)

    stages = _Stages(study_key)
    stages.timings.update(_receive_timings(data_dir, m))

    def start(mm: Manifest) -> None:
        set_state(mm, "processing", None)
        mm.task_id = task_id
        mm.results = {
            "timings": dict(stages.timings),
            "worker": worker_info or _worker_identity(),
            "task_ids": handled,
            "started_at": time.time(),
            "versions": list(mm.results.get("versions") or []),  # every result this study has had
        }

    _update(path, start)
    log.info("study %s: processing (task %s, %d phases)", study_key, task_id, len(m.phases))
    try:
        with stages.stage("model"):
            segmenter = segmenter() if callable(segmenter) else segmenter
        outcome = _compute(study_key, data_dir, m, config, segmenter, stages, uid_prefix)
        with stages.stage("outbox"):
            item_ids = _to_outbox(outbox, outcome.files, destinations, study_key)
    except BaseException as exc:  # SoftTimeLimitExceeded is a BaseException in some Celery versions
        reason = f"{stages.current or 'setup'}: {type(exc).__name__}: {exc}"
        if isinstance(exc, PipelineError | ValueError):
            reason = f"{stages.current}: {exc}"

        transient = retry is not None and is_transient(exc, stages.current)

        def failed(mm: Manifest) -> None:
            if transient and retry is not None and mm.state == "processing":
                schedule_retry(mm, reason, retry, time.time())  # queued with backoff, or failed at the limit
            else:
                set_state(mm, "failed", reason[:2000])
            mm.results["timings"] = dict(stages.timings)

        try:
            _update(path, failed)
        except Exception:  # never hide the original error behind a manifest problem
            log.exception("study %s: could not record the failure", study_key)
        log.error("study %s FAILED at %s: %s", study_key, stages.current, reason)
        raise

    outcome.item_ids = item_ids
    seg_loaded = segmenter if isinstance(segmenter, LoadedSegmenter) else LoadedSegmenter(None)
    outcome.timings = stages.timings
    rel_files = [str(f.relative_to(data_dir)) for f in outcome.files]
    if item_ids:
        state, note = "exporting", None
    else:
        state = "done"
        note = f"no destinations configured: RTSTRUCT kept in {results_dir(data_dir, study_key)}"
        log.warning("study %s: %s", study_key, note)
    note = "; ".join(n for n in (note, skipped_note(outcome.skipped)) if n) or None

    def finished(mm: Manifest) -> None:
        set_state(mm, state, note[:2000] if note else None)
        uids = outcome_uids(outcome.files)
        versions = [v for v in mm.results.get("versions") or []
                    if v.get("content_key") != outcome.content_key]
        versions.append({**outcome.version_record, "sop_instance_uids": uids, "at": utcnow_iso()})
        mm.results["versions"] = sorted(versions, key=lambda v: int(v.get("version", 0)))
        mm.results.update(
            {
                "timings": stages.timings,
                "files": rel_files,
                "items": item_ids,
                "skipped": outcome.skipped,
                "task_ids": [*handled, task_id] if task_id else handled,
                "finished_at": time.time(),
                "rtstruct_sop_instance_uids": uids,
                "version": outcome.version_record.get("version"),
                "content_key": outcome.content_key,
                "algorithm": _algorithm_dict(seg_loaded),
                "qa": outcome.qa,
            }
        )
        # what the model was for this run: /health and /metrics read it (service.ops.health)
        if outcome.computed:
            mm.results["model"] = model_record(seg_loaded, outcome.skipped)

    _update(path, finished)
    outcome.state, outcome.reason = state, note
    _enqueue(study_key, item_ids, enqueue_export)
    # the QA report after the RTSTRUCT is on its way: rendering never delays it, and a failure is logged only
    report, outcome.report = outcome.report, None
    outcome.report_files = write_report(
        study_key, data_dir, report, config, destinations=destinations, outbox=outbox,
        enqueue_export=enqueue_export, uid_prefix=uid_prefix,
    )
    if outcome.report_files and destinations:  # the report's own item, after the RTSTRUCT's
        outcome.item_ids = list(load_manifest(path).results.get("items") or item_ids)
    return outcome


@dataclass
class ContourOutcome:
    """What :func:`process_contours` wrote and found."""

    study_key: str
    files: list[Path]
    qa: dict[str, Any]
    warnings: list[str]
    timings: dict[str, float]
    report_files: list[Path] = field(default_factory=list)  # report.pdf, page PNGs, the DOC instance


def process_contours(
    study_key: str,
    data_dir: Path,
    config: EngineConfig,
    rtstructs: Sequence[Path],
    roi_map: dict[str, str],
    *,
    folder_series: Sequence[str] = (),
    uid_prefix: str | None = None,
) -> ContourOutcome:
    """``itvnode itv``: the pipeline of :func:`process_study` with contours from RTSTRUCTs instead of SAM 3.

    manifest -> 4D HU volume + geometry (:func:`_load`) -> the ROIs ``roi_map`` maps, placed on their phases
    (service.dicomio.rtstruct_read.read_phase_contours) -> temporal filter, connectivity, envelopes, QA
    (models.engine.postprocess_volume, the engine's own post-processing) -> RTSTRUCT(s) + qa.json
    (:func:`_write_results`). Nothing is queued or sent. Output UIDs derive from the study key and a digest
    of the CT instances (manifest fingerprint) and the bytes of the RTSTRUCTs used, so different input
    contours give new objects. Raises :class:`PipelineError` with a message for the user.
    """
    import hashlib

    from models.engine import output_structures, postprocess_volume
    from service.dicomio.rtstruct import Algorithm, roi_name
    from service.dicomio.rtstruct_read import RTStructReadError, read_phase_contours

    data_dir = Path(data_dir)
    path = manifest_path(data_dir, study_key)
    if not path.is_file():
        raise PipelineError(f"study {study_key}: no manifest at {path}")
    m = load_manifest(path)
    if m.state not in RUNNABLE_STATES:
        raise PipelineError(f"state is {m.state!r}{f' ({m.reason})' if m.reason else ''}")
    stages = _Stages(study_key)
    hu, geoms, references, ref_volume = _load(study_key, data_dir, m, stages)
    percents = [p.percent for p in m.phases]
    wanted = [o.name for o in output_structures(list(config.structures))]
    with stages.stage("contours"):
        try:
            pc = read_phase_contours(
                rtstructs, geoms, percents, roi_map, folder_series=set(folder_series), structures=wanted
            )
        except RTStructReadError as exc:
            raise PipelineError(str(exc)) from exc
    with stages.stage("filter"):
        result = postprocess_volume(
            pc.masks,
            hu,
            geoms[0].spacing,
            list(config.structures),
            config.temporal,
            phase_percents=percents,
            study_key=study_key,
            qa_params=config.qa,
        )
    _add_cycle_qa(result.qa, m)
    no_contour_note = {k: "no input contour on phase(s) " + ", ".join(f"{p:g} %" for p in v)
                       for k, v in pc.missing.items()}
    report = report_data(
        study_key, hu, geoms, m, result, ref_volume, no_contour_note,
        {"model": "input contours", "model_version": f"{len(pc.files)} RTSTRUCT(s)",
         "adapter_version": "none"},
        config,
    )
    del hu, ref_volume
    warnings = [
        f"{k}: no input contour on phase(s) " + ", ".join(f"{p:g} %" for p in v)
        for k, v in pc.missing.items()
    ]
    removed: dict[str, dict[str, int]] = {}
    for k, sq in result.qa["structures"].items():
        rep = sq.get("cleanup") or {}
        rm = {f"{percents[i]:g}": int(n) for i, n in enumerate(rep.get("removed_temporal") or []) if n}
        if rm:
            removed[k] = rm
            warnings.append(
                f"{k}: temporal filter removed "
                + ", ".join(f"{n} component(s) on phase {p} %" for p, n in rm.items())
            )
    digest = hashlib.sha256((m.fingerprint or "").encode())
    for f in sorted(pc.files):
        digest.update(hashlib.sha256(Path(f).read_bytes()).digest())
    algorithm = Algorithm(
        model="input contours",
        model_version=f"{len(pc.files)} RTSTRUCT(s) {digest.hexdigest()[:12]}",
        adapter_version="none",
        generation="SEMIAUTOMATIC",
    )
    no_contour = {roi_name(k, p): "no input contour" for k, v in pc.missing.items() for p in v}
    files, _record = _write_results(
        study_key, data_dir, m, geoms, references, result, no_contour, config, algorithm,
        {
            "algorithm": {
                "model": algorithm.model,
                "model_version": algorithm.model_version,
                "generation": algorithm.generation,
            },
            "rtstructs": [Path(f).name for f in pc.files],
            "roi_map": roi_map,
            "rois": pc.rois,
            "unmapped_rois": pc.unmapped,
            "ignored_rtstructs": pc.ignored,
            "missing": pc.missing,
            "removed_temporal": removed,
            "warnings": warnings,
        },
        stages, uid_prefix,
    )
    qa = json.loads((results_dir(data_dir, study_key) / QA_FILE).read_text())
    report_files = write_report(study_key, data_dir, report, config, uid_prefix=uid_prefix)
    return ContourOutcome(study_key, files, qa, warnings, stages.timings, report_files)


def is_transient(exc: BaseException, stage: str) -> bool:
    """Whether another attempt may succeed: time limits, loading the model, memory, I/O, the broker. Bad
    input (PipelineError, ValueError, ...) fails at once: a retry would fail the same way."""
    if isinstance(exc, PipelineError | ValueError | KeyError | TypeError | IndexError | AssertionError):
        return stage == "model"
    if type(exc).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded", "WorkerLostError"):
        return True
    if stage == "model" or isinstance(exc, MemoryError | OSError | ConnectionError | TimeoutError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA" in text or "out of memory" in text)


def interrupted_attempts(m: Manifest) -> int:
    """How many times in a row processing started and never finished (no other state in between but
    ``queued``, which orphan recovery writes)."""
    n = 0
    for h in reversed(m.history):
        if h.state == "processing":
            n += 1
        elif h.state != "queued":
            break
    return n if m.state in ("processing", "queued") else 0


def skipped_note(skipped: dict[str, str] | None) -> str | None:
    """The reason text that keeps skipped structures visible in ``itvnode status``."""
    if not skipped:
        return None
    return "skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())


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


def _algorithm_dict(seg: LoadedSegmenter) -> dict[str, Any]:
    a = _algorithm(seg)
    return {
        "model": a.model,
        "model_version": a.model_version,
        "adapter_version": a.adapter_version,
        "sam3": "loaded" if seg.segmenter is not None else (seg.unavailable_reason or "not loaded"),
    }


def outcome_uids(files: Sequence[Path]) -> list[str]:
    from pydicom.filereader import read_file_meta_info

    return [str(read_file_meta_info(f).MediaStorageSOPInstanceUID) for f in files]


def _load(
    study_key: str, data_dir: Path, m: Manifest, stages: _Stages
) -> tuple[Any, list[Any], dict[str, Any], tuple[str, Any] | None]:
    """The ``load`` stage: ``(hu (P, Z, Y, X), phase geometries, reference geometries by kind, (kind, HU
    volume) of the QA report's reference series (AVG, else MIP; None without one on the phases' grid))``."""
    from service.dicomio.geometry import VolumeError
    from service.dicomio.volume import read_geometry, read_phases, read_series

    if not m.phases:
        raise PipelineError("the manifest lists no phases")
    with stages.stage("load"):
        try:
            hu, geoms = read_phases(m, data_dir)
        except VolumeError as exc:
            raise PipelineError(f"phases rejected: {exc}") from exc
        references: dict[str, Any] = {}
        ref_volume: tuple[str, Any] | None = None
        for ref in m.references:
            try:
                g = read_geometry([data_dir / f for f in ref.files])  # referenced: geometry only
            except VolumeError as exc:
                log.warning(
                    "study %s: reference series %s (%s) not used: %s",
                    study_key,
                    ref.kind,
                    ref.series_instance_uid,
                    exc,
                )
                continue
            if g.same_grid(geoms[0]):
                references[ref.kind] = g
                if ref.kind == "AVG" or (ref.kind == "MIP" and ref_volume is None):
                    ref_volume = (ref.kind, ref.files)
            else:
                log.warning(
                    "study %s: reference series %s is on another grid: not referenced", study_key, ref.kind
                )
        if ref_volume is not None:  # the QA report draws on it: the one reference read in full
            kind, files = ref_volume
            try:
                ref_volume = (kind, read_series([data_dir / f for f in files])[0])
            except VolumeError as exc:
                log.warning("study %s: %s not readable for the QA report: %s", study_key, kind, exc)
                ref_volume = None
    log.info("study %s: volume %s, spacing %s mm", study_key, hu.shape, geoms[0].spacing)
    return hu, geoms, references, ref_volume


def _compute(
    study_key: str,
    data_dir: Path,
    m: Manifest,
    config: EngineConfig,
    segmenter: LoadedSegmenter,
    stages: _Stages,
    uid_prefix: str | None,
) -> StudyOutcome:
    from models.engine import segment_volume

    hu, geoms, references, ref_volume = _load(study_key, data_dir, m, stages)
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
    _add_cycle_qa(result.qa, m)
    skipped = dict(result.skipped)
    if segmenter.segmenter is None and segmenter.unavailable_reason:
        # the engine only knows "no segmenter": say why (missing directory, incomplete files, bad weights)
        skipped = {k: segmenter.unavailable_reason for k in skipped}
    report = report_data(study_key, hu, geoms, m, result, ref_volume, skipped, _algorithm_dict(segmenter),
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
    files, record = _write_results(
        study_key, data_dir, m, geoms, references, result, skipped, config, _algorithm(segmenter),
        {"algorithm": _algorithm_dict(segmenter)}, stages, uid_prefix,
    )
    return StudyOutcome(study_key, "processing", files=files, skipped=skipped, computed=True,
                        content_key=record["content_key"], version_record=record, qa=qa_summary(result.qa),
                        report=report)


def _write_results(
    study_key: str,
    data_dir: Path,
    m: Manifest,
    geoms: Sequence[Any],
    references: dict[str, Any],
    result: Any,
    skipped: dict[str, str],
    config: EngineConfig,
    algorithm: Any,
    qa_extra: dict[str, Any],
    stages: _Stages,
    uid_prefix: str | None,
) -> tuple[list[Path], dict[str, Any]]:
    """The ``rtstruct`` stage: RTSTRUCT(s) (and SEGs with ``write_seg``) of an engine result and ``qa.json``
    (the engine's QA, ``skipped``, timings, layout, files, the result version, then ``qa_extra``), swapped
    into the study's results folder at once. Output UIDs derive from the inputs used (service.dicomio.uids);
    the version counts distinct results of this study. Returns the result files and the version record."""
    from service.dicomio.rtstruct import build_rtstructs, inputs_note, result_content_key, write_rtstruct
    from service.dicomio.uids import settings_digest
    from service.store.spool_index import read_revisions

    with stages.stage("rtstruct"):
        key = result_content_key(
            study_key=study_key, geometries=geoms, references=references, algorithm=algorithm,
            layout=config.layout, settings_digest=settings_digest(config),
            revisions=read_revisions(Path(data_dir) / "spool", m.study_instance_uid),
        )
        version = result_version(m, key)
        record = {
            "version": version,
            "content_key": key,
            "phases": [p.percent for p in m.phases],
            "phase_labels": [p.label for p in m.phases],
            "phase_series": [p.series_instance_uid for p in m.phases],
            "references": sorted(references),
        }
        log.info("study %s: result version %d (content key %s, %s)", study_key, version, key,
                 inputs_note([p.percent for p in m.phases], list(references), [p.label for p in m.phases]))
        datasets = build_rtstructs(
            study_key=study_key,
            identifiers=m.identifiers,
            geometries=geoms,
            phase_percents=[p.percent for p in m.phases],
            phase_labels=[p.label for p in m.phases],
            masks=result.masks,
            envelopes=result.envelopes,
            styles=roi_styles(config),
            algorithm=algorithm,
            layout=config.layout,
            references=references,
            skipped=skipped,
            uid_prefix=uid_prefix or config.uid_root,
            holes=config.rtstruct_holes,
            content_key=key,
            version=version,
            qa_notes=_qa_notes(result.qa),
            phases_note=_phases_note(m),
        )
        out_dir = results_dir(data_dir, study_key)
        for stale in out_dir.parent.glob(f".{RESULTS_DIR}.*"):  # left by a worker killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        staging = out_dir.with_name(f".{RESULTS_DIR}.{uuid.uuid4().hex}")
        staging.mkdir(DIR_MODE, parents=True)
        try:
            files = [write_rtstruct(ds, staging) for ds in datasets]
            if config.write_seg:
                files += _write_segs(
                    study_key, data_dir, m, geoms, result, config, algorithm, uid_prefix, staging,
                    key, version,
                )
            qa = {
                "study_key": study_key,
                "qa": _jsonable(result.qa),
                "skipped": skipped,
                "timings": stages.timings,
                "layout": config.layout,
                "files": [f.name for f in files],
                "version": record,
                **_jsonable(qa_extra),
            }
            (staging / QA_FILE).write_text(json.dumps(qa, indent=1) + "\n")
            if out_dir.exists():
                shutil.rmtree(out_dir)
            staging.rename(out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return [out_dir / f.name for f in files], record


def result_version(m: Manifest, key: str) -> int:
    """The version number of the result with content key ``key``: its earlier number when this content was
    already produced (a re-run replaces it), else one more than the highest so far (1 for the first)."""
    versions = [v for v in m.results.get("versions") or [] if isinstance(v, dict)]
    for v in versions:
        if v.get("content_key") == key:
            return int(v["version"])
    return max((int(v.get("version", 0)) for v in versions), default=0) + 1


def _add_cycle_qa(qa: dict[str, Any], m: Manifest) -> None:
    """Phases used vs expected (the manifest's cycle, decided by the assembler) into the QA numbers."""
    from models.post.qa import cycle_qa

    if m.cycle is not None:
        cycle_qa(qa, m.cycle.used, m.cycle.expected, m.cycle.missing, released=m.released is not None)
    else:  # a manifest written before cycles were recorded
        cycle_qa(qa, len(m.phases), len(m.phases))


def _phases_note(m: Manifest) -> str:
    """What the envelopes are built from, for the RTSTRUCT: ``ITV from 3 of 10 phases: 10 %, ... missing``."""
    if m.cycle is None:
        return f"ITV from {len(m.phases)} of {len(m.phases)} phases"
    if m.cycle.complete:
        return f"ITV from {m.cycle.summary()}"
    how = "released by admin" if m.released else "processed as set by incomplete_cycle"
    return f"ITV from {m.cycle.describe()} ({how})"


def _qa_notes(qa: dict[str, Any]) -> list[str]:
    """QA warnings for the RTSTRUCT description; the phases one is said by :func:`_phases_note`."""
    return [str(f.get("text")) for f in qa.get("flags") or [] if f.get("kind") != "phases"]


def qa_summary(qa: dict[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of the QA for ``status`` and ``/metrics`` (qa.json has everything)."""
    motion = {name: s.get("motion_mm") for name, s in (qa.get("structures") or {}).items()
              if any(e.get("source") == name for e in (qa.get("envelopes") or {}).values())}
    return {
        "phases": qa.get("phases"),
        "warnings": list(qa.get("warnings") or []),
        "flag_kinds": [f.get("kind", "") for f in qa.get("flags") or []],
        "envelopes": {k: {kk: v.get(kk) for kk in ("volume_cc", "source", "ratio_to_largest_phase")}
                      for k, v in (qa.get("envelopes") or {}).items()},
        "motion_mm": motion,
    }


def _write_segs(
    study_key: str,
    data_dir: Path,
    m: Manifest,
    geoms: Sequence[Any],
    result: Any,
    config: EngineConfig,
    algorithm: Any,
    uid_prefix: str | None,
    out_dir: Path,
    content_key: str,
    version: int,
) -> list[Path]:
    """Setting ``write_seg``: one binary DICOM SEG per phase series (that phase's ROIs and the envelopes).

    SEG is optional next to the RTSTRUCT: a phase it cannot be built for is logged and left out.
    """
    from service.dicomio.rtstruct import roi_name

    try:
        from service.dicomio.seg import build_seg, write_seg
    except ImportError as exc:  # pragma: no cover - highdicom is the optional extra "seg"
        log.warning("study %s: write_seg is set but DICOM SEG needs highdicom (extra 'seg'): %s",
                    study_key, exc)
        return []
    out: list[Path] = []
    for p, (phase, g) in enumerate(zip(m.phases, geoms, strict=True)):
        segments = {roi_name(n, phase.percent, phase.label): v[p] for n, v in result.masks.items()}
        segments.update(result.envelopes)
        try:
            ds = build_seg(
                study_key=study_key,
                source_files=[data_dir / f for f in phase.files],
                geometry=g,
                segments=segments,
                styles=roi_styles(config),
                algorithm=algorithm,
                uid_prefix=uid_prefix or config.uid_root,
                content_key=content_key,
                series_number=951 + 100 * (version - 1),
            )
        except (ImportError, ValueError) as exc:
            log.warning("study %s: no DICOM SEG for phase %g: %s", study_key, phase.percent, exc)
            continue
        out.append(write_seg(ds, out_dir))
    return out


def _jsonable(obj: Any) -> Any:
    """QA numbers as plain JSON (numpy scalars/arrays converted)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _to_outbox(
    outbox: Outbox, files: Sequence[Path], destinations: Sequence[Destination], study_key: str
) -> list[str]:
    if not destinations or not files:
        return []
    item = outbox.put(list(files), list(destinations), study_key=study_key)
    if item.finished:
        # This exact result was already delivered (e.g. a crash after export, then a re-run): send it again
        # as a new item; the receiver replaces the objects (same SOP Instance UIDs).
        item = outbox.put(
            list(files),
            list(destinations),
            study_key=study_key,
            item_id=f"{item.item_id[:15]}-{uuid.uuid4().hex[:8]}",
        )
    return [item.item_id]


def _enqueue(study_key: str, item_ids: Sequence[str], enqueue_export: EnqueueExport | None) -> None:
    if enqueue_export is None:
        return
    for item_id in item_ids:
        try:
            enqueue_export(item_id)
            log.info("study %s: export of outbox item %s enqueued", study_key, item_id)
        except Exception as exc:  # the outbox sweep re-enqueues due items
            log.error(
                "study %s: could not enqueue export of %s (%s); the outbox sweep will retry",
                study_key,
                item_id,
                exc,
            )


def _resend(
    path: Path,
    m: Manifest,
    kept: list[Path],
    outbox: Outbox,
    destinations: Sequence[Destination],
    enqueue_export: EnqueueExport | None,
    task_id: str | None,
) -> StudyOutcome:
    """A finished study asked again: send the kept result (same UIDs) instead of computing it twice."""
    key = m.study_key
    active = [i for i in (m.results.get("items") or []) if (item := outbox.find(i)) and not item.finished]
    item_ids = active or _to_outbox(outbox, kept, destinations, key)
    log.info(
        "study %s: already computed (%s); re-sending %d file(s) via outbox item(s) %s",
        key,
        m.state,
        len(kept),
        ", ".join(item_ids) or "(none: no destinations)",
    )

    def note(mm: Manifest) -> None:
        if item_ids:
            set_state(mm, "exporting", "re-send of the kept result")
        mm.results["items"] = item_ids or mm.results.get("items", [])
        if task_id:
            mm.results["task_ids"] = [*(mm.results.get("task_ids") or []), task_id]

    _update(path, note)
    _enqueue(key, item_ids, enqueue_export)
    return StudyOutcome(key, "exporting" if item_ids else m.state, "re-send", files=kept, item_ids=item_ids)


def sync_export_state(data_dir: Path, study_key: str, outbox: Outbox | None = None) -> str | None:
    """Mirror the outbox state of a study's items into its manifest: ``done`` once every destination has the
    result, ``failed`` (with the dead-letter reason) when one gave up, else ``exporting`` with the last error.

    Called after each export attempt. Returns the new state (None when the study has no manifest or items).
    """
    path = manifest_path(Path(data_dir), study_key)
    if not path.is_file():
        return None
    outbox = outbox or Outbox(Path(data_dir) / "outbox")
    m = load_manifest(path)
    item_ids = list(m.results.get("items") or [])
    if not item_ids or m.state not in ("exporting", "done", "failed"):
        return None
    states: list[tuple[str, Any]] = []
    for item_id in item_ids:
        item = outbox.find(item_id)
        if item is not None:
            states.extend(item.destinations.items())
    if not states:
        return None
    dead = [(k, st) for k, st in states if st.status == "dead"]
    pending = [(k, st) for k, st in states if st.status == "pending"]
    reason: str | None
    if dead:
        state = "failed"
        reason = "export failed: " + "; ".join(
            f"{k}: {st.dead_reason} (dead letter {st.dead_letter})" for k, st in dead
        )
    elif pending:
        state = "exporting"
        errs = [
            f"{k}: attempt {st.attempts} failed ({st.last_error}); retrying"
            for k, st in pending
            if st.last_error
        ]
        reason = "; ".join(errs) or skipped_note(m.results.get("skipped"))
    else:
        state = "done"
        reason = skipped_note(m.results.get("skipped"))
    if state == m.state and reason == m.reason:
        return state

    def apply(mm: Manifest) -> None:
        if mm.state in ("exporting", "done", "failed") and (mm.state, mm.reason) != (state, reason):
            set_state(mm, state, reason[:2000] if reason else None)
            if state == "done":
                now = time.time()
                mm.results["delivered_at"] = now
                started = mm.results.get("finished_at")
                if isinstance(started, int | float):
                    mm.results.setdefault("timings", {})["export"] = round(now - started, 4)

    _update(path, apply)
    log.log(
        logging.ERROR if state == "failed" else logging.INFO,
        "study %s: %s%s",
        study_key,
        state,
        f" ({reason})" if reason else "",
    )
    return state


# --------------------------------------------------------------------------------------------- QA report


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
            reference=ref_volume, colors=colors, notes=[_phases_note(m)],
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
            item_ids = _to_outbox(outbox, [doc], destinations, study_key)
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

        _update(path, record)
    except Exception as exc:
        log.exception("study %s: QA report not written", study_key)
        error = f"{type(exc).__name__}: {exc}"[:500]

        def failed(mm: Manifest) -> None:
            mm.results["report"] = {"error": error}

        try:
            _update(path, failed)
        except Exception:
            log.exception("study %s: could not record the report failure", study_key)
        return []
    log.info("study %s: QA report written in %.2f s%s", study_key, secs,
             f", sent as outbox item(s) {', '.join(item_ids)}" if item_ids else "")
    _enqueue(study_key, item_ids, enqueue_export)
    return written

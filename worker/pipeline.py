"""The segmentation pipeline of one study, :func:`process_study`: a plain function (the Celery task and
``itvnode segment`` call it) that owns the study's state changes while it runs.

manifest -> 4D HU volume + geometry (worker.study_inputs) -> engine (worker.segmentation: SAM 3 per slice,
temporal filter, connectivity, ITV) -> RTSTRUCT(s), SEGs, qa.json kept with the study (worker.result_files)
-> outbox, export enqueued (worker.delivery) -> QA report (worker.report_output). ``itvnode itv`` runs the
same steps on contours from RTSTRUCTs (worker.contours).

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
next version number (``results.versions``: one record per distinct content key, never reset). The receiver
then holds both versions side by side; the descriptions say which version and which phases each one used.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from service.ops.reconcile import ReconcilePolicy, schedule_retry
from service.setting_values import Destination
from service.store.layout import DataLayout
from service.store.manifest import Manifest, load_manifest, set_state, utcnow_iso
from service.store.outbox import Outbox, RetryPolicy
from service.store.spool_index import SpoolIndexReader
from service.store.state import StudyState
from worker.delivery import EnqueueExport, enqueue_exports, skipped_note, to_outbox
from worker.engine_settings import EngineConfig, LoadedSegmenter
from worker.report_output import write_report
from worker.result_files import outcome_uids, results_dir
from worker.segmentation import Inputs, StudyOutcome, algorithm_record, model_record, run_engine
from worker.split_plan import Split, current_run
from worker.stages import PipelineError, Stages, is_transient
from worker.study_inputs import change_manifest, not_runnable, open_study

log = logging.getLogger(__name__)

# Attempts that died mid-processing (pool process killed: OOM, segfault) before a study is failed instead of
# being re-delivered forever (acks_late + reject_on_worker_lost re-queue the message of a lost worker).
MAX_INTERRUPTED = 3
#: a result was computed and handed to the outbox (or kept: no destinations)
HANDED_OUT: frozenset[StudyState] = frozenset({StudyState.EXPORTING, StudyState.DONE})
#: an attempt is under way or about to be (orphan recovery writes ``queued``)
ATTEMPTING: frozenset[StudyState] = frozenset({StudyState.PROCESSING, StudyState.QUEUED})


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
    split: Split | None = None,
) -> StudyOutcome:
    """Segment the study ``study_key`` under ``data_dir`` and hand its RTSTRUCT(s) to the outbox.

    ``segmenter``: the process's :class:`LoadedSegmenter`, or a function returning it (called once the study
    is marked ``processing``; its time is the ``model`` stage). Its ``segmenter`` None: SAM 3 structures are
    skipped with its ``unavailable_reason``). ``destinations``: where the export sends the result (none: the
    result is kept with the study and the study is ``done`` with a note). ``enqueue_export(item_id)`` queues
    the delivery; None leaves that to the outbox sweep. Failures are recorded in the manifest (state
    ``failed`` with the stage and reason) and re-raised. ``split``: when it splits this study
    (worker.study_split), the phase groups are dispatched and the study stays ``processing`` until the
    finishing task (:func:`compute_and_hand_out` with the split's engine) ends it.
    """
    data_dir = Path(data_dir)
    path, m = open_study(data_dir, study_key)
    if (why := not_runnable(m)) is not None:
        reason = f"{why}: not assembled, nothing to do"
        log.warning("study %s: %s", study_key, reason)
        return StudyOutcome(study_key, m.state, reason)

    handled = list(m.results.get("task_ids") or [])
    if task_id is not None and task_id in handled and m.state in HANDED_OUT:
        log.info(
            "study %s: task %s already finished this study (duplicate delivery): nothing to do",
            study_key,
            task_id,
        )
        return StudyOutcome(
            study_key, m.state, "duplicate delivery", item_ids=list(m.results.get("items", []))
        )

    outbox = Outbox(DataLayout(data_dir).outbox, retry_policy or RetryPolicy())
    kept = _kept_files(data_dir, m)
    export_failed = m.state == StudyState.FAILED and bool(m.results.get("items"))
    if kept and (m.state in HANDED_OUT or export_failed):
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
            if mm.state in ATTEMPTING:
                set_state(mm, StudyState.FAILED, reason)

        change_manifest(path, give_up)
        log.error("study %s FAILED: %s", study_key, reason)
        raise PipelineError(reason)

    stages = Stages(study_key)
    stages.timings.update(_receive_timings(data_dir, m))

    groups = split.groups(len(m.phases)) if split is not None and task_id else None

    def start(mm: Manifest) -> None:
        set_state(mm, StudyState.PROCESSING, None)
        mm.task_id = task_id
        mm.results = {
            "timings": dict(stages.timings),
            "worker": worker_info or _worker_identity(),
            "task_ids": handled,
            "started_at": time.time(),
            "versions": list(mm.results.get("versions") or []),  # every result this study has had
        }
        if groups is not None:  # the chord's tasks act only while this run is the study's current one
            mm.results["split"] = {"run": task_id, "groups": groups}

    change_manifest(path, start)
    log.info("study %s: processing (task %s, %d phases)", study_key, task_id, len(m.phases))
    if groups is not None:
        assert split is not None
        try:
            with stages.stage("dispatch"):
                split.dispatch(study_key, str(task_id), groups)
        except BaseException as exc:
            record_failure(path, study_key, stages, exc, retry)
            raise
        log.info("study %s: split into %d phase groups %s (chord run %s)", study_key, len(groups), groups,
                 task_id)
        return StudyOutcome(study_key, StudyState.PROCESSING, f"split into {len(groups)} phase groups")
    run = Run(data_dir, study_key, handled, outbox, destinations, task_id, enqueue_export, uid_prefix, retry)
    return compute_and_hand_out(run, m, stages, config, segmenter)


@dataclass(frozen=True)
class Run:
    """One computation of a study, from ``processing`` to its result handed out."""

    data_dir: Path
    study_key: str
    handled: list[str]  # task ids that already finished this study
    outbox: Outbox
    destinations: Sequence[Destination]
    task_id: str | None
    enqueue_export: EnqueueExport | None
    uid_prefix: str | None
    retry: ReconcilePolicy | None

    @property
    def path(self) -> Path:
        """The study's manifest."""
        return DataLayout(self.data_dir).manifest(self.study_key)


def compute_and_hand_out(run: Run, m: Manifest, stages: Stages, config: EngineConfig,
                         segmenter: LoadedSegmenter | Callable[[], LoadedSegmenter], *,
                         inputs: Callable[..., Inputs] | None = None) -> StudyOutcome:
    """The study (already ``processing``) computed by :func:`run_engine` (``inputs``: what reads and segments
    its phases, see there; a split study's finishing task passes its own), its result handed to the outbox,
    the manifest finished, the exports queued and the QA report rendered. Failures are recorded (``failed``,
    or ``queued`` for a retry) and re-raised."""
    path, task_id, handled = run.path, run.task_id, run.handled
    data_dir, study_key = run.data_dir, run.study_key
    try:
        with stages.stage("model"):
            segmenter = segmenter() if callable(segmenter) else segmenter
        outcome = run_engine(study_key, data_dir, m, config, segmenter, stages, run.uid_prefix, inputs=inputs)
        with stages.stage("outbox"):
            item_ids = to_outbox(run.outbox, outcome.files, run.destinations, study_key)
    except BaseException as exc:  # SoftTimeLimitExceeded is a BaseException in some Celery versions
        record_failure(path, study_key, stages, exc, run.retry)
        raise

    outcome.item_ids = item_ids
    seg_loaded = segmenter if isinstance(segmenter, LoadedSegmenter) else LoadedSegmenter(None)
    outcome.timings = stages.timings
    rel_files = [str(f.relative_to(data_dir)) for f in outcome.files]
    if item_ids:
        state, note = StudyState.EXPORTING, None
    else:
        state = StudyState.DONE
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
                "algorithm": algorithm_record(seg_loaded),
                "qa": outcome.qa,
            }
        )
        # what the model was for this run: /health and /metrics read it (service.ops.health)
        if outcome.computed:
            mm.results["model"] = model_record(seg_loaded, outcome.skipped)

    change_manifest(path, finished)
    outcome.state, outcome.reason = state, note
    enqueue_exports(study_key, item_ids, run.enqueue_export)
    # the QA report after the RTSTRUCT is on its way: rendering never delays it, and a failure is logged only
    report, outcome.report = outcome.report, None
    outcome.report_files = write_report(
        study_key, data_dir, report, config, destinations=run.destinations, outbox=run.outbox,
        enqueue_export=run.enqueue_export, uid_prefix=run.uid_prefix,
    )
    if outcome.report_files and run.destinations:  # the report's own item, after the RTSTRUCT's
        outcome.item_ids = list(load_manifest(path).results.get("items") or item_ids)
    return outcome


def record_failure(path: Path, study_key: str, stages: Stages, exc: BaseException,
                   retry: ReconcilePolicy | None, *, run_id: str | None = None) -> None:
    """``exc`` ended the study's computation at ``stages.current``: ``failed`` with the reason, or, for a
    transient failure with a retry policy, ``queued`` with backoff (``failed`` at the limit). ``run_id``: a
    split run's task (worker.study_split), which records nothing once the study has left that run."""
    reason = f"{stages.current or 'setup'}: {type(exc).__name__}: {exc}"
    if isinstance(exc, PipelineError | ValueError):
        reason = f"{stages.current or 'setup'}: {exc}"
    transient = retry is not None and is_transient(exc, stages.current)

    def failed(mm: Manifest) -> None:
        if run_id is not None and current_run(mm) != run_id:
            return
        if transient and retry is not None and mm.state == StudyState.PROCESSING:
            schedule_retry(mm, reason, retry, time.time())  # queued with backoff, or failed at the limit
        else:
            set_state(mm, StudyState.FAILED, reason[:2000])
        mm.results["timings"] = dict(stages.timings)

    try:
        change_manifest(path, failed)
    except Exception:  # never hide the original error behind a manifest problem
        log.exception("study %s: could not record the failure", study_key)
    log.error("study %s FAILED at %s: %s", study_key, stages.current, reason)


def interrupted_attempts(m: Manifest) -> int:
    """How many times in a row processing started and never finished (no other state in between but
    ``queued``, which orphan recovery writes)."""
    n = 0
    for h in reversed(m.history):
        if h.state == StudyState.PROCESSING:
            n += 1
        elif h.state != StudyState.QUEUED:
            break
    return n if m.state in ATTEMPTING else 0


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
    item_ids = active or to_outbox(outbox, kept, destinations, key)
    log.info(
        "study %s: already computed (%s); re-sending %d file(s) via outbox item(s) %s",
        key,
        m.state,
        len(kept),
        ", ".join(item_ids) or "(none: no destinations)",
    )

    def note(mm: Manifest) -> None:
        if item_ids:
            set_state(mm, StudyState.EXPORTING, "re-send of the kept result")
        mm.results["items"] = item_ids or mm.results.get("items", [])
        if task_id:
            mm.results["task_ids"] = [*(mm.results.get("task_ids") or []), task_id]

    change_manifest(path, note)
    enqueue_exports(key, item_ids, enqueue_export)
    return StudyOutcome(
        key, StudyState.EXPORTING if item_ids else m.state, "re-send", files=kept, item_ids=item_ids
    )


def _receive_timings(data_dir: Path, m: Manifest) -> dict[str, float]:
    """``receive`` (first to last instance) and ``quiet`` (last instance to queued) from the spool index."""
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
    start = max((i for i, h in enumerate(m.history) if h.state == StudyState.COLLECTING), default=-1)
    assembled = [h.at for h in m.history[start + 1 :]
                 if h.state in (StudyState.COMPLETE, StudyState.QUEUED)][:1]
    if assembled:
        try:
            at = datetime.fromisoformat(assembled[-1].replace("Z", "+00:00")).timestamp()
            out["quiet"] = round(max(0.0, at - last), 4)
        except ValueError:
            pass
    return out


def _kept_files(data_dir: Path, m: Manifest) -> list[Path]:
    names = m.results.get("files") or []
    files = [Path(data_dir) / n for n in names]
    return files if files and all(f.is_file() for f in files) else []


def _worker_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "ppid": os.getppid()}

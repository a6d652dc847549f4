"""One study over several inference workers: a Celery chord over phase groups.

With ``phase_groups`` > 1 the study's ``itvnode.segment_study`` task marks it ``processing``, records the
run (its task id) and the groups under ``results.split`` (worker.pipeline.process_study) and sends a chord
(worker.tasks): one ``itvnode.segment_phases`` task per group, then ``itvnode.finish_study``.

* A group task (:func:`segment_group`) reads its phases, runs SAM 3 and the per-phase CPU work on them
  (overlapped, as one worker does for a whole study) and writes each phase's settled masks to the study
  directory (worker.phase_masks). Phases whose file already exists are skipped: a re-delivered or re-queued
  group costs nothing twice.
* The finishing task (:func:`finish_study`) reads every phase and the references, takes each phase's masks
  from its file and computes any phase whose file is missing or damaged itself (a group lost with its
  worker, a chord released early by a re-delivered header task), then runs the cross-phase work (temporal
  filter, connectivity, ITV), writes the RTSTRUCT and hands it out exactly as an unsplit run does
  (worker.pipeline.compute_and_hand_out). The result is therefore the unsplit one, whatever the split.

Every task acts only while the study is ``processing`` under its run: a task of a superseded run (the
study was re-queued, or finished by a re-delivery) does nothing. Failures are recorded by the task that
meets them, as in an unsplit run (``failed``, or ``queued`` for a retry); the chord's other tasks then find
the study no longer theirs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from service.ops.reconcile import ReconcilePolicy
from service.setting_values import Destination
from service.store.layout import DataLayout
from service.store.manifest import Manifest
from service.store.outbox import Outbox, RetryPolicy
from service.store.spool_index import SpoolIndexReader
from worker.delivery import EnqueueExport
from worker.engine_settings import EngineConfig, LoadedSegmenter
from worker.phase_masks import PhaseMaskStore, masks_key, remove_phase_masks
from worker.pipeline import MAX_INTERRUPTED, Run, compute_and_hand_out, record_failure
from worker.segmentation import Inputs, StudyOutcome, record_busy, rtstruct_algorithm
from worker.split_plan import current_run
from worker.stages import PipelineError, Stages
from worker.study_inputs import change_manifest, open_phases, open_study, read_phase, read_references

log = logging.getLogger(__name__)

SUPERSEDED = "superseded"


def mask_store(data_dir: Path, m: Manifest, geoms: Sequence[Any], config: EngineConfig,
               segmenter: LoadedSegmenter) -> PhaseMaskStore:
    """Where this study's per-phase masks for these inputs, settings and model live."""
    from service.dicomio.uids import settings_digest

    revisions = SpoolIndexReader(DataLayout(data_dir).spool_index).revisions(m.study_instance_uid)
    key = masks_key(m.study_key, geoms, rtstruct_algorithm(segmenter).identity, settings_digest(config),
                    revisions)
    return PhaseMaskStore(Path(data_dir), m.study_key, key)


def segment_group(study_key: str, data_dir: Path, config: EngineConfig,
                  segmenter: Callable[[], LoadedSegmenter], run_id: str, phases: Sequence[int], *,
                  retry: ReconcilePolicy | None = None) -> dict[str, Any]:
    """``itvnode.segment_phases``: segment and settle ``phases`` of the study and write their masks. Returns
    what it did (the chord hands these records to :func:`finish_study`)."""
    data_dir = Path(data_dir)
    t0 = time.perf_counter()
    path, m = open_study(data_dir, study_key)
    record: dict[str, Any] = {"phases": list(phases), "computed": [], "busy": {}, "wall": 0.0}
    if current_run(m) != run_id:
        log.info("study %s: phase group %s of run %s is superseded (%s): nothing to do", study_key,
                 list(phases), run_id, m.state)
        return {**record, "skipped": SUPERSEDED}
    stages = Stages(study_key)
    if (started := count_start(path, run_id, f"phases {phases[0]}-{phases[-1]}")) > MAX_INTERRUPTED:
        reason = (f"phase group {list(phases)} was started {started} times without finishing (the "
                  "worker process died: out of memory?); not retried automatically")
        record_failure(path, study_key, stages, PipelineError(reason), None, run_id=run_id)
        return {**record, "skipped": reason}
    try:
        with stages.stage("model"):
            loaded = segmenter()
        reader = open_phases(m, data_dir, stages)
        store = mask_store(data_dir, m, reader.geoms, config, loaded)
        todo = [p for p in phases if not store.exists(p)]
        if todo:
            seg = _phase_segmentation(study_key, (len(todo), *reader.hu.shape[1:]), reader.geoms[0].spacing,
                                      config, loaded)
            with stages.stage("segment"):
                _run_local(seg, reader, todo, store)
            record["busy"] = {k: round(v, 4) for k, v in seg.busy.items()}
    except BaseException as exc:
        record_failure(path, study_key, stages, exc, retry, run_id=run_id)
        raise
    record.update(computed=todo, wall=round(time.perf_counter() - t0, 4), masks_key=store.key)
    log.info("study %s: phase group %s done in %.1f s (%d computed, %d found done)", study_key, list(phases),
             record["wall"], len(todo), len(phases) - len(todo))
    return record


def count_start(path: Path, run_id: str, task: str) -> int:
    """Count one more start of ``task`` of the split run ``run_id`` (``results.split.starts``); how many so
    far. A task whose process dies is re-delivered (acks_late): this bounds the loop, as
    ``worker.pipeline.MAX_INTERRUPTED`` does for an unsplit study."""
    n = [0]

    def count(mm: Manifest) -> None:
        if current_run(mm) != run_id:
            return
        split = dict(mm.results.get("split") or {})
        starts = dict(split.get("starts") or {})
        n[0] = starts[task] = int(starts.get(task, 0)) + 1
        mm.results["split"] = {**split, "starts": starts}

    change_manifest(path, count)
    return n[0]


def _phase_segmentation(study_key: str, shape: Any, spacing: Any, config: EngineConfig,
                        loaded: LoadedSegmenter) -> Any:
    from models.phase_segmentation import PhaseSegmentation

    return PhaseSegmentation(shape, spacing, list(config.structures), loaded.segmenter, study_key=study_key)


def _run_local(seg: Any, reader: Any, todo: Sequence[int], store: PhaseMaskStore) -> None:
    """The study's phases ``todo`` through ``seg`` (local indices 0..), overlapped, then written."""
    from models.phase_overlap import run_phases

    def phases() -> Iterator[tuple[int, Any]]:
        for i, p in enumerate(todo):
            yield i, read_phase(reader, p)

    run_phases(seg, phases(), overlap=True)
    for i, p in enumerate(todo):
        store.write(p, seg.phase_masks(i), seg.skipped_slices(i))


def finish_study(study_key: str, data_dir: Path, config: EngineConfig,
                 segmenter: LoadedSegmenter | Callable[[], LoadedSegmenter],
                 destinations: Sequence[Destination], run_id: str, groups: Sequence[dict[str, Any]] = (), *,
                 enqueue_export: EnqueueExport | None = None, retry_policy: RetryPolicy | None = None,
                 task_id: str | None = None, uid_prefix: str | None = None,
                 retry: ReconcilePolicy | None = None) -> StudyOutcome:
    """``itvnode.finish_study``: the split study's result from its phase files (computing what is missing),
    handed out as an unsplit run hands it out. ``groups``: the group tasks' records (timings only)."""
    data_dir = Path(data_dir)
    path, m = open_study(data_dir, study_key)
    if current_run(m) != run_id:
        log.info("study %s: finishing task of run %s is superseded (%s): nothing to do", study_key, run_id,
                 m.state)
        return StudyOutcome(study_key, m.state, SUPERSEDED)
    if (started := count_start(path, run_id, "finish")) > MAX_INTERRUPTED:
        reason = (f"the finishing task was started {started} times without finishing (the worker process "
                  "died: out of memory?); not retried automatically")
        record_failure(path, study_key, Stages(study_key), PipelineError(reason), None, run_id=run_id)
        raise PipelineError(reason)
    stages = Stages(study_key)
    received = m.results.get("timings") or {}
    stages.timings.update({k: received[k] for k in ("receive", "quiet") if k in received})
    handled = list(m.results.get("task_ids") or [])
    outbox = Outbox(DataLayout(data_dir).outbox, retry_policy or RetryPolicy())
    run = Run(data_dir, study_key, handled, outbox, destinations, task_id, enqueue_export, uid_prefix, retry)
    computed_here: list[int] = []

    def record_split(mm: Manifest) -> None:  # which worker did what (itvnode status KEY shows it)
        done = [{k: g.get(k) for k in ("phases", "computed", "wall", "worker", "skipped")} for g in groups]
        mm.results["split"] = {**(mm.results.get("split") or {}), "done": done,
                               "computed_here": computed_here}

    def inputs(*args: Any) -> Inputs:
        out = _from_phase_files(*args, groups=groups, missing=computed_here)
        change_manifest(path, record_split)  # before the result is handed out (the study may be done next)
        return out

    outcome = compute_and_hand_out(run, m, stages, config, segmenter, inputs=inputs)
    remove_phase_masks(data_dir, study_key)
    return outcome


def _from_phase_files(study_key: str, data_dir: Path, m: Manifest, config: EngineConfig,
                      segmenter: LoadedSegmenter, stages: Stages, *,
                      groups: Sequence[dict[str, Any]], missing: list[int]) -> Inputs:
    """Every phase read; its masks from its file, or segmented here when the file is missing (those phases
    are appended to ``missing``); then the cross-phase post-processing. Timings: the groups' busy times summed
    with this task's own."""
    reader = open_phases(m, data_dir, stages)
    geoms = reader.geoms
    store = mask_store(data_dir, m, geoms, config, segmenter)
    seg = _phase_segmentation(study_key, reader.hu.shape, geoms[0].spacing, config, segmenter)
    names = sorted(seg.masks)
    t0 = time.perf_counter()
    with stages.stage("load"):
        for p in range(reader.n_phases):
            read_phase(reader, p)
    with stages.stage("masks"):
        for p in range(reader.n_phases):
            found = store.read(p, reader.hu.shape[1:], names)
            if found is None:
                missing.append(p)
            else:
                seg.put_phase(p, *found)
    if missing:
        log.warning("study %s: phase(s) %s had no mask file from the phase groups: computed here", study_key,
                    missing)
        from models.phase_overlap import run_phases

        with stages.stage("segment"):
            run_phases(seg, ((p, reader.hu[p]) for p in missing), overlap=True)
        del stages.timings["segment"]
    references, ref_volume = read_references(study_key, data_dir, m, geoms[0])
    with stages.stage("filter"):
        result = seg.finish(reader.hu, config.temporal, qa_params=config.qa,
                            phase_percents=[p.percent for p in m.phases])
    busy = dict(seg.busy)
    walls = [float(g.get("wall") or 0.0) for g in groups]
    for g in groups:
        for k, v in (g.get("busy") or {}).items():
            if k in busy:
                busy[k] += float(v)
    record_busy(stages, busy, max([*walls, 0.0]) + (time.perf_counter() - t0))
    return result, reader.hu, geoms, references, ref_volume

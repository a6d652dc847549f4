"""Celery tasks: ``itvnode.segment_study`` (queue ``inference``) and, via ``worker.export_task``,
``itvnode.export_item`` (queue ``export``). Thin: the work is :func:`worker.pipeline.process_study`.

Task options: explicit names, JSON only, ``acks_late`` + ``reject_on_worker_lost`` (a pool process that dies
puts its message back), soft/hard time limits from ``service.intake.queue.celery_config`` (annotations by
task name).

Around worker crashes:

* while ``itvnode.segment_study`` runs, a thread touches the study's heartbeat file (service.ops.reconcile):
  the reconciler in ``itvnode serve`` re-queues or fails a ``processing`` study whose heartbeat stopped;
* when an inference worker starts (``worker_ready`` signal), studies left ``processing`` by an earlier
  incarnation of the same worker node (killed mid-job: with the embedded broker its message is gone, with
  Redis it would only come back after the visibility timeout) are enqueued again. The killed task's id is
  recorded as superseded, so a late re-delivery of it does nothing.

Heavy imports (torch via the engine) happen inside the task, so the export worker in the slim service image
can import this module.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from celery import shared_task
from celery.signals import worker_init, worker_process_init, worker_ready

import worker.export_task  # noqa: F401 - registers itvnode.export_item on the app that includes this module
from service.intake.queue import (
    QUEUE_EXPORT,
    QUEUE_INFERENCE,
    TASK_EXPORT,
    TASK_FINISH_STUDY,
    TASK_SEGMENT,
    TASK_SEGMENT_PHASES,
)
from service.store.state import StudyState

log = logging.getLogger(__name__)

BOOT_ENV = "ITVNODE_WORKER_BOOT"  # id of the worker main process; inherited by its pool processes
PRELOAD_ENV = "ITVNODE_WORKER_PRELOAD"  # "1" in the pool processes of a worker consuming the inference queue


def _settings() -> Any:
    from service.settings import load_settings

    return load_settings()


@shared_task(name=TASK_SEGMENT, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def segment_study(self: Any, study_key: str) -> dict[str, Any]:
    """``itvnode.segment_study(study_key)``: segment one assembled study and queue its export."""
    from service.ops.reconcile import Heartbeat, ReconcilePolicy
    from service.store.outbox import RetryPolicy
    from worker.engine_settings import engine_config, get_segmenter
    from worker.pipeline import process_study
    from worker.split_plan import Split
    from worker.stages import PipelineError

    settings = _settings()
    task_id = self.request.id
    log.info("task %s: segment study %s", task_id, study_key)
    cfg = engine_config(settings)

    enqueue_export = export_enqueuer(self.app)

    os.environ.setdefault(BOOT_ENV, uuid.uuid4().hex)  # pool=solo/threads: no worker_init in this process
    worker_info = {"node": self.request.hostname or "", "boot": os.environ[BOOT_ENV], "pid": os.getpid()}
    try:
        # the reconciler (service.ops.reconcile, in `itvnode serve`) takes a study whose heartbeat stops as
        # gone
        with Heartbeat(settings.data_dir, study_key, settings.heartbeat_interval):
            outcome = process_study(
                study_key, settings.data_dir, cfg, lambda: get_segmenter(cfg), settings.destinations,
                enqueue_export=enqueue_export, retry_policy=RetryPolicy.from_settings(settings),
                task_id=task_id, worker_info=worker_info, retry=ReconcilePolicy.from_settings(settings),
                split=Split(settings.phase_groups, lambda *a: send_chord(self.app, *a)),
            )
    except PipelineError as exc:
        # deterministic (bad input): recorded in the manifest; retrying cannot help
        log.error("task %s: study %s failed: %s", task_id, study_key, exc)
        return {"study_key": study_key, "state": StudyState.FAILED, "reason": str(exc)}
    return {"study_key": study_key, "state": outcome.state, "items": outcome.item_ids,
            "skipped": outcome.skipped, "timings": outcome.timings}


def export_enqueuer(app: Any) -> Any:
    """``enqueue_export(item_id)``: queue ``itvnode.export_item`` for an outbox item."""

    def enqueue_export(item_id: str) -> None:
        app.send_task(TASK_EXPORT, args=[item_id], queue=QUEUE_EXPORT, serializer="json")

    return enqueue_export


def send_chord(app: Any, study_key: str, run_id: str, groups: list[list[int]]) -> None:
    """A split study's chord: ``itvnode.segment_phases`` per group, then ``itvnode.finish_study`` with their
    records (worker.study_split)."""
    from celery import chord

    header = [app.signature(TASK_SEGMENT_PHASES, args=[study_key, run_id, g], queue=QUEUE_INFERENCE,
                            serializer="json") for g in groups]
    body = app.signature(TASK_FINISH_STUDY, args=[study_key, run_id], queue=QUEUE_INFERENCE,
                         serializer="json")
    chord(header)(body)


@shared_task(name=TASK_SEGMENT_PHASES, bind=True, acks_late=True, reject_on_worker_lost=True,
             ignore_result=False)
def segment_phases(self: Any, study_key: str, run_id: str, phases: list[int]) -> dict[str, Any]:
    """``itvnode.segment_phases(study_key, run_id, phases)``: one phase group of a split study."""
    from service.ops.reconcile import Heartbeat, ReconcilePolicy
    from worker.engine_settings import engine_config, get_segmenter
    from worker.study_split import segment_group

    settings = _settings()
    cfg = engine_config(settings)
    log.info("task %s: study %s phases %s (run %s)", self.request.id, study_key, phases, run_id)
    with Heartbeat(settings.data_dir, study_key, settings.heartbeat_interval):
        record = segment_group(study_key, settings.data_dir, cfg, lambda: get_segmenter(cfg), run_id, phases,
                               retry=ReconcilePolicy.from_settings(settings))
    return {**record, "worker": self.request.hostname or "", "task_id": self.request.id}


@shared_task(name=TASK_FINISH_STUDY, bind=True, acks_late=True, reject_on_worker_lost=True,
             ignore_result=True)
def finish_study(self: Any, groups: list[dict[str, Any]], study_key: str, run_id: str) -> dict[str, Any]:
    """``itvnode.finish_study(group records, study_key, run_id)``: the chord body of a split study."""
    from service.ops.reconcile import Heartbeat, ReconcilePolicy
    from service.store.outbox import RetryPolicy
    from worker.engine_settings import engine_config, get_segmenter
    from worker.stages import PipelineError
    from worker.study_split import finish_study as finish

    settings = _settings()
    cfg = engine_config(settings)
    task_id = self.request.id

    enqueue_export = export_enqueuer(self.app)

    log.info("task %s: finish study %s (run %s, %d groups)", task_id, study_key, run_id, len(groups))
    try:
        with Heartbeat(settings.data_dir, study_key, settings.heartbeat_interval):
            outcome = finish(
                study_key, settings.data_dir, cfg, lambda: get_segmenter(cfg), settings.destinations, run_id,
                [g for g in groups if isinstance(g, dict)], enqueue_export=enqueue_export,
                retry_policy=RetryPolicy.from_settings(settings), task_id=task_id,
                retry=ReconcilePolicy.from_settings(settings))
    except PipelineError as exc:
        log.error("task %s: study %s failed: %s", task_id, study_key, exc)
        return {"study_key": study_key, "state": StudyState.FAILED, "reason": str(exc)}
    return {"study_key": study_key, "state": outcome.state, "items": outcome.item_ids,
            "timings": outcome.timings}


def recover_orphans(data_dir: Path, node: str, boot: str, enqueue: Any) -> list[str]:
    """Re-enqueue studies that ``node`` was processing in an earlier incarnation (not ``boot``)."""
    from service.store.manifest import iter_manifests, set_state, update_manifest

    recovered = []
    for path, m in iter_manifests(Path(data_dir)):
        w = m.results.get("worker") or {}
        if (m.state != StudyState.PROCESSING or w.get("node") != node or not w.get("boot")
                or w.get("boot") == boot):
            continue
        old = m.task_id

        def mark(mm: Any, old: str | None = old) -> Any:
            if mm.state == StudyState.PROCESSING:
                set_state(mm, StudyState.QUEUED, f"worker {node} stopped during processing; re-queued")
                mm.results["task_ids"] = [*(mm.results.get("task_ids") or []), *([old] if old else [])]
            return mm

        update_manifest(path, mark)
        try:
            enqueue(m.study_key)
        except Exception as exc:
            log.error("study %s: could not re-queue after a worker crash: %s", m.study_key, exc)
            continue
        log.warning("study %s: worker %s stopped while processing it (task %s): re-queued", m.study_key,
                    node, old)
        recovered.append(m.study_key)
    return recovered


@worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    os.environ[BOOT_ENV] = uuid.uuid4().hex  # before the pool forks: every pool process inherits it
    try:
        queues = set(sender.app.amqp.queues.consume_from)
    except AttributeError:
        queues = set()
    os.environ[PRELOAD_ENV] = "1" if QUEUE_INFERENCE in queues else "0"


@worker_process_init.connect
def _on_pool_process_init(**_: Any) -> None:
    """Inference pool process: load SAM 3 in the background now, so the first study does not wait for it.

    (Celery gives this signal a few seconds only; the load itself runs in a thread. A task arriving meanwhile
    waits on the segmenter cache's lock instead of loading a second copy.)
    """
    if os.environ.get(PRELOAD_ENV) != "1":
        return

    def preload() -> None:
        try:
            from worker.engine_settings import engine_config, get_segmenter

            get_segmenter(engine_config(_settings()))
        except Exception:
            log.exception("SAM 3 preload failed (the first study will try again)")

    threading.Thread(target=preload, name="sam3-preload", daemon=True).start()


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    consumer = sender
    app = getattr(consumer, "app", None)
    node = getattr(consumer, "hostname", None)
    queues = {q.name for q in getattr(getattr(consumer, "task_consumer", None), "queues", []) or []}
    if app is None or not node:
        return
    try:
        settings = _settings()
    except Exception:
        log.exception("worker start: cannot read settings")
        return
    if not queues or QUEUE_INFERENCE in queues:
        try:

            def enqueue(key: str) -> None:
                app.send_task(TASK_SEGMENT, args=[key], queue=QUEUE_INFERENCE, serializer="json")

            recover_orphans(settings.data_dir, node, os.environ.get(BOOT_ENV, ""), enqueue)
        except Exception:
            log.exception("orphan recovery failed")
    if not queues or QUEUE_EXPORT in queues:
        threading.Thread(target=_sweep_loop, args=(app, settings), name="outbox-sweep", daemon=True).start()


def _sweep_loop(app: Any, settings: Any) -> None:
    """In the export worker's main process: re-enqueue outbox deliveries whose retry time has come (also
    whatever a crash or a broker restart lost). Idempotent across several export workers
    (service.store.outbox)."""
    from service.store.outbox import RetryPolicy
    from worker.export_task import run_sweep

    def enqueue(item_id: str) -> None:
        app.send_task(TASK_EXPORT, args=[item_id], queue=QUEUE_EXPORT, serializer="json")

    interval = float(getattr(settings, "export_sweep_interval", 60.0))
    policy = RetryPolicy.from_settings(settings)
    while True:
        try:
            run_sweep(settings.data_dir, policy, enqueue, grace=max(interval, 5.0))
        except Exception:
            log.exception("outbox sweep failed")
        time.sleep(interval)

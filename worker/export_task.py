"""Celery tasks of the ``export`` queue: deliver one outbox item, and sweep the outbox for due retries.

Thin on purpose: the logic lives in :func:`run_export` / :func:`run_sweep` (plain functions, plain arguments)
over :mod:`service.store.outbox` and :mod:`service.net.scu`. After every delivery attempt the task
calls :func:`sync_study_state`: the study's manifest follows its outbox item (``exporting`` -> ``done``,
or ``failed`` with the dead-letter reason), so ``itvnode status`` shows delivery. The tasks are
``shared_task``s, so they bind to the node's Celery app (``worker.celery_app``) as soon as that app imports
this module (``include``).

The retry schedule is in the outbox on disk; the Celery countdown this task schedules is only the fast path.
If that message is lost (worker killed, broker restarted), :func:`run_sweep` re-enqueues the item once due.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import shared_task

from service.net.scu import Timeouts, deliver_item
from service.store.layout import DataLayout
from service.store.outbox import Outbox, RetryPolicy

log = logging.getLogger(__name__)

TASK_EXPORT = "itvnode.export_item"  # same string as service.intake.queue.TASK_EXPORT
TASK_SWEEP = "itvnode.sweep_outbox"
QUEUE_EXPORT = "export"

Scheduler = Callable[[str, float], Any]  # (item_id, countdown seconds)


def run_export(
    item_id: str,
    data_dir: Path,
    calling_ae: str,
    policy: RetryPolicy,
    *,
    destination: str | None = None,
    timeouts: Timeouts | None = None,
    schedule: Scheduler | None = None,
) -> dict[str, str]:
    """Deliver the due destinations of ``item_id``; schedule the next attempt when some remain pending.

    Returns ``{destination: status}`` for the destinations attempted (empty for a duplicate / stale message).
    """
    outbox = Outbox(DataLayout(data_dir).outbox, policy)
    states = deliver_item(outbox, item_id, calling_ae, destination=destination, timeouts=timeouts)
    item = outbox.find(item_id)
    if schedule is not None and item is not None and not item.finished:
        nxt = item.next_due()
        # only one message per due time: a duplicate message finds it marked and schedules nothing
        if nxt is not None and outbox.mark_enqueued(item_id, nxt):
            countdown = max(0.0, nxt - time.time())
            try:
                schedule(item_id, countdown)
                log.info("outbox item %s: next attempt in %.0f s", item_id, countdown)
            except Exception as exc:  # broker down: the sweeper re-enqueues it after its grace period
                log.error("outbox item %s: could not schedule the retry (%s); the sweeper will", item_id, exc)
    return {k: st.status for k, st in states.items()}


def sync_study_state(data_dir: Path, outbox_dir: Path, item_id: str) -> None:
    """Mirror the outbox state of ``item_id`` into its study's manifest
    (:func:`worker.pipeline.sync_export_state`).

    Never raises: the delivery itself is recorded in the outbox, and the next attempt or sweep syncs again.
    """
    try:
        from worker.delivery import sync_export_state

        outbox = Outbox(outbox_dir)
        item = outbox.find(item_id)
        if item is not None and item.study_key:
            sync_export_state(data_dir, item.study_key, outbox)
    except Exception:
        log.exception("could not update the study state after exporting %s", item_id)


def run_sweep(data_dir: Path, policy: RetryPolicy, enqueue: Callable[[str], Any], grace: float = 300.0
              ) -> list[str]:
    """Re-enqueue outbox items whose retry is due (after a restart, or a lost countdown)."""
    return Outbox(DataLayout(data_dir).outbox, policy).sweep(enqueue, grace=grace)


def _settings() -> Any:
    from service.settings import load_settings

    return load_settings()


@shared_task(name=TASK_EXPORT, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def export_item(self: Any, item_id: str, destination: str | None = None) -> dict[str, str]:
    """``itvnode.export_item(item_id)``: deliver an outbox item to its due destinations."""
    settings = _settings()

    def schedule(item: str, countdown: float) -> None:
        self.app.send_task(TASK_EXPORT, args=[item], queue=QUEUE_EXPORT, countdown=countdown,
                           serializer="json")

    log.info("task %s: export item %s", self.request.id, item_id)
    try:
        return run_export(item_id, settings.data_dir, settings.ae_title,
                          RetryPolicy.from_settings(settings), destination=destination, schedule=schedule,
                          timeouts=Timeouts.from_settings(settings))
    finally:
        sync_study_state(settings.data_dir, settings.outbox_dir, item_id)


@shared_task(name=TASK_SWEEP, bind=True, ignore_result=True)
def sweep_outbox(self: Any) -> list[str]:
    """``itvnode.sweep_outbox()``: for a beat schedule / the service loop; enqueues due export items."""
    settings = _settings()

    def enqueue(item: str) -> None:
        self.app.send_task(TASK_EXPORT, args=[item], queue=QUEUE_EXPORT, serializer="json")

    return run_sweep(settings.data_dir, RetryPolicy.from_settings(settings), enqueue)

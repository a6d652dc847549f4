"""The Celery application: JSON only, queues ``inference`` and ``export``, late acks, one message at a time.

``app`` (module level) is configured from settings when this module is imported; ``worker.tasks`` registers
the real tasks on it with explicit names (``itvnode.segment_study``, ``itvnode.export_item``). The broker is
chosen by :func:`service.intake.queue.celery_config` (Redis URL, or the embedded SQLite broker under
``data_dir/broker``).

Reliability settings and why:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged after the task returns, so a
  worker that dies mid-study (OOM, GPU fault) leaves it to be re-delivered; tasks are idempotent.
* ``worker_prefetch_multiplier = 1``: a GPU worker reserves one study at a time; others stay with the broker
  for idle workers.
* soft time limits (``SoftTimeLimitExceeded`` raised inside the task) and hard limits 300 s later.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu import Exchange, Queue

from service.intake.queue import (
    DEFAULT_EXPORT_SOFT_LIMIT,
    DEFAULT_INFERENCE_SOFT_LIMIT,
    QUEUES,
    celery_config,
    is_embedded,
)

if TYPE_CHECKING:
    from service.settings import Settings

TASK_MODULES: tuple[str, ...] = ("worker.tasks",)


def _available(modules: tuple[str, ...]) -> list[str]:
    found = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is not None:
                found.append(name)
        except ModuleNotFoundError:
            pass
    return found


def create_app(
    broker_url: str | None,
    data_dir: Path,
    *,
    result_backend: str | None = None,
    inference_soft_time_limit: float = DEFAULT_INFERENCE_SOFT_LIMIT,
    export_soft_time_limit: float = DEFAULT_EXPORT_SOFT_LIMIT,
    include: list[str] | None = None,
    main: str = "itvnode",
    broker_transport_options: dict[str, Any] | None = None,
    time_limit_grace: float | None = None,
    phase_groups: int = 1,
) -> Celery:
    """A configured app. ``include``: task modules imported by the worker (default: ``worker.tasks``)."""
    conf = _app_config(
        broker_url, data_dir, result_backend=result_backend,
        inference_soft_time_limit=inference_soft_time_limit, export_soft_time_limit=export_soft_time_limit,
        broker_transport_options=broker_transport_options, phase_groups=phase_groups,
        **({} if time_limit_grace is None else {"time_limit_grace": time_limit_grace}),
    )
    app = Celery(main, include=_available(TASK_MODULES) if include is None else include)
    app.conf.update(conf)
    return app


def _app_config(broker_url: str | None, data_dir: Path, **kwargs: Any) -> dict[str, Any]:
    conf = celery_config(broker_url, data_dir, **kwargs)
    conf["task_queues"] = tuple(Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES)
    conf["task_create_missing_queues"] = False
    return conf


def app_from_settings(settings: Settings, *, include: list[str] | None = None) -> Celery:
    return create_app(
        settings.broker_url, settings.data_dir, result_backend=settings.result_backend,
        inference_soft_time_limit=settings.inference_soft_time_limit,
        export_soft_time_limit=settings.export_soft_time_limit, include=include,
        time_limit_grace=settings.time_limit_grace, phase_groups=settings.phase_groups,
    )


def worker_argv(app: Celery, queues: list[str], concurrency: int, *, loglevel: str = "INFO",
                pool: str = "prefork", hostname: str | None = None) -> list[str]:
    """Arguments for ``app.worker_main`` / ``celery worker`` (shared by ``itvnode worker`` and the tests)."""
    unknown = [q for q in queues if q not in QUEUES]
    if unknown or not queues:
        raise ValueError(f"unknown queue(s) {unknown or queues}: choose from {', '.join(QUEUES)}")
    argv = [
        "worker", "--queues", ",".join(queues), "--concurrency", str(concurrency), "--pool", pool,
        "--loglevel", loglevel, "--hostname", hostname or f"itvnode-{'-'.join(queues)}@%h",
    ]
    if is_embedded(str(app.conf.broker_url)):
        # the SQLite transport cannot share fanout exchanges between processes (see service.intake.queue)
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return argv


def declare_embedded_queues(app: Celery, attempts: int = 5) -> None:
    """Create the embedded broker's queue rows before a worker consumes.

    kombu's SQLite transport creates a queue with a SELECT, then an INSERT: two workers starting at once on a
    fresh data directory can both INSERT, and the loser dies at start-up on ``UNIQUE constraint failed:
    kombu_queue.name``. Declaring here and retrying that race means the worker then finds the rows.
    """
    from sqlalchemy.exc import IntegrityError

    for attempt in range(1, attempts + 1):
        try:
            with app.connection_for_write() as conn:
                channel = conn.default_channel
                for queue in app.conf.task_queues:
                    queue.bind(channel).declare()
            return
        except IntegrityError:
            if attempt == attempts:
                raise
            time.sleep(0.1 * attempt)  # the other process's INSERT commits; the next SELECT finds its row


def _settings_config() -> dict[str, Any]:
    from service.settings import load_settings

    s = load_settings()
    return _app_config(s.broker_url, s.data_dir, result_backend=s.result_backend,
                       inference_soft_time_limit=s.inference_soft_time_limit,
                       export_soft_time_limit=s.export_soft_time_limit,
                       time_limit_grace=s.time_limit_grace, phase_groups=s.phase_groups)


#: The node's app. Its configuration is read from settings lazily (on first use, not at import), so importing
#: a task module neither reads settings nor creates ``data_dir/broker``.
app: Celery = Celery("itvnode", include=_available(TASK_MODULES))
app.add_defaults(_settings_config)

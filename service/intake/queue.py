"""The one place the broker is chosen, and the producer side of the job queue (no worker import).

Broker choice
-------------
* ``broker_url`` set (``redis://host:6379/0``): Redis. Several SCPs and many GPU workers share it.
* ``broker_url`` None: an *embedded* broker that needs no server — kombu's SQLAlchemy transport on SQLite
  at ``data_dir/broker/broker.sqlite`` (``sqla+sqlite:////abs/path``).

Why SQLite and not kombu's filesystem transport: the SQLite transport claims a message inside
``BEGIN IMMEDIATE`` (one writer at a time across processes), so two worker processes can never both take
the same message, and a publish is committed (fsync) before ``send_task`` returns. The filesystem transport
writes messages without fsync and claims them with ``shutil.move`` into the temp directory — a copy plus
unlink when ``/tmp`` is another filesystem, which lets two consumers read the same file. Both are kombu
"virtual" transports: with ``task_acks_late`` and ``task_reject_on_worker_lost`` a message whose pool child
dies is re-queued by the worker's main process; a message held by a worker whose *main* process is killed
with SIGKILL is lost on either transport (Redis re-delivers it after ``visibility_timeout``). Delivered rows
stay in the SQLite table with ``visible=0``; :func:`prune_embedded_broker` removes old ones.

Remote control, gossip, mingle and heartbeats need fanout exchanges the SQLite transport does not share
between processes; they are disabled for the embedded broker (``itvnode worker`` passes the flags).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from service.store.durable import private_dir
from service.store.layout import DataLayout

log = logging.getLogger(__name__)

TASK_SEGMENT = "itvnode.segment_study"
TASK_EXPORT = "itvnode.export_item"
TASK_SEGMENT_PHASES = "itvnode.segment_phases"  # one phase group of a split study (worker.study_split)
TASK_FINISH_STUDY = "itvnode.finish_study"  # the split study's chord body: post-processing and RTSTRUCT
#: tasks that carry a study key, and its position in their arguments (the reconciler looks for them in the
#: broker); a chord body gets the header tasks' results first
STUDY_TASKS: dict[str, int] = {TASK_SEGMENT: 0, TASK_SEGMENT_PHASES: 0, TASK_FINISH_STUDY: 1}
QUEUE_INFERENCE = "inference"
QUEUE_EXPORT = "export"
QUEUES: tuple[str, ...] = (QUEUE_INFERENCE, QUEUE_EXPORT)

DEFAULT_INFERENCE_SOFT_LIMIT = 4 * 3600.0
DEFAULT_EXPORT_SOFT_LIMIT = 900.0
HARD_LIMIT_GRACE = 300.0  # seconds between the soft and the hard time limit


class EnqueueError(RuntimeError):
    """The broker did not accept the message (down, unreachable, locked)."""


def embedded_broker_path(data_dir: Path) -> Path:
    return DataLayout(Path(data_dir).resolve()).broker / "broker.sqlite"


def is_embedded(broker_url: str | None) -> bool:
    return broker_url is None or broker_url.startswith(("sqla+sqlite", "sqlite"))


def celery_config(
    broker_url: str | None,
    data_dir: Path,
    *,
    result_backend: str | None = None,
    inference_soft_time_limit: float = DEFAULT_INFERENCE_SOFT_LIMIT,
    export_soft_time_limit: float = DEFAULT_EXPORT_SOFT_LIMIT,
    broker_transport_options: dict[str, Any] | None = None,
    time_limit_grace: float = HARD_LIMIT_GRACE,
    phase_groups: int = 1,
) -> dict[str, Any]:
    """Celery configuration (new-style lowercase keys) shared by producers and workers.

    ``phase_groups`` > 1 (studies split into a chord, worker.study_split) needs a result backend; without
    ``result_backend`` it is :func:`chord_backend`.

    ``broker_transport_options`` are merged over the defaults (e.g. ``{"global_keyprefix": "site-a:"}`` to
    share one Redis database between nodes or test runs).
    """
    inference_hard = inference_soft_time_limit + time_limit_grace
    if result_backend is None and phase_groups > 1:
        result_backend = chord_backend(broker_url, data_dir)
    inference_limits = {"soft_time_limit": inference_soft_time_limit, "time_limit": inference_hard}
    export_hard = export_soft_time_limit + time_limit_grace
    conf: dict[str, Any] = {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_routes": {
            TASK_SEGMENT: {"queue": QUEUE_INFERENCE},
            TASK_SEGMENT_PHASES: {"queue": QUEUE_INFERENCE},
            TASK_FINISH_STUDY: {"queue": QUEUE_INFERENCE},
            TASK_EXPORT: {"queue": QUEUE_EXPORT},
        },
        "task_default_queue": QUEUE_INFERENCE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_annotations": {
            TASK_SEGMENT: inference_limits,
            TASK_SEGMENT_PHASES: inference_limits,
            TASK_FINISH_STUDY: inference_limits,
            TASK_EXPORT: {"soft_time_limit": export_soft_time_limit, "time_limit": export_hard},
        },
        "task_ignore_result": result_backend is None,
        "result_backend": result_backend,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 4.0,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }
    if broker_url is None:
        path = embedded_broker_path(data_dir)
        private_dir(path.parent)
        conf["broker_url"] = f"sqla+sqlite:///{path}"
        # passed to sqlalchemy.create_engine: wait for SQLite's write lock instead of failing at once
        conf["broker_transport_options"] = {"connect_args": {"timeout": 30.0}}
        conf["worker_enable_remote_control"] = False
        conf["worker_send_task_events"] = False
    else:
        conf["broker_url"] = broker_url
        if broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
            # acks_late on Redis: an unacked message is re-delivered after visibility_timeout, so it must
            # outlast the longest task or a running study would be started twice.
            conf["broker_transport_options"] = {"visibility_timeout": int(inference_hard + 600)}
    if broker_transport_options:
        conf["broker_transport_options"] = {**conf.get("broker_transport_options", {}),
                                            **broker_transport_options}
    return conf


def chord_backend(broker_url: str | None, data_dir: Path) -> str:
    """The result backend a split study's chord counts its finished groups in: the Redis broker itself, or
    SQLite next to the embedded broker (Celery's database backend; the chord body is then released by
    ``celery.chord_unlock`` polling once a second on the ``inference`` queue)."""
    if broker_url is None or is_embedded(broker_url):
        path = DataLayout(Path(data_dir).resolve()).broker / "results.sqlite"
        private_dir(path.parent)
        return f"db+sqlite:///{path}"
    if broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        return broker_url
    raise ValueError(f"phase_groups > 1 needs result_backend for broker {broker_url!r}")


def _producer_app(conf: dict[str, Any]) -> Any:
    from celery import Celery

    app = Celery("itvnode-producer", set_as_current=False)
    app.conf.update(conf)
    return app


class Enqueuer:
    """Sends jobs by task name (``send_task``): the SCP side never imports ``worker``."""

    def __init__(self, broker_url: str | None, data_dir: Path, **config: Any) -> None:
        self._conf = celery_config(broker_url, data_dir, **config)
        self._app = _producer_app(self._conf)

    @property
    def broker_url(self) -> str:
        return str(self._conf["broker_url"])

    def _send(self, name: str, arg: str, queue: str) -> str:
        try:
            result = self._app.send_task(
                name, args=[arg], queue=queue, serializer="json",
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                              "interval_max": 1.0},
            )
        except Exception as exc:  # kombu OperationalError, redis ConnectionError, sqlite OperationalError...
            raise EnqueueError(f"broker did not accept {name}: {type(exc).__name__}: {exc}") from exc
        return str(result.id)

    def segment_study(self, key: str) -> str:
        """Enqueue ``itvnode.segment_study(key)`` on ``inference``; returns the task id."""
        return self._send(TASK_SEGMENT, key, QUEUE_INFERENCE)

    def export_item(self, item_id: str) -> str:
        """Enqueue ``itvnode.export_item(item_id)`` on ``export``; returns the task id."""
        return self._send(TASK_EXPORT, item_id, QUEUE_EXPORT)

    def close(self) -> None:
        self._app.close()


def prune_embedded_broker(data_dir: Path, older_than_s: float = 7 * 86400.0) -> int:
    """Delete delivered (``visible=0``) rows older than ``older_than_s`` from the embedded broker."""
    path = embedded_broker_path(data_dir)
    if not path.exists():
        return 0
    cutoff = time.time() - older_than_s
    con = sqlite3.connect(path, timeout=30.0)
    try:
        with con:
            cur = con.execute(
                # kombu stamps the row (column "timestamp", local time) when it is delivered
                "DELETE FROM kombu_message WHERE visible = 0 "
                "AND timestamp < datetime(?, 'unixepoch', 'localtime')",
                (cutoff,),
            )
        return cur.rowcount
    except sqlite3.OperationalError as exc:  # table not created yet
        log.debug("prune_embedded_broker: %s", exc)
        return 0
    finally:
        con.close()


def _study_key_of(payload: str | bytes) -> str | None:
    """The study key a kombu message envelope (JSON, body base64) carries for ``itvnode.segment_study``."""
    import base64
    import json

    try:
        env = json.loads(payload)
        if isinstance(env, list):  # Redis ``unacked``: [message, exchange, routing_key]
            env = env[0]
            env = json.loads(env) if isinstance(env, str | bytes) else env
        headers = env.get("headers") or {}
        position = STUDY_TASKS.get(str(headers.get("task")))
        if position is None:
            return None
        body = env.get("body")
        if (env.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[position]) if len(args) > position else None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def queued_study_keys(broker_url: str | None, data_dir: Path, *, key_prefix: str = "",
                      timeout: float = 3.0) -> set[str]:
    """Study keys that have a message in the broker (``itvnode.segment_study``, or a split study's
    ``itvnode.segment_phases`` / ``itvnode.finish_study``): waiting in ``inference`` or,
    on Redis, delivered but not yet acknowledged. Raises when the broker cannot be read.

    The embedded broker cannot tell a message a worker holds from one it finished (both are invisible rows):
    callers must allow for the moment between a worker taking a message and the study becoming
    ``processing``. ``key_prefix``: Redis ``global_keyprefix``, if the deployment sets one.
    """
    keys: set[str] = set()
    if is_embedded(broker_url):
        path = embedded_broker_path(data_dir)
        if not path.exists():
            return keys
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
        try:
            rows = con.execute(
                "SELECT m.payload FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
                "WHERE q.name = ? AND m.visible = 1", (QUEUE_INFERENCE,)).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return keys
            raise
        finally:
            con.close()
        payloads: list[Any] = [r[0] for r in rows]
    elif str(broker_url).startswith(("redis://", "rediss://", "redis+socket://")):
        import redis

        client = redis.Redis.from_url(str(broker_url), socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            # kombu's Redis transport: one list per queue and priority step, plus the ``unacked`` hash
            lists = [key_prefix + QUEUE_INFERENCE] + [f"{key_prefix}{QUEUE_INFERENCE}\x06\x16{p}"
                                                       for p in range(1, 10)]
            payloads = [p for name in lists for p in client.lrange(name, 0, -1)]
            payloads += list(client.hvals(key_prefix + "unacked"))
        finally:
            client.close()
    else:
        raise ValueError(f"cannot list the messages of broker {broker_url!r}")
    for payload in payloads:
        key = _study_key_of(payload)
        if key:
            keys.add(key)
    return keys

"""``itvnode run`` (``make run``): the whole node on one machine under one supervisor.

Child processes (each its own session, so a terminal Ctrl-C reaches only the supervisor, which then stops them
in order):

* ``itvnode serve``: the DICOM SCP and the study assembler;
* ``itvnode worker --queues inference``: SAM 3 inference, one study at a time;
* ``itvnode worker --queues export``: C-STORE of results, so a delivery never waits behind an inference.

The broker is the embedded one (SQLite under ``data_dir/broker``) unless ``ITVNODE_BROKER_URL`` is set. The
supervisor itself serves HTTP ``/health`` and ``/metrics``; the export worker sweeps the outbox (see
``worker.tasks``). A child that dies is restarted with a growing delay; one that
keeps dying stops the node with exit status 1 rather than pretending to run.

Shutdown (SIGINT/SIGTERM): SIGTERM to every child (Celery: warm shutdown, the running task finishes); after
``--grace`` seconds a worker still busy gets SIGQUIT (cold shutdown: its unacknowledged message goes back to
the queue), and anything left after 10 more seconds is killed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("itvnode.run")

RESTART_WINDOW_S = 300.0  # restarts counted over this window
MAX_RESTARTS = 5  # more restarts than this within the window: give up


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="spool, manifests, outbox, broker (overrides ITVNODE_DATA_DIR)")
    parser.add_argument("--port", type=int, help="DICOM port (overrides ITVNODE_PORT)")
    parser.add_argument("--http-port", type=int, help="health/metrics port (overrides ITVNODE_HTTP_PORT)")
    parser.add_argument("--no-http", action="store_true", help="do not serve /health and /metrics")
    parser.add_argument(
        "--inference-concurrency",
        type=int,
        default=1,
        help="inference worker processes (default 1: one GPU, one study at a time)",
    )
    parser.add_argument(
        "--export-concurrency", type=int, default=2, help="export worker processes (default 2)"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=60.0,
        help="seconds a worker may finish its task on shutdown before it is stopped cold",
    )


@dataclass
class Child:
    name: str
    argv: list[str]
    stoppable_cold: bool = False  # Celery worker: SIGQUIT = cold shutdown
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)
    next_start: float = 0.0

    def start(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(self.argv, env=env, start_new_session=True)
        log.info("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv[2:]))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """TERM/QUIT go to the child itself (a Celery worker stops its own pool); KILL to its whole group."""
        if self.proc is None:
            return
        try:
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, sig)  # the child and its pool processes (own session)
            elif self.alive:
                os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def _itvnode(*args: str) -> list[str]:
    return [sys.executable, "-m", "itvnode.cli", *args]


def children(args: argparse.Namespace) -> list[Child]:
    verbose = ["-v"] if getattr(args, "verbose", False) else []
    return [
        Child("scp", _itvnode(*verbose, "serve")),
        Child(
            "inference-worker",
            _itvnode(
                *verbose,
                "worker",
                "--queues",
                "inference",
                "--concurrency",
                str(args.inference_concurrency),
                "--hostname",
                "inference@%h",
            ),
            stoppable_cold=True,
        ),
        Child(
            "export-worker",
            _itvnode(
                *verbose,
                "worker",
                "--queues",
                "export",
                "--concurrency",
                str(args.export_concurrency),
                "--hostname",
                "export@%h",
            ),
            stoppable_cold=True,
        ),
    ]


def _stop_all(kids: list[Child], grace: float) -> None:
    # Every child at once: the SCP stops accepting, workers finish (warm shutdown) their current task.
    for kid in kids:
        kid.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(k.alive for k in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for kid in kids:
        if kid.alive and kid.stoppable_cold:
            log.warning(
                "%s still busy after %.0f s: cold shutdown (its task goes back to the queue)", kid.name, grace
            )
            kid.signal(signal.SIGQUIT)
    deadline = time.monotonic() + 10.0
    while any(k.alive for k in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for kid in kids:
        if kid.alive:
            log.error("%s did not stop: killing it", kid.name)
        kid.signal(signal.SIGKILL)  # also any pool process left behind by a child that did stop
    for kid in kids:
        if kid.proc is not None:
            try:
                kid.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) could not be reaped", kid.name, kid.proc.pid)


def run(args: argparse.Namespace) -> int:
    from service.settings import load_settings
    from service.store.durable import secure_data_dir

    overrides: dict[str, Any] = {}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.port is not None:
        overrides["port"] = args.port
    if args.http_port is not None:
        overrides["http_port"] = args.http_port
    settings = load_settings(**overrides)
    secure_data_dir(settings.data_dir)

    env = dict(os.environ)
    env["ITVNODE_DATA_DIR"] = str(settings.data_dir.resolve())
    env["ITVNODE_PORT"] = str(settings.port)
    env["ITVNODE_HTTP_PORT"] = str(settings.http_port)
    env.setdefault("PYTHONUNBUFFERED", "1")

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping the node", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    http = None
    if not args.no_http:
        from itvnode.commands.health import local_dicom_host
        from service.ops.http_server import HealthServer, HealthServerConfig
        from service.ops.reconcile import ReconcilePolicy

        cfg = HealthServerConfig(
            settings.data_dir,
            settings.broker_url,
            settings.min_free_bytes,
            (local_dicom_host(settings.host), settings.port, settings.ae_title),
            ReconcilePolicy.from_settings(settings),
            http_token=settings.http_token,
            destinations=tuple(settings.destinations),
        )
        try:
            http = HealthServer(settings.http_host, settings.http_port, cfg).start()
        except OSError as exc:
            print(f"itvnode run: cannot serve /health on {settings.http_host}:{settings.http_port}: {exc} "
                  "(set ITVNODE_HTTP_PORT, or --no-http)", file=sys.stderr)
            return 2

    broker = settings.broker_url or f"embedded ({settings.broker_dir})"
    log.info(
        "itvnode node: AE %s on port %d, data %s, broker %s",
        settings.ae_title,
        settings.port,
        settings.data_dir,
        broker,
    )
    kids = children(args)
    for kid in kids:
        kid.start(env)

    status = 0
    try:
        while not stop.wait(0.5):
            now = time.monotonic()
            for kid in kids:
                if kid.alive or kid.proc is None:
                    continue
                if kid.next_start == 0.0:
                    code = kid.proc.returncode
                    kid.restarts = [t for t in kid.restarts if now - t < RESTART_WINDOW_S] + [now]
                    if len(kid.restarts) > MAX_RESTARTS:
                        log.error(
                            "%s exited (status %s) %d times within %.0f s: stopping the node",
                            kid.name,
                            code,
                            len(kid.restarts),
                            RESTART_WINDOW_S,
                        )
                        status = 1
                        stop.set()
                        break
                    delay = min(2.0 ** (len(kid.restarts) - 1), 60.0)
                    log.error("%s exited with status %s: restarting in %.0f s", kid.name, code, delay)
                    kid.next_start = now + delay
                elif now >= kid.next_start:
                    kid.next_start = 0.0
                    kid.start(env)
    finally:
        stop.set()
        _stop_all(kids, args.grace)
        if http is not None:
            http.stop()
    log.info("itvnode node stopped")
    return status

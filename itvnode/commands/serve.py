"""``itvnode serve``: the Storage SCP plus the study assembler loop (when installed)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

LOG = logging.getLogger("itvnode.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help="listening port (overrides ITVNODE_PORT)")
    parser.add_argument("--host", help="listening address (overrides ITVNODE_HOST)")
    parser.add_argument("--ae-title", help="our AE title (overrides ITVNODE_AE_TITLE)")
    parser.add_argument("--data-dir", help="spool, manifests, outbox, status (overrides ITVNODE_DATA_DIR)")
    parser.add_argument("--no-assembler", action="store_true",
                        help="only receive into the spool; another process assembles studies")


def _start_assembler(settings: Any, spool: Any, stop_event: threading.Event) -> tuple[Any, Any]:
    """Start ``service.intake.assembler.Assembler`` on the shared spool in a background thread.

    Returns ``(thread, enqueuer)``; both None when the assembler module is not installed.
    """
    try:
        from service.intake.assembler import Assembler
    except ModuleNotFoundError as exc:
        if exc.name != "service.intake.assembler":
            raise
        LOG.warning("service.intake.assembler is not installed: receiving into the spool only")
        return None, None
    from service.intake.queue import Enqueuer

    enqueuer = Enqueuer(settings.broker_url, settings.data_dir)
    assembler = Assembler.from_settings(settings, spool, enqueuer.segment_study)
    thread = threading.Thread(target=assembler.run, name="assembler", daemon=True,
                              kwargs={"stop_event": stop_event, "interval": settings.assembler_interval})
    thread.start()
    _start_reconciler(settings, enqueuer, stop_event)
    return thread, enqueuer


def _start_reconciler(settings: Any, enqueuer: Any, stop_event: threading.Event) -> None:
    """Studies whose task is gone (service.ops.reconcile): checked here, where the jobs are enqueued."""
    from service.ops.reconcile import ReconcilePolicy, Reconciler

    policy = ReconcilePolicy.from_settings(settings)
    reconciler = Reconciler(settings.data_dir, enqueuer.segment_study, policy, broker_url=settings.broker_url)
    threading.Thread(target=reconciler.run, name="reconciler", daemon=True,
                     kwargs={"stop_event": stop_event}).start()


def _start_retention(settings: Any, spool: Any, stop_event: threading.Event) -> None:
    """Purge finished work by age and watermark (service.ops.retention), also on the spool's demand before it
    would refuse with 0xA700."""
    from service.ops.retention import RetentionLoop, RetentionPolicy

    loop = RetentionLoop(settings.paths, spool, RetentionPolicy.from_settings(settings),
                         settings.retention_interval)
    spool.on_low_space = loop.on_low_space
    threading.Thread(target=loop.run, name="retention", daemon=True,
                     kwargs={"stop_event": stop_event}).start()


def run(args: argparse.Namespace) -> int:
    from service.net.scp import serve
    from service.settings import load_settings
    from service.store.durable import secure_data_dir
    from service.store.spool import Spool

    overrides: dict[str, Any] = {}
    for arg, key in (("port", "port"), ("host", "host"), ("ae_title", "ae_title"), ("data_dir", "data_dir")):
        value = getattr(args, arg, None)
        if value is not None:
            overrides[key] = value
    settings = load_settings(**overrides)
    logging.getLogger().setLevel(settings.log_level.upper() if not args.verbose else logging.DEBUG)
    # pynetdicom logs every PDU at INFO; its own warnings and errors are what an operator needs.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    secure_data_dir(settings.data_dir)

    stop_event = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        LOG.info("signal %d: stopping", signum)
        stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    spool = Spool(settings.spool_dir, min_free_bytes=settings.min_free_bytes, fsync=settings.spool_fsync,
                  max_bytes=settings.spool_max_bytes, journal=settings.spool_journal,
                  journal_checkpoint_s=settings.spool_journal_checkpoint)
    spool.reconcile()  # the index is derived from the durable files: catch up after a power cut
    _start_retention(settings, spool, stop_event)
    if not settings.spool_fsync:
        LOG.warning("spool_fsync is off: acknowledged instances can be lost on a power cut")
    thread, enqueuer = (None, None) if args.no_assembler else _start_assembler(settings, spool, stop_event)
    try:
        serve(settings, stop_event=stop_event, spool=spool)
    except OSError as exc:  # at start-up: port taken, address not local, TLS files unreadable
        print(f"itvnode serve: cannot start the SCP on {settings.host}:{settings.port}: {exc}",
              file=sys.stderr)
        return 2
    finally:
        stop_event.set()
        if thread is not None:
            thread.join(timeout=30)
        if enqueuer is not None:
            enqueuer.close()
        spool.close()
    return 0

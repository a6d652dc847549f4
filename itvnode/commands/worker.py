"""``itvnode worker``: a Celery worker consuming ``inference`` and/or ``export``."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queues", default="inference,export",
                        help="comma-separated queues to consume (inference, export); default: both")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="worker processes (default 1: one study per GPU at a time)")
    parser.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"],
                        help="Celery pool (prefork is needed for time limits)")
    parser.add_argument("--hostname", default=None, help="worker node name (default itvnode-<queues>@%%h)")


def model_refusal(settings: Any) -> str | None:
    """Why an inference worker must not start, or None. ``ITVNODE_SAM3_DIR`` / ``ITVNODE_ADAPTER_DIR`` set but
    unusable (directory or file missing, unreadable, adapter not fitting the model) is a configuration error,
    not a reason to run on and skip every SAM 3 structure. Unset: a threshold-only node, which may start.
    Checks files and safetensors headers only (no weights loaded, no torch)."""
    from models.sam3.model_files import Sam3LoadError, check_model_files
    from worker.engine_settings import engine_config

    cfg = engine_config(settings)
    if not cfg.needs_sam3:
        return None
    try:
        check_model_files(cfg.sam3_dir, cfg.adapter_dir)
    except Sam3LoadError as exc:
        return f"{exc} [{exc.cause}]"
    return None


def run(args: argparse.Namespace) -> int:
    import logging

    from service.intake.queue import QUEUES, is_embedded
    from service.settings import load_settings
    from worker.celery_app import app_from_settings, declare_embedded_queues, worker_argv

    settings = load_settings()
    if args.concurrency < 1:
        raise SystemExit("itvnode worker: --concurrency must be >= 1")
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUES]
    if unknown or not queues:
        raise SystemExit(f"itvnode worker: unknown queue(s) {unknown or queues}: "
                         f"choose from {', '.join(QUEUES)}")
    if "inference" in queues:
        refusal = model_refusal(settings)
        if refusal:
            print(f"itvnode worker: refusing to start: {refusal}", file=sys.stderr)
            return 3
    app = app_from_settings(settings)
    try:
        argv = worker_argv(app, queues, args.concurrency, pool=args.pool, hostname=args.hostname,
                           loglevel="DEBUG" if getattr(args, "verbose", False) else settings.log_level)
    except ValueError as exc:
        raise SystemExit(f"itvnode worker: {exc}") from None
    if is_embedded(settings.broker_url):
        declare_embedded_queues(app)
    logging.getLogger(__name__).info("starting worker: queues %s, concurrency %d, broker %s",
                                     ",".join(queues), args.concurrency,
                                     "embedded" if settings.broker_url is None else "external")
    app.worker_main(argv=argv)
    return 0

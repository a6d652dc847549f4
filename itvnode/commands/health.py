"""``itvnode health``: exit 0 when the node is healthy, 1 otherwise; ``--serve`` runs /health + /metrics."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help="check this HTTP /health endpoint instead of checking locally "
        "(e.g. http://127.0.0.1:8080/health)",
    )
    parser.add_argument(
        "--dicom",
        action="store_true",
        help="also C-ECHO the SCP at ITVNODE_HOST (127.0.0.1 when it listens on every address), "
        "ITVNODE_PORT, ITVNODE_AE_TITLE",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="serve HTTP /health and /metrics on ITVNODE_HTTP_HOST:ITVNODE_HTTP_PORT until stopped",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per check (default 5)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def local_dicom_host(host: str) -> str:
    """Where a check on this machine reaches the SCP: its bind address, loopback when it binds them all."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    return "::1" if host == "::" else host


def run(args: argparse.Namespace) -> int:
    from service.ops.health import check_health, check_http
    from service.ops.http_server import HealthServer, HealthServerConfig
    from service.ops.reconcile import ReconcilePolicy
    from service.settings import load_settings

    if args.url:
        ok, body = check_http(args.url, timeout=args.timeout)
        print(body.strip())
        return 0 if ok else 1

    settings = load_settings()
    dicom = (local_dicom_host(settings.host), settings.port, settings.ae_title) if args.dicom else None
    if args.serve:
        import signal
        import threading

        cfg = HealthServerConfig(settings.data_dir, settings.broker_url, settings.min_free_bytes, dicom,
                                 ReconcilePolicy.from_settings(settings), http_token=settings.http_token,
                                 destinations=tuple(settings.destinations))
        server = HealthServer(settings.http_host, settings.http_port, cfg).start()
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        server.stop()
        return 0

    report = check_health(
        settings.data_dir, settings.broker_url, settings.min_free_bytes, dicom, timeout=args.timeout,
        reconcile=ReconcilePolicy.from_settings(settings),
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        for name, c in report.checks.items():
            print(f"{'ok  ' if c['ok'] else 'FAIL'} {name}: {c['detail']}", file=sys.stdout)
    return 0 if report.ok else 1

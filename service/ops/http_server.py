"""The node's HTTP server: ``/health`` (:mod:`service.ops.health`), ``/metrics`` (:mod:`service.ops.metrics`)
and the review dashboard (:mod:`service.ops.dashboard`) on every other path."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.ops.health import check_health
from service.ops.metrics import NodeCollector
from service.ops.reconcile import ReconcilePolicy

log = logging.getLogger(__name__)


@dataclass
class HealthServerConfig:
    data_dir: Path
    broker_url: str | None
    min_free_bytes: int = 0
    dicom: tuple[str, int, str] | None = None  # C-ECHO target checked by /health, when set
    reconcile: ReconcilePolicy | None = None  # stuck-study thresholds (None: the defaults)
    http_token: str | None = None  # the dashboard admin token (None: actions off; service.ops.dashboard)
    destinations: tuple[Any, ...] = ()  # where the dashboard's "resend" sends (settings.destinations)


def _make_handler(cfg: HealthServerConfig, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    from service.ops.dashboard import CSP, MAX_BODY, Dashboard

    dashboard = Dashboard(cfg.data_dir, cfg.http_token, cfg.destinations)

    class Handler(BaseHTTPRequestHandler):
        server_version = "itvnode-health"

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            path = self.path.split("?", 1)[0]
            if path == "/health":
                report = check_health(cfg.data_dir, cfg.broker_url, cfg.min_free_bytes, cfg.dicom,
                                      reconcile=cfg.reconcile)
                self._send(
                    200 if report.ok else 503,
                    "application/json",
                    json.dumps(report.to_json(), indent=1).encode(),
                )
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            else:
                self._dashboard("GET", b"")

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self._send(413, "text/plain", b"request too large\n")
                return
            self._dashboard("POST", self.rfile.read(length))

        def _dashboard(self, method: str, body: bytes) -> None:
            resp = dashboard.handle(method, self.path, dict(self.headers.items()), body)
            self._send(resp.code, resp.ctype, resp.body, {
                "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", **resp.headers})

        def _send(self, code: int, ctype: str, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server API
            log.debug("http %s " + format, self.address_string(), *args)

    return Handler


class HealthServer:
    """HTTP ``/health`` (200/503 + JSON), ``/metrics`` (Prometheus text) and the review dashboard
    (service.ops.dashboard: every other path) in a background thread."""

    def __init__(self, host: str, port: int, cfg: HealthServerConfig) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(NodeCollector(cfg.data_dir, cfg.broker_url))
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(cfg, self.registry))
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="itvnode-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health/metrics HTTP on %s:%d", self.httpd.server_address[0], self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

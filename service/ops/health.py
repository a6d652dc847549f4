"""Health checks and Prometheus metrics, derived from durable state rather than process memory.

Multiprocess design: the node runs as several processes (SCP, assembler, Celery workers, possibly on
several machines). Instead of per-process counters that would need aggregation, every number here is computed
at scrape time from what the node already persists under ``data_dir`` (spool index, study manifests, outbox)
and from the broker (queue depth). Any process that can see ``data_dir`` and the broker serves the same,
complete numbers: ``itvnode run`` serves them from its supervisor, the compose file from a small ``monitor``
service. Counters derived this way can go down when retention removes old studies; Prometheus ``rate()``
treats that as a counter reset.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from service.intake.queue import queued_study_keys
from service.ops.reconcile import ReconcilePolicy, find_stuck

log = logging.getLogger(__name__)

QUEUES = ("inference", "export")
STAGES = (
    "receive", "quiet", "model", "load", "inference", "filter", "rtstruct", "outbox", "report", "export",
)
STATES = ("collecting", "held", "complete", "queued", "processing", "exporting", "done", "failed")
_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)


@dataclass
class HealthReport:
    """Outcome of :func:`check_health`: one entry per check, ``ok`` when every check passed."""

    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks.values())

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks[name] = {"ok": ok, "detail": detail}

    def to_json(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "fail", "checks": self.checks}


def resolve_broker_url(broker_url: str | None, data_dir: Path) -> str:
    """The URL Celery actually uses: the configured one, or the embedded broker's (service.intake.queue
    decides)."""
    if broker_url:
        return broker_url
    from service.intake.queue import celery_config

    return str(celery_config(None, data_dir)["broker_url"])


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def queue_depths(broker_url: str, queues: tuple[str, ...] = QUEUES, timeout: float = 3.0) -> dict[str, int]:
    """Messages waiting in each queue (not counting those a worker holds unacknowledged).

    Uses kombu's passive queue declaration, so it works for Redis and the embedded broker alike. A queue that
    was never declared counts as empty. Raises when the broker cannot be reached.
    """
    from kombu import Connection
    from kombu.exceptions import ChannelError

    depths: dict[str, int] = {}
    options: dict[str, Any] = {}
    if broker_url.startswith(("redis://", "rediss://")):
        options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    with Connection(broker_url, connect_timeout=timeout, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
        for name in queues:
            channel = conn.channel()
            try:
                _, count, _ = channel.queue_declare(queue=name, passive=True)
                depths[name] = int(count)
            except ChannelError:
                depths[name] = 0
            finally:
                channel.close()
    return depths


def check_data_dir(data_dir: Path, min_free_bytes: int) -> tuple[bool, str]:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / f".health-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return False, f"{data_dir} not writable: {exc.strerror or exc}"
    free = shutil.disk_usage(data_dir).free
    if free < min_free_bytes:
        return False, f"{data_dir}: {free / 1e9:.2f} GB free, below the {min_free_bytes / 1e9:.2f} GB floor"
    return True, f"{data_dir} writable, {free / 1e9:.1f} GB free"


def check_broker(broker_url: str, timeout: float = 3.0) -> tuple[bool, str]:
    try:
        depths = queue_depths(broker_url, timeout=timeout)
    except Exception as exc:  # any transport error means "unreachable" for a health check
        return False, f"broker {_redact(broker_url)} unreachable: {exc}"
    return True, f"broker {_redact(broker_url)} reachable, queued " + ", ".join(
        f"{k}={v}" for k, v in depths.items()
    )


def check_dicom(
    host: str, port: int, called_ae: str, calling_ae: str = "ITVNODE-HEALTH", timeout: float = 5.0
) -> tuple[bool, str]:
    """C-ECHO the SCP. Note: an SCP restricted to ``allowed_callers`` must allow the calling AE."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        return False, f"no association with {called_ae}@{host}:{port}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        return False, f"C-ECHO to {called_ae}@{host}:{port} answered {code!r}"
    return True, f"C-ECHO to {called_ae}@{host}:{port} ok"


def check_health(
    data_dir: Path,
    broker_url: str | None,
    min_free_bytes: int = 0,
    dicom: tuple[str, int, str] | None = None,
    timeout: float = 3.0,
    reconcile: ReconcilePolicy | None = None,
) -> HealthReport:
    """Data directory writable with space, broker reachable, no study stuck (its task gone: see
    service.ops.reconcile; thresholds from ``reconcile``, else the defaults), optionally the SCP answering
    C-ECHO."""
    report = report_data_and_broker(data_dir, broker_url, min_free_bytes, timeout)
    broker_ok = bool(report.checks.get("broker", {}).get("ok"))
    report.add("studies", *check_stuck(data_dir, broker_url, reconcile or ReconcilePolicy(),
                                       broker_ok=broker_ok, timeout=timeout))
    report.add("model", *check_model(data_dir))
    if dicom is not None:
        report.add("dicom", *check_dicom(dicom[0], dicom[1], dicom[2], timeout=timeout))
    return report


def latest_model_record(data_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """(study key, ``results.model``) of the study most recently segmented (worker.pipeline writes it)."""
    best: tuple[float, str, dict[str, Any]] | None = None
    for m in iter_manifests(data_dir):
        rec = (m.get("results") or {}).get("model")
        if isinstance(rec, dict) and isinstance(rec.get("at"), int | float):
            if best is None or float(rec["at"]) > best[0]:
                best = (float(rec["at"]), str(m.get("study_key", "")), rec)
    return None if best is None else (best[1], best[2])


def check_model(data_dir: Path) -> tuple[bool, str]:
    """Not ok while the latest study skipped its SAM 3 structures because the configured model is broken
    (directory or file missing, adapter mismatch...; ``broken`` in the record). A node without a model by
    choice (ITVNODE_SAM3_DIR unset) is healthy; the next study run with a working model clears it."""
    found = latest_model_record(data_dir)
    if found is None:
        return True, "no study segmented yet"
    key, rec = found
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(rec["at"])))
    if rec.get("loaded"):
        return True, f"SAM 3 loaded for the latest study ({key}, {when})"
    skipped = ", ".join(rec.get("skipped") or []) or "none"
    detail = (f"SAM 3 not loaded for the latest study ({key}, {when}): {rec.get('cause')}: "
              f"{rec.get('reason')}; structures skipped: {skipped}")
    return not rec.get("broken"), detail


def check_stuck(data_dir: Path, broker_url: str | None, policy: ReconcilePolicy, *, broker_ok: bool = True,
                timeout: float = 3.0) -> tuple[bool, str]:
    """Not ok while a study is ``processing``/``queued`` with its task gone (the rules of
    service.ops.reconcile, whose reconciler re-queues or fails it within ``reconcile_interval``)."""
    keys = None
    if broker_ok:
        try:
            keys = queued_study_keys(broker_url, data_dir, timeout=timeout)
        except Exception as exc:
            log.warning("health: cannot list the broker's messages: %s", exc)
    stuck = find_stuck(data_dir, policy, broker_keys=keys)
    if not stuck:
        return True, "no study stuck" + ("" if keys is not None else " (queued studies not checked)")
    listed = "; ".join(f"{s.study_key} ({s.state}: {s.reason})" for s in stuck[:10])
    more = f" and {len(stuck) - 10} more" if len(stuck) > 10 else ""
    return False, f"{len(stuck)} stuck stud{'y' if len(stuck) == 1 else 'ies'}: {listed}{more}"


def report_data_and_broker(
    data_dir: Path, broker_url: str | None, min_free_bytes: int, timeout: float
) -> HealthReport:
    report = HealthReport()
    report.add("data_dir", *check_data_dir(data_dir, min_free_bytes))
    try:
        url = resolve_broker_url(broker_url, data_dir)
    except Exception as exc:
        report.add("broker", False, f"cannot resolve broker: {exc}")
        return report
    report.add("broker", *check_broker(url, timeout=timeout))
    return report


def check_http(url: str, timeout: float = 5.0) -> tuple[bool, str]:
    """GET a /health endpoint; healthy when it answers 200."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - operator-given URL
            body = resp.read(65536).decode("utf-8", "replace")
            return resp.status == 200, body
    except urllib.error.HTTPError as exc:
        return False, exc.read(65536).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return False, f"{url}: {exc}"


# --------------------------------------------------------------------------------------------- metrics


def iter_manifests(data_dir: Path) -> Iterator[dict[str, Any]]:
    """Raw manifest dicts under ``data_dir/studies`` (tolerant: unreadable files are skipped and logged)."""
    root = data_dir / "studies"
    if not root.is_dir():
        return
    for path in sorted(root.glob("*/manifest.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("metrics: skipping unreadable manifest %s: %s", path, exc)
            continue
        if isinstance(data, dict):
            yield data


def _count_instances(data_dir: Path) -> int | None:
    """Rows of the spool index (service.store.spool), read-only so a scrape never takes a write lock."""
    index = data_dir / "spool" / "index.sqlite"
    if not index.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5.0)
        try:
            return int(con.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error as exc:
        log.warning("metrics: cannot read spool index: %s", exc)
        return None


def _export_counts(data_dir: Path) -> dict[str, int]:
    """Outbox items by state, from service.store.outbox's layout: ``items/`` (pending), ``done/`` (finished)
    and ``dead/<item>/<destination>/reason.json`` (dead letters, one per destination given up)."""
    root = data_dir / "outbox"
    if not root.is_dir():
        return {}
    return {
        "pending": sum(1 for _ in root.glob("items/*/item.json")),
        "finished": sum(1 for _ in root.glob("done/*/item.json")),
        "dead": sum(1 for _ in root.glob("dead/*/*/reason.json")),
    }


class _QAMetrics:
    """Phase coverage and QA of each study (the manifest's ``cycle``, ``released`` and ``results.qa``)."""

    def __init__(self) -> None:
        self.phases = GaugeMetricFamily(
            "itvnode_study_phases", "Phases of the breathing cycle per study: used (in the ITV) and expected",
            labels=["study_key", "kind"])
        self.incomplete: dict[str, int] = {}
        self.released = 0
        self.kinds: dict[str, int] = {}
        self.motion = GaugeMetricFamily(
            "itvnode_study_motion_mm", "Peak-to-peak centroid motion of enveloped structures (SI/AP/LR/3D)",
            labels=["study_key", "structure", "axis"])
        self.envelope = GaugeMetricFamily(
            "itvnode_study_envelope_ratio", "Envelope (ITV) volume over its structure's largest phase volume",
            labels=["study_key", "envelope"])

    def add(self, m: dict[str, Any]) -> None:
        from service.store.manifest import Cycle

        key, state = str(m.get("study_key", "")), str(m.get("state", ""))
        try:
            cycle = Cycle.model_validate(m["cycle"]) if m.get("cycle") else None
        except ValueError:
            cycle = None
        if cycle is not None:
            self.phases.add_metric([key, "used"], cycle.used)
            self.phases.add_metric([key, "expected"], cycle.expected)
            if not cycle.complete:
                self.incomplete[state] = self.incomplete.get(state, 0) + 1
        self.released += 1 if m.get("released") else 0
        summary = (m.get("results") or {}).get("qa") or {}
        for kind in summary.get("flag_kinds") or []:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        for structure, motion in (summary.get("motion_mm") or {}).items():
            for axis, mm in (motion or {}).items():
                if isinstance(mm, int | float):
                    self.motion.add_metric([key, structure, axis], mm)
        for name, env in (summary.get("envelopes") or {}).items():
            ratio = (env or {}).get("ratio_to_largest_phase")
            if isinstance(ratio, int | float):
                self.envelope.add_metric([key, name], ratio)

    def metrics(self) -> Iterator[Metric]:
        yield self.phases
        g = GaugeMetricFamily("itvnode_studies_incomplete_cycle",
                              "Studies whose phases do not cover the breathing cycle, by state",
                              labels=["state"])
        for state, n in sorted(self.incomplete.items()):
            g.add_metric([state], n)
        yield g
        yield GaugeMetricFamily("itvnode_studies_released", "Studies an admin released from held",
                                value=self.released)
        w = GaugeMetricFamily("itvnode_qa_warnings", "QA warnings of the known studies, by kind",
                              labels=["kind"])
        for kind, n in sorted(self.kinds.items()):
            w.add_metric([kind], n)
        yield w
        yield self.motion
        yield self.envelope


class NodeCollector(Collector):
    """Prometheus collector computing every metric from ``data_dir`` and the broker at scrape time."""

    def __init__(self, data_dir: Path, broker_url: str | None) -> None:
        self.data_dir = data_dir
        self.broker_url = broker_url

    def collect(self) -> Iterator[Metric]:
        t0 = time.monotonic()
        by_state = dict.fromkeys(STATES, 0)
        completed = failed = 0
        stage_obs: dict[str, list[float]] = {s: [] for s in STAGES}
        phase_slices = 0
        qa = _QAMetrics()
        skipped: dict[tuple[str, str], int] = {}
        latest: tuple[float, dict[str, Any]] | None = None
        for m in iter_manifests(self.data_dir):
            qa.add(m)
            results = m.get("results") or {}
            rec = results.get("model")
            if isinstance(rec, dict) and isinstance(rec.get("at"), int | float):
                if latest is None or float(rec["at"]) > latest[0]:
                    latest = (float(rec["at"]), rec)
                for name in rec.get("skipped") or []:
                    k = (str(name), str(rec.get("cause") or "unknown"))
                    skipped[k] = skipped.get(k, 0) + 1
            elif isinstance(results.get("skipped"), dict):  # written before results.model existed
                for name in results["skipped"]:
                    skipped[(str(name), "unknown")] = skipped.get((str(name), "unknown"), 0) + 1
            state = str(m.get("state", ""))
            by_state[state] = by_state.get(state, 0) + 1
            history = m.get("history") or []
            completed += 1 if any(isinstance(h, dict) and h.get("state") == "done" for h in history) else 0
            failed += 1 if state == "failed" else 0
            for p in m.get("phases") or []:
                phase_slices += int(p.get("slices") or 0)
            timings = (m.get("results") or {}).get("timings") or {}
            for stage, secs in timings.items():
                if stage in stage_obs and isinstance(secs, int | float):
                    stage_obs[stage].append(float(secs))

        g = GaugeMetricFamily("itvnode_studies", "Studies known to the node, by state", labels=["state"])
        for state, n in sorted(by_state.items()):
            g.add_metric([state], n)
        yield g
        yield CounterMetricFamily(
            "itvnode_studies_completed", "Studies whose RTSTRUCT reached the done state", value=completed
        )
        yield CounterMetricFamily("itvnode_studies_failed", "Studies whose processing failed", value=failed)

        yield from qa.metrics()
        ml = GaugeMetricFamily(
            "itvnode_model_loaded",
            "1 when SAM 3 was loaded for the most recently segmented study, 0 when it was not (no sample "
            "before the first study)", labels=["cause"])
        if latest is not None:
            ml.add_metric([str(latest[1].get("cause") or "loaded")], 1 if latest[1].get("loaded") else 0)
        yield ml
        sk = CounterMetricFamily(
            "itvnode_structures_skipped",
            "Structures left out of a study's RTSTRUCT, by structure and cause (not_configured, dir_missing, "
            "file_missing, file_invalid, adapter_mismatch, weights_mismatch, load_error)",
            labels=["structure", "cause"])
        for (name, cause), n in sorted(skipped.items()):
            sk.add_metric([name, cause], n)
        yield sk

        received = _count_instances(self.data_dir)
        yield CounterMetricFamily(
            "itvnode_instances_received",
            "DICOM instances received and held in the spool",
            value=received if received is not None else 0,
        )
        yield CounterMetricFamily(
            "itvnode_phase_slices_assembled", "CT slices in assembled 4D phases", value=phase_slices
        )

        h = HistogramMetricFamily(
            "itvnode_stage_duration_seconds", "Wall time per pipeline stage, per study", labels=["stage"]
        )
        for stage, values in stage_obs.items():
            buckets = [(str(b), sum(1 for v in values if v <= b)) for b in _BUCKETS]
            buckets.append(("+Inf", len(values)))
            h.add_metric([stage], buckets, sum(values))
        yield h

        from service.ops.retention import RetentionStats
        from service.store.layout import DataLayout

        purged = RetentionStats(DataLayout(self.data_dir)).read()
        ps = CounterMetricFamily("itvnode_purged_studies", "Studies purged, by reason (age, watermark, admin "
                                 "purge, delete)", labels=["reason"])
        pb = CounterMetricFamily("itvnode_purged_bytes", "Bytes freed by purges, by reason",
                                 labels=["reason"])
        for reason in sorted(purged["studies"]):
            ps.add_metric([reason], purged["studies"][reason])
            pb.add_metric([reason], purged["bytes"][reason])
        yield ps
        yield pb
        free = GaugeMetricFamily("itvnode_data_free_bytes", "Free bytes on the data directory's file system")
        try:
            free.add_metric([], shutil.disk_usage(self.data_dir).free)
        except OSError:
            pass
        yield free

        exports = _export_counts(self.data_dir)
        yield CounterMetricFamily(
            "itvnode_export_failures", "Export items given up (dead letter)", value=exports.get("dead", 0)
        )
        eg = GaugeMetricFamily("itvnode_outbox_items", "Outbox items by state", labels=["state"])
        for state, n in sorted(exports.items()):
            eg.add_metric([state], n)
        yield eg

        qd = GaugeMetricFamily(
            "itvnode_queue_depth", "Messages waiting in each Celery queue", labels=["queue"]
        )
        up = 1
        try:
            depths = queue_depths(resolve_broker_url(self.broker_url, self.data_dir), timeout=2.0)
            for q, n in depths.items():
                qd.add_metric([q], n)
        except Exception as exc:
            log.warning("metrics: broker unreachable: %s", exc)
            up = 0
        yield qd
        yield GaugeMetricFamily("itvnode_broker_up", "1 when the broker answered this scrape", value=up)
        yield GaugeMetricFamily(
            "itvnode_scrape_duration_seconds", "Time to compute these metrics", value=time.monotonic() - t0
        )


# --------------------------------------------------------------------------------------------- HTTP


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

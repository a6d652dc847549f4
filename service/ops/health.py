"""Health checks: data directory writable with space, broker reachable, no study stuck, the model usable,
optionally the SCP answering C-ECHO; :func:`check_health` runs them for ``/health`` and ``itvnode health``.

Like the metrics (:mod:`service.ops.metrics`), every answer comes from what the node persists under
``data_dir`` and from the broker, so any process that sees both gives the same answer.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.intake.queue import queued_study_keys
from service.ops.reconcile import ReconcilePolicy, find_stuck
from service.store.manifest import iter_manifest_dicts

log = logging.getLogger(__name__)

QUEUES = ("inference", "export")


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
    for m in iter_manifest_dicts(data_dir):
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

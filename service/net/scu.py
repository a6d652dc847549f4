"""C-STORE SCU: send DICOM files, as stored, to one destination and classify every failure.

Files are sent raw (pynetdicom's chunked-file mode: the bytes after the File Meta Information go on the
wire unchanged), each in a presentation context proposing exactly the file's own transfer syntax, so
nothing is ever transcoded. Our socket has ``TCP_NODELAY`` set: dcmtk and Orthanc keep Nagle's algorithm
on, and with it on at both ends every C-STORE waits ~40 ms for a delayed ACK.

Every failure is classified as *permanent* (retrying cannot help: association rejected permanently, SOP
class or transfer syntax refused, C-STORE status 0xA9xx / 0xCxxx / 0x0122 ...) or *transient* (connection
refused, timeout, abort, 0xA7xx out of resources ...). :mod:`service.store.outbox` turns that into retries or
a dead letter; :func:`deliver_item` ties the two together for the export task. The pynetdicom internals
overridden here (socket factory, reactor guard, chunked-send switch) are fenced in
:mod:`service.net._pynetdicom_fast`.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from service.net._pynetdicom_fast.ae import NoDelayAE
from service.net._pynetdicom_fast.config import send_files_as_stored
from service.net._pynetdicom_fast.dimse import guard_reactor
from service.net.connect_errors import RecordingSSLSocket, describe_oserror
from service.net.tls import client_context
from service.setting_values import Destination
from service.store.outbox import Outbox
from service.store.outbox_item import DestinationState, FileInfo, read_file_info

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # DICOM PS3.8: at most 128 presentation contexts per association

# C-STORE statuses (PS3.4 B.2.3 and PS3.7 C) that will not change on a retry.
_PERMANENT_STATUSES = {
    0x0122: "SOP class not supported",
    0x0124: "refused: not authorised",
    0x0117: "invalid SOP instance",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
}
_WARNING_STATUSES = {0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}

# A-ASSOCIATE-RJ (PS3.8 9.3.4): (source, diagnostic) -> text
_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def classify_status(status: int) -> tuple[bool, bool, str]:
    """Return ``(delivered, permanent, text)`` for a C-STORE response status."""
    if status == 0x0000:
        return True, False, "success"
    if status in _WARNING_STATUSES:
        return True, False, f"warning 0x{status:04X}"
    if status in _PERMANENT_STATUSES:
        return False, True, f"failure 0x{status:04X}: {_PERMANENT_STATUSES[status]}"
    if 0xA700 <= status <= 0xA7FF:
        return False, False, f"failure 0x{status:04X}: out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return False, True, f"failure 0x{status:04X}: data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return False, True, f"failure 0x{status:04X}: cannot understand"
    # 0x0110 processing failure, 0x0213 resource limitation, unknown codes: may well succeed later.
    return False, False, f"failure 0x{status:04X}"


@dataclass(frozen=True)
class FileResult:
    path: Path
    sop_instance_uid: str
    delivered: bool
    permanent: bool = False
    status: int | None = None  # C-STORE status when a response came back
    message: str = ""


@dataclass
class StoreOutcome:
    """What happened to each file of one send to one destination."""

    destination: str
    results: list[FileResult] = field(default_factory=list)
    connected: bool = False  # the TCP connection was opened at least once
    error: str | None = None  # association-level problem (unreachable, rejected, aborted), if any

    @property
    def ok(self) -> bool:
        return self.error is None and all(r.delivered for r in self.results)

    @property
    def permanent(self) -> bool:
        return any(r.permanent for r in self.results)

    @property
    def delivered(self) -> list[FileResult]:
        return [r for r in self.results if r.delivered]

    def delivered_uids(self) -> set[str]:
        return {r.sop_instance_uid for r in self.results if r.delivered}

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if not r.delivered]

    def summary(self) -> str:
        failed = self.failed
        if not failed:
            return f"{len(self.results)} file(s) delivered"
        msgs = sorted({r.message for r in failed})
        head = "; ".join(msgs[:3]) + (f"; (+{len(msgs) - 3} more)" if len(msgs) > 3 else "")
        return f"{len(failed)} of {len(self.results)} file(s) not delivered: {head}"


def _batches(infos: Sequence[FileInfo]) -> list[list[FileInfo]]:
    """Split files so that each association needs at most 128 (SOP class, transfer syntax) contexts."""
    batches: list[list[FileInfo]] = []
    current: list[FileInfo] = []
    pairs: set[tuple[str, str]] = set()
    for info in infos:
        pair = (info.sop_class_uid, info.transfer_syntax_uid)
        if pair not in pairs and len(pairs) == MAX_CONTEXTS:
            batches.append(current)
            current, pairs = [], set()
        pairs.add(pair)
        current.append(info)
    if current:
        batches.append(current)
    return batches


def send_files(
    files: Iterable[Path],
    destination: Destination,
    calling_ae: str,
    *,
    connect_timeout: float = 10.0,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    network_timeout: float = 60.0,
) -> StoreOutcome:
    """C-STORE ``files`` to ``destination`` over one association (more if > 128 contexts are needed).

    Never raises for network or peer problems: everything lands in the returned :class:`StoreOutcome`.
    """
    send_files_as_stored()
    outcome = StoreOutcome(destination=str(destination))
    infos: list[FileInfo] = []
    for path in files:
        path = Path(path)
        try:
            infos.append(read_file_info(path))
        except (ValueError, OSError) as exc:
            outcome.results.append(FileResult(path, "", delivered=False, permanent=True, message=str(exc)))
    for batch in _batches(infos):
        _send_batch(batch, destination, calling_ae, outcome, connect_timeout=connect_timeout,
                    acse_timeout=acse_timeout, dimse_timeout=dimse_timeout, network_timeout=network_timeout)
    return outcome


def _send_batch(
    batch: list[FileInfo],
    destination: Destination,
    calling_ae: str,
    outcome: StoreOutcome,
    *,
    connect_timeout: float,
    acse_timeout: float,
    dimse_timeout: float,
    network_timeout: float,
) -> None:
    ae = NoDelayAE(ae_title=calling_ae)
    ae.maximum_pdu_size = 0
    ae.connection_timeout = connect_timeout
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in batch})
    ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in pairs]
    tls_args = None
    if destination.tls is not None:
        try:
            tls = destination.tls
            ctx = client_context(tls.ca, tls.cert, tls.key)
            ctx.sslsocket_class = RecordingSSLSocket  # to report why a handshake failed
            tls_args = (ctx, destination.host)
        except (OSError, ssl.SSLError) as exc:
            msg = f"TLS configuration for {destination}: {exc}"
            outcome.results.extend(FileResult(i.path, i.sop_instance_uid, False, permanent=True, message=msg)
                                   for i in batch)
            outcome.error = msg
            return

    opened = threading.Event()
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             max_pdu=0, tls_args=tls_args,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda _e: opened.set())])
    except OSError as exc:  # pynetdicom resolves the host name before connecting (socket.gaierror)
        msg = f"cannot reach {destination}: {describe_oserror(exc, connect_timeout)}"
        outcome.error = msg
        outcome.results.extend(FileResult(i.path, i.sop_instance_uid, False, message=msg) for i in batch)
        ae.shutdown()
        return
    if opened.is_set():
        outcome.connected = True
    if not assoc.is_established:
        err, permanent = _association_failure(assoc, destination, acse_timeout, opened.is_set())
        outcome.error = err
        outcome.results.extend(FileResult(i.path, i.sop_instance_uid, False, permanent=permanent, message=err)
                               for i in batch)
        ae.shutdown()
        return
    guard_reactor(assoc)
    try:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        broken: str | None = None  # set once a C-STORE got no answer: the association is gone
        for info in batch:
            if broken is None and not assoc.is_established:
                broken = "association aborted by the peer" if assoc.is_aborted else "association lost"
            if broken is not None:
                outcome.error = broken
                outcome.results.append(FileResult(info.path, info.sop_instance_uid, False,
                                                  message=f"not sent: {broken}"))
                continue
            if (info.sop_class_uid, info.transfer_syntax_uid) not in accepted:
                msg = (f"peer refused SOP class {info.sop_class_uid} with transfer syntax "
                       f"{info.transfer_syntax_uid} (presentation context rejected)")
                outcome.results.append(FileResult(info.path, info.sop_instance_uid, False, permanent=True,
                                                  message=msg))
                continue
            result = _store_one(assoc, info)
            outcome.results.append(result)
            if result.status is None:
                broken = result.message
        if assoc.is_established:
            assoc.release()
    finally:
        if assoc.is_established:
            assoc.abort()
        ae.shutdown()


def _store_one(assoc: Association, info: FileInfo) -> FileResult:
    try:
        rsp = assoc.send_c_store(info.path)
    except (RuntimeError, ValueError, AttributeError, OSError) as exc:
        return FileResult(info.path, info.sop_instance_uid, False,
                          message=f"C-STORE could not be sent: {exc}")
    status = rsp.get("Status") if rsp is not None else None
    if status is None:
        return FileResult(info.path, info.sop_instance_uid, False,
                          message="no C-STORE response (association aborted or DIMSE timeout)")
    delivered, permanent, text = classify_status(int(status))
    comment = rsp.get("ErrorComment")
    if comment:
        text = f"{text} ({comment})"
    return FileResult(info.path, info.sop_instance_uid, delivered, permanent=permanent, status=int(status),
                      message=text)


def _association_failure(
    assoc: Association, destination: Destination, acse_timeout: float, opened: bool
) -> tuple[str, bool]:
    """Explain why the association was not established; ``(message, permanent)``."""
    where = str(destination)
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        result = getattr(rj, "result", None)
        source = getattr(rj, "result_source", None)
        diag = getattr(rj, "diagnostic", None)
        reason = _REJECT_REASONS.get((int(source or 0), int(diag or 0)),
                                     f"source {source}, diagnostic {diag}")
        if result == 0x01:
            return f"association rejected (permanent) by {where}: {reason}", True
        return f"association rejected (transient) by {where}: {reason}", False
    sock = assoc.dul.socket
    if not opened:
        detail = getattr(sock, "connect_error", None)
        if detail is None and destination.tls is not None:
            detail = "TCP connection or TLS handshake failed"
        return f"cannot reach {where}: {detail or 'connection failed'}", False
    acceptor = assoc.acceptor.primitive
    if acceptor is not None and getattr(acceptor, "result", None) == 0x00:
        # pynetdicom aborts an accepted association in which no presentation context was accepted
        return (f"{where} accepted none of the proposed SOP class / transfer syntax pairs "
                "(presentation contexts rejected)"), True
    if assoc.is_aborted:
        if acceptor is None:
            return f"no association response from {where} within {acse_timeout} s (or aborted)", False
        return f"association aborted by {where}", False
    return f"association with {where} not established", False


# --------------------------------------------------------------------------------------------------- outbox


@dataclass(frozen=True)
class Timeouts:
    """Seconds: TCP connect, association response, each C-STORE response, socket idle."""

    connect: float = 10.0
    acse: float = 30.0
    dimse: float = 120.0
    network: float = 120.0

    @classmethod
    def from_settings(cls, settings: Any) -> Timeouts:
        return cls(connect=settings.export_connect_timeout, acse=settings.export_acse_timeout,
                   dimse=settings.export_dimse_timeout,
                   network=max(settings.export_dimse_timeout, settings.export_acse_timeout))


def deliver_item(
    outbox: Outbox,
    item_id: str,
    calling_ae: str,
    *,
    destination: str | None = None,
    now: float | None = None,
    force: bool = False,
    timeouts: Timeouts | None = None,
) -> dict[str, DestinationState]:
    """Attempt every due destination of an outbox item (or only ``destination``), each in its own thread.

    A destination is attempted only when pending and due (``force`` ignores the schedule) and when no other
    worker holds its lock; only the files it has not acknowledged yet are sent. Returns the new state of each
    destination attempted. Unknown or finished items are a no-op (a stale or duplicate message).
    """
    item = outbox.find(item_id)
    if item is None:
        log.warning("outbox item %s does not exist; nothing to deliver", item_id)
        return {}
    t0 = time.time() if now is None else now
    keys = [k for k, st in sorted(item.destinations.items())
            if st.status == "pending" and (force or st.next_attempt_at <= t0)
            and (destination is None or k == destination)]
    if not keys:
        return {}
    timeouts = timeouts or Timeouts()

    def one(key: str) -> DestinationState | None:
        with outbox.destination_lock(item_id, key) as locked:
            if not locked:
                log.info("outbox item %s to %s: another worker is delivering it", item_id, key)
                return None
            current = outbox.find(item_id)  # re-read under the lock: it may have been delivered meanwhile
            if current is None:
                return None
            st = current.destinations[key]
            if st.status != "pending" or not (force or st.next_attempt_at <= t0):
                return None
            done = set(st.delivered)
            files = [p for p, f in zip(outbox.files(current), current.files, strict=True)
                     if f.sop_instance_uid not in done]
            log.info("outbox item %s (study %s): sending %d file(s) to %s, attempt %d", item_id,
                     current.study_key, len(files), key, st.attempts + 1)
            outcome = send_files(files, st.destination, calling_ae, connect_timeout=timeouts.connect,
                                 acse_timeout=timeouts.acse, dimse_timeout=timeouts.dimse,
                                 network_timeout=timeouts.network)
            return outbox.record(item_id, key, outcome, now=None if now is None else now)

    results: dict[str, DestinationState] = {}
    with ThreadPoolExecutor(max_workers=len(keys), thread_name_prefix="export") as pool:
        for key, state in zip(keys, pool.map(one, keys), strict=True):
            if state is not None:
                results[key] = state
    return results

"""DICOM Storage SCP: C-ECHO and C-STORE of the CT family into the durable spool.

Each C-STORE is written as received (``event.encoded_dataset()``: no transcoding, no pixel decoding), made
durable and indexed by :class:`service.store.spool.Spool` before the success status goes back. Every failure
maps to
a DIMSE status through :mod:`service.net.dimse_status`; the server keeps serving whatever a peer sends.

Association policy (called AE title, calling AE allowlist optionally bound to peer IPs, association limit) is
checked during negotiation and refused with the standard A-ASSOCIATE-RJ reasons; idle connections and the
per-IP connection limit are :mod:`service.net.admission`'s. Accepted sockets get
``TCP_NODELAY`` (Nagle costs ~45 ms per instance with dcmtk peers, see DESIGN.md).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pynetdicom
from pydicom import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import (
    JPEGLossless as JPEGLosslessP14,
)
from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_P_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from service.net import dimse_status
from service.net.admission import ConnectionGate
from service.store.header_scan import meta_from_bytes
from service.store.instance_meta import CT_STORAGE_CLASSES, InstanceMeta
from service.store.spool import Spool

if TYPE_CHECKING:
    from service.settings import Settings

LOG = logging.getLogger(__name__)

#: Transfer syntaxes accepted for every CT storage SOP class, stored as received.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLosslessP14,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

OnStored = Callable[[InstanceMeta], None]


@dataclass(frozen=True)
class CallerPolicy:
    """Who may associate. Empty ``allowed_callers``: any caller; ``caller_ips`` binds an AE to peer IPs."""

    ae_title: str
    require_called_ae: bool = True
    allowed_callers: tuple[str, ...] = ()
    caller_ips: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def rejection(self, calling: str, called: str, peer_ip: str) -> tuple[tuple[int, int, int], str] | None:
        """``((result, source, reason), why)`` for A-ASSOCIATE-RJ, or None to go on negotiating."""
        calling, called = calling.strip(), called.strip()
        if self.require_called_ae and called != self.ae_title:
            return (0x01, 0x01, 0x07), f"called AE title {called!r} is not {self.ae_title!r}"
        if self.allowed_callers and calling not in self.allowed_callers:
            return (0x01, 0x01, 0x03), f"calling AE title {calling!r} is not in allowed_callers"
        ips = self.caller_ips.get(calling)
        if ips and peer_ip not in ips:
            return (0x01, 0x01, 0x03), f"calling AE title {calling!r} is not allowed from {peer_ip}"
        return None


class _PolicyACSE(ACSE):
    """ACSE that applies :class:`CallerPolicy`, then takes a slot from the :class:`ConnectionGate`, before
    pynetdicom's own negotiation (whose association count is switched off: it counted idle connections)."""

    def __init__(self, assoc: Association, policy: CallerPolicy, gate: ConnectionGate) -> None:
        super().__init__(assoc)
        self._policy = policy
        self._gate = gate

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        calling = str(getattr(rq, "calling_ae_title", "") or "").strip()
        called = str(getattr(rq, "called_ae_title", "") or "")
        peer_ip = str(self.requestor.address)
        refused = self._policy.rejection(calling, called, peer_ip)
        if refused is not None:
            (result, source, reason), why = refused
            self._gate.log.warning(("policy", peer_ip, calling), "association from %s rejected: %s",
                                   peer_ip, why)
        else:
            wrapper = self.assoc.dul.socket
            sock = wrapper.socket if wrapper is not None else None
            if self._gate.request(sock, peer_ip, calling) is None:  # logs its own refusal line
                _prefer_requestor_order(getattr(rq, "presentation_context_definition_list", None) or [])
                super()._negotiate_as_acceptor()
                return
            # transient, service provider (presentation), local limit exceeded
            result, source, reason = 0x02, 0x03, 0x02
        self.requestor.ae_title = calling
        self.send_reject(result, source, reason)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


def _prefer_requestor_order(contexts: list[Any]) -> None:
    """Keep, per proposed context, only the requestor's first transfer syntax that we accept.

    pynetdicom otherwise picks by the acceptor's order; a sender lists its stored encoding first, so
    honouring its order means nobody transcodes (e.g. an RLE file goes as RLE, not decoded by the SCU).
    """
    supported = set(TRANSFER_SYNTAXES)
    for cx in contexts:
        if cx.abstract_syntax not in CT_STORAGE_CLASSES:
            continue
        first = next((ts for ts in cx.transfer_syntax if ts in supported), None)
        if first is not None and len(cx.transfer_syntax) > 1:
            cx.transfer_syntax = [first]


#: Largest PDU accepted when ``maximum_pdu_size`` is 0 ("unlimited"): a sane bound all the same.
UNLIMITED_PDU_BOUND = 64 * 1024 * 1024
#: A-ASSOCIATE-RQ/AC carry presentation contexts and user items: 128 contexts with many transfer syntaxes
#: stay well below this.
ASSOCIATION_PDU_BOUND = 1024 * 1024
_SMALL_PDU_BOUND = 64  # A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT have a 4-byte variable field
_RECV_CHUNK = 4 * 1024 * 1024  # buffers grow by what actually arrives, never by what a peer claims


def pdu_length_limit(pdu_type: int, maximum_pdu_size: int) -> int:
    """Largest PDU length (the header's length field) accepted for ``pdu_type`` before reading its body.

    P-DATA-TF is bounded by the maximum we advertise (``0`` advertises no limit and is held to
    :data:`UNLIMITED_PDU_BOUND`); association PDUs are small by nature.
    """
    if pdu_type == 0x04:
        return maximum_pdu_size if maximum_pdu_size > 0 else UNLIMITED_PDU_BOUND
    if pdu_type in (0x01, 0x02):
        return ASSOCIATION_PDU_BOUND
    return _SMALL_PDU_BOUND


class _FastSocket(AssociationSocket):
    """``recv`` into preallocated buffers instead of 4 KiB ``bytearray.extend`` steps (the stock loop is
    the largest single cost when a peer sends 512x512 CT slices). Buffers are at most :data:`_RECV_CHUNK`
    ahead of the bytes received, so a length a peer merely claims costs no memory."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        parts: list[bytearray] = []
        got = 0
        while got < nr_bytes:
            buf = bytearray(min(nr_bytes - got, _RECV_CHUNK))
            view = memoryview(buf)
            filled = 0
            while filled < len(buf):
                n = sock.recv_into(view[filled:], len(buf) - filled)
                if not n:
                    break
                filled += n
            del view
            got += filled
            parts.append(buf if filled == len(buf) else buf[:filled])
            if filled < len(buf):  # peer closed
                break
        if len(parts) == 1:
            return parts[0]
        return bytearray().join(parts)


# --------------------------------------------------------------------------------------------------------
# Event-driven reactors. pynetdicom 3.0's acceptor runs two polling loops per association: the DUL thread
# sleeps 1 ms whenever it has nothing to do and the association thread sleeps 1 ms every turn, so each
# C-STORE waits a few ms for wake-ups (the largest cost after fsync in the ingest profile, see
# bench/ingest.py). These subclasses keep pynetdicom's state machine and checks and replace only the sleeps:
# the DUL waits in select() on the socket plus a wake-up pipe written by send_pdu(); the association thread
# blocks on the DIMSE message queue. Idle associations also wake ~50 times a second instead of ~1000.
# They mirror pynetdicom 3.0.x's loops, so other versions fall back to the stock classes.
# pyproject.toml pins the pynetdicom they mirror; tests/unit/test_pynetdicom_contract.py names what an upgrade
# changed, tests/integration/scp/test_scp_public_fallback.py serves through the stock classes.

_FAST_REACTOR = pynetdicom.__version__.startswith("3.0.")
_IDLE_WAIT = 0.02  # seconds: upper bound on timer / kill-flag latency while idle


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _FastDUL(DULServiceProvider):
    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._close_pipe = weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._invalid_pdus = 0
        self._connected = False  # the state machine left Sta1: a transport connection exists
        self._got_request = False  # an A-ASSOCIATE-RQ PDU arrived

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # pipe full (a wake-up is pending anyway) or closed
            pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def _read_pdu_data(self) -> None:
        """pynetdicom 3.0's PDU read with the length checked before anything is allocated or read.

        A PDU longer than :func:`pdu_length_limit` allows is answered with an A-ABORT (service provider,
        invalid PDU parameter value) and the connection is closed.
        """
        wrapper = self.socket
        assert wrapper is not None
        try:
            header = wrapper.recv(6)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")  # transport closed
            return
        if len(header) < 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if not 0x01 <= pdu_type <= 0x07:
            self._invalid_pdu(f"unknown PDU type 0x{pdu_type:02X}")
            return
        limit = pdu_length_limit(pdu_type, int(self.assoc.acceptor.maximum_length or 0))
        if length > limit:
            self._refuse_oversized(pdu_type, length, limit)
            return
        try:
            body = wrapper.recv(length)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return
        if len(body) != length:
            LOG.warning("peer %s closed the connection %d bytes into a %d-byte PDU",
                        self.assoc.requestor.address, len(body), length)
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception as exc:
            self._invalid_pdu(f"undecodable PDU type 0x{pdu_type:02X}: {exc}")
            return
        self._got_request |= pdu_type == 0x01
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _invalid_pdu(self, why: str) -> None:
        """Evt19: the state machine answers with an A-ABORT. pynetdicom answers each further 6 bytes of noise
        with another A-ABORT and error line until the peer hangs up; after the first, hang up ourselves."""
        self._invalid_pdus += 1
        self.event_queue.put("Evt19")
        if self._invalid_pdus == 1:
            LOG.warning("peer %s sent an invalid PDU (%s); aborting", self.assoc.requestor.address, why)
        elif self.socket is not None and self.socket.socket is not None:
            LOG.warning("peer %s sends data that is not DICOM; closing the connection",
                        self.assoc.requestor.address)
            self.socket.close()

    def _refuse_oversized(self, pdu_type: int, length: int, limit: int) -> None:
        """A-ABORT (service provider, invalid PDU parameter value), then close: the rest of the claimed PDU
        is never read."""
        LOG.warning("peer %s (%s) announced a %d-byte PDU of type 0x%02X, limit %d; aborting",
                    self.assoc.requestor.address, str(self.assoc.requestor.ae_title or "?").strip(), length,
                    pdu_type, limit)
        if self.socket is not None and self.socket.socket is not None:
            self._send_abort(0x06)  # closing puts Evt17 (transport closed) on the event queue
        else:
            self.event_queue.put("Evt17")

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _wait_for_work(self) -> None:
        wrapper = self.socket
        sock = wrapper.socket if wrapper is not None else None
        if sock is None:
            time.sleep(self._run_loop_delay)
            return
        if not self.to_provider_queue.empty() or not self.event_queue.empty():
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        try:
            ready, _, _ = select.select([sock.fileno(), self._wake_r], [], [], _IDLE_WAIT)
        except (OSError, ValueError):  # closed under us: the transport check reports it
            return
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def run_reactor(self) -> None:
        """pynetdicom 3.0's DUL loop; ``time.sleep(_run_loop_delay)`` became :meth:`_wait_for_work`."""
        self._idle_timer.start()
        sleep = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True
                if sleep:
                    self._wait_for_work()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    self._fail(exc)
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue
                try:
                    self.state_machine.do_action(event)
                except Exception as exc:  # e.g. a PDU that decodes but breaks the rules (an even context ID)
                    self._fail(exc)
                    return
                sleep = False
                if self._connection_ended_before_request():
                    return
        finally:
            self._close_pipe()

    def _fail(self, exc: Exception) -> None:
        """Anything the state machine cannot handle ends the association: A-ABORT, close, end it."""
        LOG.warning("aborting the association with %s: %s: %s", self.assoc.requestor.address,
                    type(exc).__name__, exc)
        self._send_abort(0x00)
        self._end()

    def _end(self) -> None:
        """Mark the association aborted, wake its thread (waiting for a request or serving DIMSE) with an
        A-P-ABORT, and stop this reactor."""
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.to_user_queue.put(A_P_ABORT())
        self._kill_thread = True

    def _send_abort(self, reason: int) -> None:
        """A-ABORT (source: service provider) straight to the socket, then close it."""
        wrapper = self.socket
        if wrapper is None or wrapper.socket is None:
            return
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = reason
        try:
            wrapper.socket.sendall(abort.encode())
        except OSError:
            pass
        wrapper.close()

    def _connection_ended_before_request(self) -> bool:
        """Release the association thread when the connection ends before any A-ASSOCIATE-RQ.

        The acceptor's association thread waits up to the ACSE timeout for the request primitive; a peer
        that connects and hangs up (or is aborted for a bad first PDU) would otherwise hold a slot of
        ``max_associations`` for that long. An A-P-ABORT on its queue wakes it; it then closes without
        negotiating, and this reactor stops.
        """
        if self.state_machine.current_state != "Sta1":
            self._connected = True
            return False
        if not self._connected or self._got_request or self.assoc.is_established:
            return False
        self._end()
        return True


_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def _pdu_logging_wanted() -> bool:
    """pynetdicom's per-PDU/DIMSE log handlers format every message; keep them only when debugging."""
    return logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)


class _FastAssociation(Association):
    def __init__(self, ae: AE, mode: str) -> None:
        super().__init__(ae, mode)
        if not _pdu_logging_wanted():
            for event, handler in _STANDARD_LOG_HANDLERS:
                self.unbind(event, handler)
        self.dul = _FastDUL(self)
        # the timeout setters push values into the DUL's timers: apply them to the new one
        self.acse_timeout = self.ae.acse_timeout
        self.connection_timeout = self.ae.connection_timeout
        self.dimse_timeout = self.ae.dimse_timeout
        self.network_timeout = self.ae.network_timeout

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's acceptor loop, blocking on the DIMSE queue instead of sleeping 1 ms a turn."""
        self._is_paused = False
        messages = self.dimse.msg_queue
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = messages.get(timeout=0.005)
            except queue.Empty:
                msg = None
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                LOG.warning("network timeout on association with %s; aborting", self.requestor.address)
                self.abort()
                self.kill()
                return


class _RequestHandler(RequestHandler):
    """Sets TCP_NODELAY, installs the policy ACSE and the faster socket wrapper."""

    server: _Server

    def handle(self) -> None:
        try:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - e.g. a socket already closed by the peer
            pass
        if isinstance(self.request, ssl.SSLSocket):
            # Handshake here, in the connection's own thread, so a silent or plain-TCP peer cannot stall
            # the accept loop (the socket carries the network timeout).
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                LOG.warning("TLS handshake with %s failed: %s", self.client_address[0], exc)
                self.server.shutdown_request(self.request)  # pynetdicom leaves it open otherwise
                return
        super().handle()

    def _create_association(self) -> Association:
        if not _FAST_REACTOR:
            assoc = super()._create_association()
            assoc.acse = _PolicyACSE(assoc, self.server.policy, self.server.gate)
            self.server.gate.attach(self.request, assoc)
            return assoc
        # RequestHandler._create_association with our Association, socket and ACSE classes.
        assoc = _FastAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        assoc.set_socket(_FastSocket(assoc, client_socket=self.request))
        assoc.acse = _PolicyACSE(assoc, self.server.policy, self.server.gate)
        self.server.gate.attach(self.request, assoc)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list[tuple[Callable[..., Any], Any]], handlers):
                    assoc.bind(event, handler[0], handler[1])
        return assoc


class _Server(ThreadedAssociationServer):
    daemon_threads = True
    policy: CallerPolicy
    gate: ConnectionGate

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        self.gate.admit(request, str(client_address[0]))  # in the accept thread: may close an idle one
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nobody else will release the slot
            self.gate.handler_done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.gate.handler_done(request)

    def service_actions(self) -> None:
        """Runs in the accept loop every ``poll_interval`` (0.2 s) and after each accept."""
        super().service_actions()
        self.gate.expire()

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOG.exception("unhandled error on connection from %s", client_address)


@dataclass
class _AssocStats:
    stored: int = 0
    refused: int = 0
    nbytes: int = 0
    studies: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    ended: str = ""


class StorageSCP:
    """The listener. ``start()`` binds and serves in background threads; ``stop()`` aborts and closes."""

    def __init__(
        self,
        spool: Spool,
        *,
        ae_title: str = "ITVNODE",
        host: str = "0.0.0.0",
        port: int = 11112,
        allowed_callers: Iterable[str] = (),
        caller_ips: dict[str, list[str]] | None = None,
        require_called_ae: bool = True,
        max_associations: int = 10,
        max_connections_per_ip: int | None = None,
        first_pdu_timeout: float = 5.0,
        maximum_pdu_size: int = 0,
        network_timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
        on_stored: OnStored | None = None,
    ) -> None:
        self.spool = spool
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.on_stored = on_stored
        self.policy = CallerPolicy(
            ae_title=ae_title,
            require_called_ae=require_called_ae,
            allowed_callers=tuple(a.strip() for a in allowed_callers),
            caller_ips={k.strip(): tuple(v) for k, v in (caller_ips or {}).items()},
        )
        self.gate = ConnectionGate(
            max_associations=max_associations,
            max_per_ip=max_connections_per_ip or max_associations,
            first_pdu_timeout=first_pdu_timeout,
        )
        self.ae = AE(ae_title=ae_title)
        # pynetdicom counts every accepted connection, idle ones included: the gate counts instead.
        self.ae.maximum_associations = 1 << 20
        self.ae.maximum_pdu_size = maximum_pdu_size
        self.ae.network_timeout = network_timeout
        # An acceptor waits acse_timeout for the A-ASSOCIATE-RQ (and for the peer to hang up after an RJ or
        # a release). The gate closes (and logs) silent connections at first_pdu_timeout; the thread then
        # goes a moment later instead of 30 s later.
        self.ae.acse_timeout = min(network_timeout, first_pdu_timeout + 1.0)
        self.ae.dimse_timeout = network_timeout
        # The policy ACSE does the called/calling checks (with one log line saying why).
        self.ae.require_called_aet = False
        self.ae.require_calling_aet = []
        self.ae.add_supported_context(Verification)
        for sop_class in CT_STORAGE_CLASSES:
            self.ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stats: dict[int, _AssocStats] = {}
        self._stats_lock = threading.Lock()

    # -- lifecycle

    def start(self) -> int:
        """Bind and serve in a background thread; returns the bound port (useful with ``port=0``)."""
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_finished, ["released"]),
            (evt.EVT_ABORTED, self._on_finished, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        server = self.ae.make_server(
            (self.host, self.port),
            ssl_context=self.ssl_context,
            evt_handlers=handlers,  # type: ignore[arg-type]
            server_class=_Server,
            request_handler=_RequestHandler,
        )
        assert isinstance(server, _Server)
        server.policy = self.policy
        server.gate = self.gate
        if not _pdu_logging_wanted():
            for event, handler in _STANDARD_LOG_HANDLERS:
                server.unbind(event, handler)
        self.ae._servers.append(server)
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"scp-{self.port}", daemon=True)
        self._thread.start()
        LOG.info("storage SCP %s listening on %s:%d%s (max %d associations, %d connections per IP, "
                 "first PDU within %g s)", self.policy.ae_title, self.host, self.port,
                 " with TLS" if self.ssl_context else "", self.gate.max_associations, self.gate.max_per_ip,
                 self.gate.first_pdu_timeout)
        return self.port

    def stop(self) -> None:
        if self._server is None:
            return
        for assoc in self._server.active_associations:
            assoc.abort()
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        LOG.info("storage SCP on port %d stopped", self.port)

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        self._assoc_stats(assoc)
        LOG.info("association accepted: %s from %s", assoc.requestor.ae_title, assoc.requestor.address)

    def _on_finished(self, event: evt.Event, how: str) -> None:
        if how != "closed":
            self.gate.ended(event.assoc)
        with self._stats_lock:
            stats = self._stats.get(id(event.assoc))
            if stats is None or stats.ended:
                return
            stats.ended = how
        secs = max(time.monotonic() - stats.started, 1e-6)
        quiet = how == "released" and not (stats.stored or stats.refused)  # e.g. a monitoring C-ECHO
        LOG.log(logging.DEBUG if quiet else logging.INFO,
                "association %s: %s from %s, %d stored, %d refused, %.1f MB in %.2f s, studies %s",
                how, event.assoc.requestor.ae_title, event.assoc.requestor.address, stats.stored,
                stats.refused, stats.nbytes / 1e6, secs, ",".join(sorted(stats.studies)) or "-")

    def _on_closed(self, event: evt.Event) -> None:
        self._on_finished(event, "closed")
        with self._stats_lock:
            self._stats.pop(id(event.assoc), None)

    def _on_store(self, event: evt.Event) -> int | Dataset:
        req = event.request
        affected = str(getattr(req, "AffectedSOPInstanceUID", "") or "")
        stats = self._assoc_stats(event.assoc)
        try:
            encoded = event.encoded_dataset()
            meta = meta_from_bytes(encoded, negotiated_sop_class=event.context.abstract_syntax,
                                   affected_sop_instance=affected)
            self.spool.store(meta, encoded)
        except Exception as exc:  # never die on input: every failure becomes a status
            status = dimse_status.status_for(exc)
            comment = dimse_status.error_comment(exc)
            stats.refused += 1
            if status == dimse_status.CANNOT_UNDERSTAND:
                LOG.exception("C-STORE %s from %s failed: 0x%04X", affected, event.assoc.requestor.ae_title,
                              status)
            else:
                LOG.warning("C-STORE %s from %s refused: 0x%04X %s", affected,
                            event.assoc.requestor.ae_title, status, comment)
            rsp = Dataset()
            rsp.Status = status
            rsp.ErrorComment = comment
            return rsp
        stats.stored += 1
        stats.nbytes += len(encoded)
        stats.studies.add(meta.study_instance_uid)
        LOG.debug("stored %s study %s series %s", meta.sop_instance_uid, meta.study_instance_uid,
                  meta.series_instance_uid)
        if self.on_stored is not None:
            try:
                self.on_stored(meta)
            except Exception:  # the instance is durable; a listener failing must not fail the C-STORE
                LOG.exception("on_stored callback failed for study %s", meta.study_instance_uid)
        return 0x0000

    def _assoc_stats(self, assoc: Association) -> _AssocStats:
        with self._stats_lock:
            stats = self._stats.get(id(assoc))
            if stats is None:
                stats = self._stats[id(assoc)] = _AssocStats()
            return stats


def ssl_context_from(tls_cert: Path | None, tls_key: Path | None, tls_ca: Path | None,
                     require_client_cert: bool) -> ssl.SSLContext | None:
    """Server TLS context when a certificate and key are configured, else None."""
    if tls_cert is None or tls_key is None:
        return None
    from service.net.tls import server_context

    return server_context(tls_cert, tls_key, tls_ca, require_client_cert=require_client_cert)


def build_scp(settings: Settings, spool: Spool, on_stored: OnStored | None = None) -> StorageSCP:
    """The edge: settings in, plain arguments out."""
    return StorageSCP(
        spool,
        ae_title=settings.ae_title,
        host=settings.host,
        port=settings.port,
        allowed_callers=settings.allowed_callers,
        caller_ips=settings.caller_ips,
        require_called_ae=settings.require_called_ae,
        max_associations=settings.max_associations,
        max_connections_per_ip=settings.max_connections_per_ip,
        first_pdu_timeout=settings.first_pdu_timeout,
        maximum_pdu_size=settings.maximum_pdu_size,
        network_timeout=settings.network_timeout,
        ssl_context=ssl_context_from(settings.tls.cert, settings.tls.key, settings.tls.ca,
                                     settings.tls.require_client_cert),
        on_stored=on_stored,
    )


def serve(settings: Settings, stop_event: threading.Event | None = None,
          on_stored: OnStored | None = None, *, spool: Spool | None = None,
          on_started: Callable[[StorageSCP], None] | None = None) -> None:
    """Run the SCP until ``stop_event`` is set (forever when None).

    ``spool``: share one with the assembler (opened from settings and closed here when None);
    ``on_stored(meta)`` runs after each durable store; ``on_started`` sees the bound SCP.
    """
    stop_event = stop_event or threading.Event()
    own_spool = spool is None
    if spool is None:
        spool = Spool(settings.spool_dir, min_free_bytes=settings.min_free_bytes, fsync=settings.spool_fsync)
        spool.reconcile()
    scp = build_scp(settings, spool, on_stored)
    scp.start()
    try:
        if on_started is not None:
            on_started(scp)
        while not stop_event.wait(1.0):
            pass
    finally:
        scp.stop()
        if own_spool:
            spool.close()

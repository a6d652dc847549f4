"""Overrides of ``pynetdicom.transport``: the sockets, the acceptor's request handler and server.

Acceptor: :class:`FastSocket` (``recv`` into preallocated buffers), :class:`SCPRequestHandler` (TCP_NODELAY,
TLS handshake in the connection's thread, our association/ACSE/socket classes) and :class:`SCPServer` (the
admission gate in the accept loop). Requestor: :class:`NoDelaySocket` (TCP_NODELAY, keeps why a connect
failed).
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable
from copy import deepcopy
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from service.net import _pynetdicom_fast
from service.net._pynetdicom_fast.acse import PolicyACSE
from service.net._pynetdicom_fast.association import FastAssociation
from service.net.admission import ConnectionGate
from service.net.connect_errors import RecordingSocket
from service.net.negotiation import CallerPolicy
from service.store.spool import Incoming

LOG = logging.getLogger(__name__)

_RECV_CHUNK = 4 * 1024 * 1024  # buffers grow by what actually arrives, never by what a peer claims


class FastSocket(AssociationSocket):
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


class SCPRequestHandler(RequestHandler):
    """Sets TCP_NODELAY, installs the policy ACSE and the faster socket wrapper."""

    server: SCPServer

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
        if not _pynetdicom_fast.FAST_REACTOR:
            assoc = super()._create_association()
            assoc.acse = PolicyACSE(assoc, self.server.policy, self.server.gate)
            self.server.gate.attach(self.request, assoc)
            return assoc
        # RequestHandler._create_association with our Association, socket and ACSE classes.
        assoc = FastAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        assoc.set_socket(FastSocket(assoc, client_socket=self.request))
        assoc.acse = PolicyACSE(assoc, self.server.policy, self.server.gate)
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


class SCPServer(ThreadedAssociationServer):
    daemon_threads = True
    policy: CallerPolicy
    gate: ConnectionGate
    #: where C-STORE data sets are streamed as they arrive (``Spool.incoming``; None: assembled in memory)
    incoming: Callable[[bytes], Incoming] | None = None

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


_Sock = socket.socket


class NoDelaySocket(AssociationSocket):
    """An association socket with TCP_NODELAY (Nagle off) that keeps the reason of a failed connect."""

    raw_socket: RecordingSocket | None = None

    # pynetdicom drops ``self.socket`` when a connect fails; keep every socket it held to read the reason.
    @property  # type: ignore[override]
    def socket(self) -> _Sock | None:
        return self.__dict__.get("_socket")

    @socket.setter
    def socket(self, value: _Sock | None) -> None:
        self.__dict__["_socket"] = value
        if value is not None:
            self.__dict__.setdefault("_seen", []).append(value)

    def _create_socket(self, address: AddressInformation) -> _Sock:
        # Same set-up as pynetdicom's AssociationSocket._create_socket, plus TCP_NODELAY.
        family = socket.AF_INET if address.is_ipv4 else socket.AF_INET6
        sock = RecordingSocket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.assoc.network_timeout is not None:
            sock.settimeout(self.assoc.network_timeout)
        sock.bind(address.as_tuple)
        self._is_connected = False
        self.raw_socket = sock
        return sock

    @property
    def connect_error(self) -> str | None:
        for sock in reversed(self.__dict__.get("_seen", [])):
            err = getattr(sock, "connect_error", None)
            if err:
                return str(err)
        return None



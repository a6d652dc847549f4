"""DICOM Storage SCP: the listener for C-ECHO and C-STORE of the CT family into the durable spool.

What each request does is :mod:`service.net.scp_handlers`'. Association policy (called AE title, calling AE
allowlist optionally bound to peer IPs, association limit) is checked during negotiation and refused with the
standard A-ASSOCIATE-RJ reasons (:mod:`service.net.negotiation`); idle connections and the per-IP connection
limit are :mod:`service.net.admission`'s. Accepted sockets get ``TCP_NODELAY`` (Nagle costs ~45 ms per
instance with dcmtk peers, see DESIGN.md). The pynetdicom internals overridden for all this are fenced in
:mod:`service.net._pynetdicom_fast`.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.net._pynetdicom_fast.ae import register_server
from service.net._pynetdicom_fast.handlers import unbind_standard_log_handlers
from service.net._pynetdicom_fast.transport import SCPRequestHandler, SCPServer
from service.net.admission import ConnectionGate
from service.net.negotiation import TRANSFER_SYNTAXES, CallerPolicy
from service.net.scp_handlers import OnStored, SCPHandlers
from service.store.instance_meta import CT_STORAGE_CLASSES
from service.store.spool import Spool

if TYPE_CHECKING:
    from service.settings import Settings

LOG = logging.getLogger(__name__)


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
        self.handlers = SCPHandlers(spool, self.gate, on_stored)
        self._server: SCPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> int:
        """Bind and serve in a background thread; returns the bound port (useful with ``port=0``)."""
        server = self.ae.make_server(
            (self.host, self.port),
            ssl_context=self.ssl_context,
            evt_handlers=self.handlers.evt_handlers(),  # type: ignore[arg-type]
            server_class=SCPServer,
            request_handler=SCPRequestHandler,
        )
        assert isinstance(server, SCPServer)
        server.policy = self.policy
        server.gate = self.gate
        server.incoming = self.spool.incoming
        unbind_standard_log_handlers(server)
        register_server(self.ae, server)
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
        spool = Spool(settings.spool_dir, min_free_bytes=settings.min_free_bytes, fsync=settings.spool_fsync,
                      journal=settings.spool_journal, journal_checkpoint_s=settings.spool_journal_checkpoint)
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

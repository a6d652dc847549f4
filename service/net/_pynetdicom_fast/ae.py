"""Overrides of ``pynetdicom.ae.ApplicationEntity``: the requestor's socket factory, the server registry."""

from __future__ import annotations

import ssl

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AddressInformation, AssociationSocket, ThreadedAssociationServer

from service.net._pynetdicom_fast.transport import NoDelaySocket


class NoDelayAE(AE):
    """pynetdicom AE whose requestor sockets have TCP_NODELAY set (Nagle off)."""

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: tuple[ssl.SSLContext, str] | None
    ) -> AssociationSocket:
        sock = NoDelaySocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def register_server(ae: AE, server: ThreadedAssociationServer) -> None:
    """Add a server made with ``AE.make_server`` to the AE's own list, as ``AE.start_server`` does, so that
    ``AE.shutdown()`` stops it too."""
    ae._servers.append(server)

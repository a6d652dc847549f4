"""Why the SCU's TCP connect or TLS handshake failed, in words for the outbox (pynetdicom only logs it)."""

from __future__ import annotations

import socket
import ssl
from typing import Any


def describe_oserror(exc: OSError, timeout: float | None) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"connection timed out after {timeout} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"host name not resolved ({exc.strerror})"
    return exc.strerror or str(exc)


class RecordingSocket(socket.socket):
    """A TCP socket that remembers why ``connect`` failed."""

    connect_error: str | None = None

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            self.connect_error = describe_oserror(exc, self.gettimeout())
            raise


class RecordingSSLSocket(ssl.SSLSocket):
    """TLS counterpart of :class:`RecordingSocket` (the handshake runs inside ``connect``)."""

    connect_error: str | None = None

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except ssl.SSLError as exc:
            self.connect_error = f"TLS handshake failed: {exc.reason or exc}"
            raise
        except OSError as exc:
            self.connect_error = describe_oserror(exc, self.gettimeout())
            raise

"""TLS contexts for DICOM associations (DICOM PS3.15 Annex B, TLS 1.2 or newer)."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert: Path, key: Path, ca: Path | None = None, *,
                   require_client_cert: bool = True) -> ssl.SSLContext:
    """Context for the SCP. With ``ca`` set and ``require_client_cert``, peers must present a certificate
    signed by that CA (mutual TLS); with ``ca`` set alone, a client certificate is verified when offered."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(ca: Path | None = None, cert: Path | None = None, key: Path | None = None, *,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """Context for an SCU: verifies the peer against ``ca`` (system store when None), optional client cert."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if cert is not None:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key) if key else None)
    return ctx

"""Every override of pynetdicom internals in this node, fenced in one package; one file per pynetdicom module.

service/net/scp.py and service/net/scu.py use pynetdicom's public API plus this package. What is here:

- acceptor (the SCP): :mod:`.transport` (``recv`` into preallocated buffers, request handler and server with
  TCP_NODELAY, the TLS handshake per thread and the admission gate), :mod:`.acse` (the caller policy before
  negotiation), :mod:`.dul` and :mod:`.association` (event-driven reactors, PDU length checked before it is
  read), :mod:`.handlers` (pynetdicom's per-PDU log handlers unbound unless debugging), :mod:`.ae`;
- requestor (the SCU): :mod:`.transport` (TCP_NODELAY socket that keeps why a connect failed), :mod:`.ae`,
  :mod:`.dimse` (the reactor guard for C-STORE responses), :mod:`.config` (files sent as stored).

The reactors mirror pynetdicom 3.0.x's loops: :data:`FAST_REACTOR` is off for any other version and the SCP
then serves through the stock classes (plus the policy ACSE). pyproject.toml pins the pynetdicom they mirror;
tests/unit/test_pynetdicom_contract.py names what an upgrade changed, and
tests/integration/scp/test_scp_public_fallback.py serves with :data:`FAST_REACTOR` off.
"""

from __future__ import annotations

import pynetdicom

#: The overrides of pynetdicom's reactors, sockets and request handler are used (pynetdicom 3.0.x only).
FAST_REACTOR = pynetdicom.__version__.startswith("3.0.")

"""What an association with the SCP may negotiate: who may call, and which transfer syntaxes, in whose order.

:class:`CallerPolicy` is checked before pynetdicom's own negotiation, by
:class:`service.net._pynetdicom_fast.acse.PolicyACSE`, which then applies :func:`prefer_requestor_order`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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

from service.store.instance_meta import CT_STORAGE_CLASSES

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


def prefer_requestor_order(contexts: list[Any]) -> None:
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

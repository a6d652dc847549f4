"""How long a PDU the SCP accepts, decided from its 6-byte header before its body is read or allocated.

:class:`service.net._pynetdicom_fast.dul.FastDUL` applies it; a PDU over the limit is answered with an
A-ABORT (service provider, invalid PDU parameter value) and the connection is closed.
"""

from __future__ import annotations

#: Largest PDU accepted when ``maximum_pdu_size`` is 0 ("unlimited"): a sane bound all the same.
UNLIMITED_PDU_BOUND = 64 * 1024 * 1024
#: A-ASSOCIATE-RQ/AC carry presentation contexts and user items: 128 contexts with many transfer syntaxes
#: stay well below this.
ASSOCIATION_PDU_BOUND = 1024 * 1024
_SMALL_PDU_BOUND = 64  # A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT have a 4-byte variable field


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

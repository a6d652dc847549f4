"""pynetdicom's standard per-PDU/DIMSE log handlers (``pynetdicom._handlers``), unbound unless debugging.

They format every message; with them bound, logging is a visible share of the ingest profile.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)

_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def pdu_logging_wanted() -> bool:
    """Keep pynetdicom's log handlers only when its logger is at DEBUG."""
    return logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)


def unbind_standard_log_handlers(target: Any) -> None:
    """Unbind the standard log handlers from an association or an association server, unless debugging."""
    if pdu_logging_wanted():
        return
    for event, handler in _STANDARD_LOG_HANDLERS:
        target.unbind(event, handler)

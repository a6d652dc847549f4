"""The requestor's guard around ``DIMSEServiceProvider.get_msg`` (pynetdicom 3.0's reactor race)."""

from __future__ import annotations

import threading
from typing import Any

from pynetdicom.association import Association


def guard_reactor(assoc: Association) -> None:
    """Keep the association's reactor thread from taking our C-STORE responses off the DIMSE queue.

    pynetdicom 3.0 pauses its reactor around ``send_c_store`` with a flag the reactor clears only *after*
    its checkpoint returns; on a loaded machine ``send_c_store`` can see the stale "paused" flag, the reactor
    then takes the C-STORE-RSP, drops it as "unexpected", and the store waits out the whole DIMSE timeout
    (seen here about once in 100 associations with a few concurrent senders). As a pure SCU we expect no
    requests from the peer, so the reactor's non-blocking reads get nothing; ``send_c_store``'s blocking
    read is untouched.
    """
    dimse = assoc.dimse
    original = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if not block and threading.current_thread() is assoc:
            return None, None
        return original(block)

    dimse.get_msg = get_msg  # type: ignore[method-assign]

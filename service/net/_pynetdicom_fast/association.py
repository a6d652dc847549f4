"""Override of ``pynetdicom.association.Association`` for the acceptor: :class:`FastDUL` and
:class:`FastDIMSE`, and an association loop that blocks on the DIMSE message queue (woken by the DUL)
instead of sleeping 1 ms a turn (see :mod:`.dul`)."""

from __future__ import annotations

import logging
import queue
from typing import cast

from pynetdicom import AE, evt
from pynetdicom.association import Association

from service.net._pynetdicom_fast.dimse import FastDIMSE
from service.net._pynetdicom_fast.dul import FastDUL
from service.net._pynetdicom_fast.handlers import unbind_standard_log_handlers

LOG = logging.getLogger(__name__)

_IDLE_WAIT = 0.05  # seconds (pynetdicom polls every 1 ms; with the wake-ups 200 polls a second were waste)


class FastAssociation(Association):
    def __init__(self, ae: AE, mode: str) -> None:
        super().__init__(ae, mode)
        unbind_standard_log_handlers(self)
        self.dul = FastDUL(self)
        self.dimse = FastDIMSE(self)
        # the timeout setters push values into the DUL's timers: apply them to the new one
        self.acse_timeout = self.ae.acse_timeout
        self.connection_timeout = self.ae.connection_timeout
        self.dimse_timeout = self.ae.dimse_timeout
        self.network_timeout = self.ae.network_timeout

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's acceptor loop, blocking on the DIMSE queue instead of sleeping 1 ms a turn."""
        self._is_paused = False
        messages = self.dimse.msg_queue
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                # FastDUL wakes this (an empty message) for every primitive it queues for us and when it
                # ends; the timeout only bounds how late the idle timer and a kill are noticed
                context_id, msg = messages.get(timeout=_IDLE_WAIT)
            except queue.Empty:
                msg = None
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                LOG.warning("network timeout on association with %s; aborting", self.requestor.address)
                self.abort()
                self.kill()
                return



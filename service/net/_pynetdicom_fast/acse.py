"""Override of ``pynetdicom.acse.ACSE._negotiate_as_acceptor``: the caller policy and the admission gate
come first."""

from __future__ import annotations

from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association

from service.net.admission import ConnectionGate
from service.net.negotiation import CallerPolicy, prefer_requestor_order


class PolicyACSE(ACSE):
    """ACSE that applies :class:`CallerPolicy`, then takes a slot from the :class:`ConnectionGate`, before
    pynetdicom's own negotiation (whose association count is switched off: it counted idle connections)."""

    def __init__(self, assoc: Association, policy: CallerPolicy, gate: ConnectionGate) -> None:
        super().__init__(assoc)
        self._policy = policy
        self._gate = gate

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        calling = str(getattr(rq, "calling_ae_title", "") or "").strip()
        called = str(getattr(rq, "called_ae_title", "") or "")
        peer_ip = str(self.requestor.address)
        refused = self._policy.rejection(calling, called, peer_ip)
        if refused is not None:
            (result, source, reason), why = refused
            self._gate.log.warning(("policy", peer_ip, calling), "association from %s rejected: %s",
                                   peer_ip, why)
        else:
            wrapper = self.assoc.dul.socket
            sock = wrapper.socket if wrapper is not None else None
            if self._gate.request(sock, peer_ip, calling) is None:  # logs its own refusal line
                prefer_requestor_order(getattr(rq, "presentation_context_definition_list", None) or [])
                super()._negotiate_as_acceptor()
                return
            # transient, service provider (presentation), local limit exceeded
            result, source, reason = 0x02, 0x03, 0x02
        self.requestor.ae_title = calling
        self.send_reject(result, source, reason)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()

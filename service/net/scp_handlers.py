"""The Storage SCP's event handlers: C-STORE into the durable spool, C-ECHO, one summary line per association.

Each C-STORE is written as received (no transcoding, no pixel decoding: streamed to a spool temp file as it
arrived, see :class:`service.net._pynetdicom_fast.dimse.FastDIMSE`, or ``event.encoded_dataset()``), made
durable and indexed by :class:`service.store.spool.Spool` before the success status goes back. Every failure
maps to a DIMSE status through :mod:`service.net.dimse_status`; the server keeps serving whatever a peer
sends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pynetdicom import evt
from pynetdicom.association import Association

from service.net import dimse_status
from service.net._pynetdicom_fast.dimse import StreamedDataSet
from service.net.admission import ConnectionGate
from service.store.header_scan import meta_from_bytes, meta_from_prefix
from service.store.instance_meta import InstanceMeta
from service.store.spool import Incoming, Spool

LOG = logging.getLogger(__name__)

OnStored = Callable[[InstanceMeta], None]


@dataclass
class _AssocStats:
    stored: int = 0
    refused: int = 0
    nbytes: int = 0
    studies: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    ended: str = ""


class SCPHandlers:
    """Handlers bound to the SCP's association server; ``on_stored(meta)`` runs after each durable store and
    the ``gate`` learns when an association ends."""

    def __init__(self, spool: Spool, gate: ConnectionGate, on_stored: OnStored | None) -> None:
        self.spool = spool
        self.gate = gate
        self.on_stored = on_stored
        self._stats: dict[int, _AssocStats] = {}
        self._stats_lock = threading.Lock()

    def evt_handlers(self) -> list[tuple[Any, ...]]:
        """``evt_handlers`` for ``AE.make_server``."""
        return [
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_RELEASED, self.on_finished, ["released"]),
            (evt.EVT_ABORTED, self.on_finished, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self.on_closed),
        ]

    def on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        self._assoc_stats(assoc)
        LOG.info("association accepted: %s from %s", assoc.requestor.ae_title, assoc.requestor.address)

    def on_finished(self, event: evt.Event, how: str) -> None:
        if how != "closed":
            self.gate.ended(event.assoc)
        with self._stats_lock:
            stats = self._stats.get(id(event.assoc))
            if stats is None or stats.ended:
                return
            stats.ended = how
        secs = max(time.monotonic() - stats.started, 1e-6)
        quiet = how == "released" and not (stats.stored or stats.refused)  # e.g. a monitoring C-ECHO
        LOG.log(logging.DEBUG if quiet else logging.INFO,
                "association %s: %s from %s, %d stored, %d refused, %.1f MB in %.2f s, studies %s",
                how, event.assoc.requestor.ae_title, event.assoc.requestor.address, stats.stored,
                stats.refused, stats.nbytes / 1e6, secs, ",".join(sorted(stats.studies)) or "-")

    def on_closed(self, event: evt.Event) -> None:
        self.on_finished(event, "closed")
        with self._stats_lock:
            self._stats.pop(id(event.assoc), None)

    def on_store(self, event: evt.Event) -> int | Dataset:
        req = event.request
        affected = str(getattr(req, "AffectedSOPInstanceUID", "") or "")
        stats = self._assoc_stats(event.assoc)
        data_set = getattr(req, "DataSet", None)
        encoded: bytes | Incoming
        try:
            checks = {"negotiated_sop_class": event.context.abstract_syntax,
                      "affected_sop_instance": affected}
            if isinstance(data_set, StreamedDataSet):  # already in a spool temp file
                encoded = incoming = data_set.incoming
                try:
                    incoming.check()
                    meta = meta_from_prefix(bytes(incoming.prefix), incoming.size, incoming.read_all,
                                            **checks)
                except BaseException:
                    incoming.close()
                    raise
                nbytes = incoming.size
            else:
                encoded = event.encoded_dataset()
                meta = meta_from_bytes(encoded, **checks)
                nbytes = len(encoded)
            self.spool.store(meta, encoded)
        except Exception as exc:  # never die on input: every failure becomes a status
            status = dimse_status.status_for(exc)
            comment = dimse_status.error_comment(exc)
            stats.refused += 1
            if status == dimse_status.CANNOT_UNDERSTAND:
                LOG.exception("C-STORE %s from %s failed: 0x%04X", affected, event.assoc.requestor.ae_title,
                              status)
            else:
                LOG.warning("C-STORE %s from %s refused: 0x%04X %s", affected,
                            event.assoc.requestor.ae_title, status, comment)
            rsp = Dataset()
            rsp.Status = status
            rsp.ErrorComment = comment
            return rsp
        stats.stored += 1
        stats.nbytes += nbytes
        stats.studies.add(meta.study_instance_uid)
        LOG.debug("stored %s study %s series %s", meta.sop_instance_uid, meta.study_instance_uid,
                  meta.series_instance_uid)
        if self.on_stored is not None:
            try:
                self.on_stored(meta)
            except Exception:  # the instance is durable; a listener failing must not fail the C-STORE
                LOG.exception("on_stored callback failed for study %s", meta.study_instance_uid)
        return 0x0000

    def _assoc_stats(self, assoc: Association) -> _AssocStats:
        with self._stats_lock:
            stats = self._stats.get(id(assoc))
            if stats is None:
                stats = self._stats[id(assoc)] = _AssocStats()
            return stats

"""Overrides of ``pynetdicom.dimse``: the acceptor's streaming C-STORE receive (:class:`FastDIMSE`) and the
requestor's guard around ``DIMSEServiceProvider.get_msg`` (pynetdicom 3.0's reactor race)."""

from __future__ import annotations

import logging
import re
import struct
import threading
import time
from io import BytesIO
from typing import Any, cast

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from service.store.spool import Incoming

LOG = logging.getLogger(__name__)

_SPARE_MAX_AGE = 60.0  # seconds an idle association keeps its next temp file


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


class StreamedDataSet(BytesIO):
    """A C-STORE request's *Data Set* that went to a spool temp file as it arrived (:class:`FastDIMSE`).

    ``incoming`` holds it (file meta first); :meth:`getvalue` reads the data set back, so that the stock
    ``Event.encoded_dataset()`` and ``Event.dataset`` still work for any handler.
    """

    def __init__(self, incoming: Incoming, head_len: int) -> None:
        super().__init__()
        self.incoming = incoming
        self.head_len = head_len

    def getvalue(self) -> bytes:  # type: ignore[override]
        return self.incoming.read_all()[self.head_len:]

    def __bool__(self) -> bool:
        return True


class FastDIMSE(DIMSEServiceProvider):
    """The acceptor's DIMSE provider: a C-STORE request's data set fragments go straight to a spool temp file.

    :class:`service.net._pynetdicom_fast.dul.FastDUL` reads P-DATA-TF PDUs itself and hands each PDV here:
    command fragments (and anything not streamed) go through pynetdicom's ``receive_primitive``, unchanged;
    once a C-STORE-RQ's command set is complete, :meth:`stream_for` opens an :class:`Incoming` from the
    server's ``incoming`` factory and its data set fragments are written to it as they arrive, from the
    receive buffer, instead of being assembled in a ``BytesIO`` and copied out again. The completed request,
    its ``DataSet`` a :class:`StreamedDataSet`, is served by pynetdicom's ``_serve_request`` in the DUL
    thread (:meth:`_serve_here`), else queued for the association thread as pynetdicom would.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._stream: Incoming | None = None
        self._spare: Incoming | None = None  # the next data set's temp file, opened while idle
        self._spare_at = 0.0
        self._request: C_STORE | None = None  # the request whose data set is streaming (_lean_store)
        self._streamed = False  # a data set was streamed on this association: more are likely
        self._head_len = 0

    def receive_fragment(self, context_id: int, pdv: bytes) -> None:
        """One PDV (control header byte + fragment) that is not streamed, through the stock decoding."""
        if self._stream is not None:  # a command before the data set ended: pynetdicom's muddle from here on
            self.discard_stream()
        if pdv[0] & 3 == 3 and self.message is None and self._lean_store(context_id, pdv):
            return
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[context_id, pdv]]  # type: ignore[list-item]
        self.receive_primitive(primitive)
        if pdv[0] & 3 == 3:  # last command fragment
            self._open_stream()

    def stream_for(self, context_id: int, control: int) -> Incoming | None:
        """Where a data set fragment with this context and control header goes (None: not streamed)."""
        return None if control & 1 else self._stream

    def stream_done(self) -> None:
        """The last data set fragment was written: serve the request (see :meth:`_serve_here`)."""
        stream, self._stream = self._stream, None
        assert stream is not None
        if self._request is not None:  # decoded by _lean_store
            primitive, self._request = self._request, None
            primitive.DataSet = StreamedDataSet(stream, self._head_len)
            context_id = cast(int, primitive._context_id)
        else:
            msg = self.message
            assert msg is not None
            msg.data_set = StreamedDataSet(stream, self._head_len)
            evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": msg})
            # the tail of the stock receive_primitive, for a C-STORE-RQ
            primitive = cast(C_STORE, msg.message_to_primitive())
            context_id = cast(int, msg.context_id)
            self.message = None
        if self._serve_here(primitive, context_id):
            # pynetdicom's own dispatch, in this (the DUL) thread: no hand-off to the association thread and
            # back for every instance; the response is sent when this returns to the DUL loop
            self.assoc._serve_request(primitive, context_id)
        else:
            self.msg_queue.put((context_id, primitive))

    def _serve_here(self, primitive: C_STORE, context_id: int) -> bool:
        """Whether ``_serve_request`` can run in the DUL thread: a valid request on an accepted context, for
        the Storage Service Class, with no release under way (the branches that abort, which waits for the
        DUL thread, stay in the association thread)."""
        assoc = self.assoc
        uid = primitive.AffectedSOPClassUID
        return (primitive.is_valid_request and context_id in assoc._accepted_cx and not assoc._sent_release
                and uid is not None and uid not in assoc.acceptor.accepted_common_extended
                and uid_to_service_class(uid) is StorageServiceClass)

    def discard_stream(self) -> None:
        """The association ended (mid-transfer or not): drop the temp files."""
        for stream in (self._stream, self._spare):
            if stream is not None:
                stream.close()
        self._stream = self._spare = None
        self._request = None

    def _lean_store(self, context_id: int, pdv: bytes) -> bool:
        """A C-STORE-RQ command in one fragment, in its usual form: build the request primitive from it with
        ``struct`` (pydicom's decoding and ``message_to_primitive`` were ~0.25 ms a request) and open its
        stream. False, with nothing changed, for anything else: pynetdicom decodes it."""
        fields = _store_request_fields(pdv[1:])
        factory = getattr(getattr(self.assoc, "_server", None), "incoming", None)
        if (fields is None or factory is None or context_id not in self.assoc._accepted_cx
                or self.assoc.get_handlers(evt.EVT_DIMSE_RECV)):
            return False
        try:
            req = C_STORE()
            req.MessageID, req.Priority = fields[1], fields[2]
            req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = fields[0], fields[3]
            req._context_id = context_id
        except (ValueError, TypeError):
            return False
        self._request = req
        self._open_stream_for(fields[0], fields[3], context_id, factory)
        if self._stream is None:
            self._request = None
            return False
        return True

    def prepare(self) -> None:
        """Called by the DUL when it is about to wait for the peer: once this association has streamed a
        data set, open the next one's temp file now, off the time between a request and its response."""
        if not self._streamed or self._spare is not None or self._stream is not None:
            return
        factory = getattr(getattr(self.assoc, "_server", None), "incoming", None)
        if factory is None:
            return
        try:
            self._spare, self._spare_at = factory(b""), time.monotonic()
        except OSError as exc:  # the spool is unavailable: the request will meet the same error
            LOG.debug("no spare spool temp file: %s", exc)
            self._streamed = False

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """pynetdicom's ``send_msg``; a successful C-STORE-RSP (one per received instance) has its command set
        encoded here with ``struct``, byte for byte what pydicom would encode, unless someone listens for
        sent DIMSE messages."""
        command = _store_success_command(primitive)
        max_pdu = self.maximum_pdu_size
        if (command is None or (max_pdu and len(command) + 7 > max_pdu)
                or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)

    def _open_stream(self) -> None:
        msg = self.message
        factory = getattr(getattr(self.assoc, "_server", None), "incoming", None)
        if (factory is None or not isinstance(msg, C_STORE_RQ) or msg.context_id is None
                or msg._data_set_file is not None):
            return
        cs = msg.command_set
        self._open_stream_for(cs.AffectedSOPClassUID, cs.AffectedSOPInstanceUID, msg.context_id, factory)

    def _open_stream_for(self, sop_class: Any, sop_instance: Any, context_id: int, factory: Any) -> None:
        try:
            head = file_head(sop_class, sop_instance, self.assoc._accepted_cx[context_id].transfer_syntax[0])
            if self._spare is not None and time.monotonic() - self._spare_at < _SPARE_MAX_AGE:
                self._stream, self._spare = self._spare, None
                self._stream.write(head)
            else:
                if self._spare is not None:  # long idle: a fresh one (a start-up elsewhere may drop old ones)
                    self._spare.close()
                    self._spare = None
                self._stream = factory(head)
            self._streamed = True
        except Exception as exc:  # bad UIDs, no spool: the stock path assembles it and the handler refuses
            LOG.debug("C-STORE data set not streamed: %s: %s", type(exc).__name__, exc)
            return
        self._head_len = len(head)


def _element(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element of group 0000 (even length: UIDs padded with a NUL)."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", 0, tag, len(value)) + value


def _store_success_command(rsp: Any) -> bytes | None:
    """The encoded command set of a C-STORE-RSP with Success status and no optional fields, else None."""
    if type(rsp) is not C_STORE or rsp.MessageIDBeingRespondedTo is None or rsp.Status != 0:
        return None
    if rsp.ErrorComment is not None or rsp.OffendingElement is not None:
        return None
    sop_class, sop_instance = rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID
    if not sop_class or not sop_instance:
        return None
    body = b"".join((
        _element(0x0002, str(sop_class).encode("ascii")),
        _element(0x0100, struct.pack("<H", 0x8001)),  # C-STORE-RSP
        _element(0x0120, struct.pack("<H", int(rsp.MessageIDBeingRespondedTo))),
        _element(0x0800, struct.pack("<H", 0x0101)),  # no data set
        _element(0x0900, struct.pack("<H", 0x0000)),
        _element(0x1000, str(sop_instance).encode("ascii")),
    ))
    return _element(0x0000, struct.pack("<L", len(body))) + body


_UID = re.compile(r"[0-9][0-9.]{0,63}")


def _meta_element(tag: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    """One Explicit VR Little Endian element of group 0002 with a 2-byte length."""
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", 2, tag, vr, len(value)) + value


def file_head(sop_class: Any, sop_instance: Any, transfer_syntax: Any) -> bytes:
    """Preamble, prefix and File Meta Information, as ``Event.encoded_dataset()`` writes them before the data
    set (pynetdicom's ``create_file_meta`` + ``encode_file_meta``): ``struct`` for plain UIDs, pydicom for
    anything else."""
    uids = [str(sop_class or ""), str(sop_instance or ""), str(transfer_syntax or "")]
    if not all(_UID.fullmatch(u) for u in uids):
        meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                                transfer_syntax=transfer_syntax)
        return b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta)))
    body = b"".join((
        struct.pack("<HH2s2sL", 2, 0x0001, b"OB", b"", 2) + b"\x00\x01",
        _meta_element(0x0002, b"UI", uids[0].encode("ascii"), b"\x00"),
        _meta_element(0x0003, b"UI", uids[1].encode("ascii"), b"\x00"),
        _meta_element(0x0010, b"UI", uids[2].encode("ascii"), b"\x00"),
        _meta_element(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode("ascii"), b"\x00"),
        _meta_element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" "),
    ))
    return b"".join((b"\x00" * 128, b"DICM", struct.pack("<HH2sHL", 2, 0x0000, b"UL", 4, len(body)), body))


_COMMAND_ELEMENT = struct.Struct("<HHL")
#: (0000,xxxx) elements of a C-STORE-RQ with a data set, as storage SCUs send it (no C-MOVE originator)
_STORE_RQ_ELEMENTS = (0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000)
_PLAIN_UID = re.compile(rb"[0-9][0-9.]{0,63}\x00?")


def _store_request_fields(command: bytes) -> tuple[str, int, int, str] | None:
    """(Affected SOP Class UID, Message ID, Priority, Affected SOP Instance UID) of an Implicit VR Little
    Endian C-STORE-RQ command set with exactly :data:`_STORE_RQ_ELEMENTS`, in order, a data set following
    and plain UIDs; None for anything else."""
    values: list[bytes] = []
    pos, end = 0, len(command)
    for tag in _STORE_RQ_ELEMENTS:
        if pos + 8 > end:
            return None
        group, element, length = _COMMAND_ELEMENT.unpack_from(command, pos)
        pos += 8
        if group != 0 or element != tag or pos + length > end:
            return None
        values.append(command[pos:pos + length])
        pos += length
    if pos != end or values[0] != struct.pack("<L", end - 12):
        return None
    if any(len(values[i]) != 2 for i in (2, 3, 4, 5)):
        return None
    command_field, message_id, priority, data_set_type = (
        struct.unpack("<H", values[i])[0] for i in (2, 3, 4, 5))
    if command_field != 0x0001 or data_set_type == 0x0101:
        return None
    if not (_PLAIN_UID.fullmatch(values[1]) and _PLAIN_UID.fullmatch(values[6])):
        return None
    return (values[1].rstrip(b"\x00").decode("ascii"), message_id, priority,
            values[6].rstrip(b"\x00").decode("ascii"))

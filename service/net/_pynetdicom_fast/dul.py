"""Override of ``pynetdicom.dul.DULServiceProvider``: an event-driven reactor, PDU length checked first.

pynetdicom 3.0's acceptor runs two polling loops per association: the DUL thread sleeps 1 ms whenever it has
nothing to do and the association thread sleeps 1 ms every turn, so each C-STORE waits a few ms for
wake-ups (the largest cost after fsync in the ingest profile, see bench/ingest.py). :class:`FastDUL` keeps
pynetdicom's state machine and checks and replaces only the sleep: it waits in select() on the socket plus a
wake-up pipe written by ``send_pdu()``; idle associations wake ~50 times a second instead of ~1000. Its
blocking counterpart in the association thread is :class:`service.net._pynetdicom_fast.association.
FastAssociation`. Both mirror pynetdicom 3.0.x's loops (see this package's docstring for the version gate).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import ssl
import struct
import time
import weakref
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_P_ABORT

from service.net._pynetdicom_fast.dimse import FastDIMSE
from service.net.pdu_bounds import pdu_length_limit

LOG = logging.getLogger(__name__)

_IDLE_WAIT = 0.02  # seconds: upper bound on timer / kill-flag latency while idle
_PDV_HEAD = struct.Struct(">LBB")  # PDV item length, presentation context ID, message control header
_STREAM_CHUNK = 256 * 1024  # the one receive buffer per association for streamed data sets


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's ``to_user_queue``: each primitive for the association thread also wakes it."""

    def __init__(self, wake: Any) -> None:
        super().__init__()
        self._wake_user = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake_user()


class FastDUL(DULServiceProvider):
    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.to_user_queue = _WakingQueue(self._wake_association)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._close_pipe = weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._invalid_pdus = 0
        self._connected = False  # the state machine left Sta1: a transport connection exists
        self._got_request = False  # an A-ASSOCIATE-RQ PDU arrived
        self._rbuf: bytearray | None = None  # reused receive buffer of the streamed C-STORE data sets

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # pipe full (a wake-up is pending anyway) or closed
            pass

    def _wake_association(self) -> None:
        """Wake the association thread blocked on the DIMSE queue (:class:`FastAssociation`): a primitive
        for it, or this reactor ending. ``(None, None)`` is what an empty queue reads as anyway."""
        dimse = getattr(self.assoc, "dimse", None)
        if dimse is not None:
            dimse.msg_queue.put((None, None))

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def _read_pdu_data(self) -> None:
        """pynetdicom 3.0's PDU read with the length checked before anything is allocated or read.

        A PDU longer than :func:`pdu_length_limit` allows is answered with an A-ABORT (service provider,
        invalid PDU parameter value) and the connection is closed.
        """
        wrapper = self.socket
        assert wrapper is not None
        try:
            header = wrapper.recv(6)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")  # transport closed
            return
        if len(header) < 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if not 0x01 <= pdu_type <= 0x07:
            self._invalid_pdu(f"unknown PDU type 0x{pdu_type:02X}")
            return
        limit = pdu_length_limit(pdu_type, int(self.assoc.acceptor.maximum_length or 0))
        if length > limit:
            self._refuse_oversized(pdu_type, length, limit)
            return
        if pdu_type == 0x04 and self._fast_pdata():
            try:
                self._read_pdata(wrapper, length)
            except (OSError, TimeoutError):
                self.event_queue.put("Evt17")
            return
        try:
            body = wrapper.recv(length)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return
        if len(body) != length:
            LOG.warning("peer %s closed the connection %d bytes into a %d-byte PDU",
                        self.assoc.requestor.address, len(body), length)
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception as exc:
            self._invalid_pdu(f"undecodable PDU type 0x{pdu_type:02X}: {exc}")
            return
        self._got_request |= pdu_type == 0x01
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _fast_pdata(self) -> bool:
        """P-DATA-TF in Sta6 (where pynetdicom's state machine only passes it to DIMSE: Evt10, DT-2) with
        nobody listening for raw PDUs: read by :meth:`_read_pdata`."""
        assoc = self.assoc
        return (isinstance(assoc.dimse, FastDIMSE) and self.state_machine.current_state == "Sta6"
                and not assoc.get_handlers(evt.EVT_DATA_RECV) and not assoc.get_handlers(evt.EVT_PDU_RECV))

    def _read_pdata(self, wrapper: Any, length: int) -> None:
        """Read a P-DATA-TF body PDV by PDV (PS3.8 9.3.5) and hand each to :class:`FastDIMSE`: a C-STORE data
        set fragment goes in bounded chunks from the socket to its spool temp file, the rest through
        pynetdicom's decoding. What pynetdicom's PDU decoding would refuse ends the association the same way.
        """
        dimse = cast(FastDIMSE, self.assoc.dimse)
        left = length
        while left:
            if left < _PDV_HEAD.size:
                self._invalid_pdu("P-DATA-TF item header truncated")
                return
            head = wrapper.recv(_PDV_HEAD.size)
            if len(head) < _PDV_HEAD.size:
                self._closed_mid_pdu(length)
                return
            item_length, context_id, control = _PDV_HEAD.unpack(head)
            if item_length < 2 or item_length + 4 > left:
                self._invalid_pdu(f"P-DATA-TF item of {item_length} bytes in {left}")
                return
            left -= 4 + item_length
            n = item_length - 2
            stream = dimse.stream_for(context_id, control)
            if stream is None:
                data = wrapper.recv(n) if n else b""
                if len(data) < n:
                    self._closed_mid_pdu(length)
                    return
                dimse.receive_fragment(context_id, bytes((control,)) + bytes(data))
                continue
            if not self._recv_into_stream(wrapper, stream, n):
                self._closed_mid_pdu(length)
                return
            if control & 2:
                dimse.stream_done()

    def _recv_into_stream(self, wrapper: Any, stream: Any, n: int) -> bool:
        """Copy ``n`` bytes from the socket to ``stream`` through one reused buffer; False if the peer
        closed first."""
        if self._rbuf is None:
            self._rbuf = bytearray(_STREAM_CHUNK)
        buf = memoryview(self._rbuf)
        sock = wrapper.socket
        while n:
            want = min(n, _STREAM_CHUNK)
            filled = 0
            while filled < want:
                got = sock.recv_into(buf[filled:want], want - filled)
                if not got:
                    return False
                filled += got
            stream.write(buf[:want])
            n -= want
        return True

    def _closed_mid_pdu(self, length: int) -> None:
        LOG.warning("peer %s closed the connection inside a %d-byte PDU", self.assoc.requestor.address,
                    length)
        self.event_queue.put("Evt17")

    def _invalid_pdu(self, why: str) -> None:
        """Evt19: the state machine answers with an A-ABORT. pynetdicom answers each further 6 bytes of noise
        with another A-ABORT and error line until the peer hangs up; after the first, hang up ourselves."""
        self._invalid_pdus += 1
        self.event_queue.put("Evt19")
        if self._invalid_pdus == 1:
            LOG.warning("peer %s sent an invalid PDU (%s); aborting", self.assoc.requestor.address, why)
        elif self.socket is not None and self.socket.socket is not None:
            LOG.warning("peer %s sends data that is not DICOM; closing the connection",
                        self.assoc.requestor.address)
            self.socket.close()

    def _refuse_oversized(self, pdu_type: int, length: int, limit: int) -> None:
        """A-ABORT (service provider, invalid PDU parameter value), then close: the rest of the claimed PDU
        is never read."""
        LOG.warning("peer %s (%s) announced a %d-byte PDU of type 0x%02X, limit %d; aborting",
                    self.assoc.requestor.address, str(self.assoc.requestor.ae_title or "?").strip(), length,
                    pdu_type, limit)
        if self.socket is not None and self.socket.socket is not None:
            self._send_abort(0x06)  # closing puts Evt17 (transport closed) on the event queue
        else:
            self.event_queue.put("Evt17")

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _wait_for_work(self) -> None:
        wrapper = self.socket
        sock = wrapper.socket if wrapper is not None else None
        if sock is None:
            time.sleep(self._run_loop_delay)
            return
        if not self.to_provider_queue.empty() or not self.event_queue.empty():
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        if isinstance(self.assoc.dimse, FastDIMSE):
            self.assoc.dimse.prepare()  # idle: the peer is preparing its next request
        try:
            ready, _, _ = select.select([sock.fileno(), self._wake_r], [], [], _IDLE_WAIT)
        except (OSError, ValueError):  # closed under us: the transport check reports it
            return
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def run_reactor(self) -> None:
        """pynetdicom 3.0's DUL loop; ``time.sleep(_run_loop_delay)`` became :meth:`_wait_for_work`."""
        self._idle_timer.start()
        sleep = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True
                if sleep:
                    self._wait_for_work()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    self._fail(exc)
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue
                try:
                    self.state_machine.do_action(event)
                except Exception as exc:  # e.g. a PDU that decodes but breaks the rules (an even context ID)
                    self._fail(exc)
                    return
                sleep = False
                if self._connection_ended_before_request():
                    return
        finally:
            if isinstance(self.assoc.dimse, FastDIMSE):
                self.assoc.dimse.discard_stream()
            self._close_pipe()
            self._wake_association()

    def _fail(self, exc: Exception) -> None:
        """Anything the state machine cannot handle ends the association: A-ABORT, close, end it."""
        LOG.warning("aborting the association with %s: %s: %s", self.assoc.requestor.address,
                    type(exc).__name__, exc)
        self._send_abort(0x00)
        self._end()

    def _end(self) -> None:
        """Mark the association aborted, wake its thread (waiting for a request or serving DIMSE) with an
        A-P-ABORT, and stop this reactor."""
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.to_user_queue.put(A_P_ABORT())
        self._kill_thread = True

    def _send_abort(self, reason: int) -> None:
        """A-ABORT (source: service provider) straight to the socket, then close it."""
        wrapper = self.socket
        if wrapper is None or wrapper.socket is None:
            return
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = reason
        try:
            wrapper.socket.sendall(abort.encode())
        except OSError:
            pass
        wrapper.close()

    def _connection_ended_before_request(self) -> bool:
        """Release the association thread when the connection ends before any A-ASSOCIATE-RQ.

        The acceptor's association thread waits up to the ACSE timeout for the request primitive; a peer
        that connects and hangs up (or is aborted for a bad first PDU) would otherwise hold a slot of
        ``max_associations`` for that long. An A-P-ABORT on its queue wakes it; it then closes without
        negotiating, and this reactor stops.
        """
        if self.state_machine.current_state != "Sta1":
            self._connected = True
            return False
        if not self._connected or self._got_request or self.assoc.is_established:
            return False
        self._end()
        return True


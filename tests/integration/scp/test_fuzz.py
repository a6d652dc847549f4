"""Fuzzing the Storage SCP over real sockets: >= 10,000 mutated PDUs and data sets, seeded and bounded.

``itvnode serve`` runs as a subprocess. A small raw DICOM upper-layer client (no pynetdicom on our side, so
nothing "fixes" a malformed byte string before it leaves) sends:

- mutated A-ASSOCIATE-RQ PDUs, each on a fresh connection, followed by an A-RELEASE-RQ and a half-close:
  the node must answer (AC, RJ, release or A-ABORT) and close within a few seconds;
- mutated P-DATA-TF PDUs inside an accepted association, followed by an A-RELEASE-RQ and a half-close: the
  node must answer and end the connection within a few seconds;
- mutated CT data sets in well-framed C-STORE requests, many per association: each must get a C-STORE
  response whose status is success or one of the documented refusals (docs/conformance.md).

Afterwards the node still answers dcmtk's echoscu and its RSS grew by less than 100 MiB. The seed is fixed;
``ITVNODE_FUZZ_SEED`` overrides it to explore further.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable

import psutil
import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from scp_ctdata import classic_slice, new_study
from scp_helpers import CT, VERIFICATION, RunningSCP, echo_ok

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
APP_CONTEXT = "1.2.840.10008.3.1.1.1"
SEED = int(os.environ.get("ITVNODE_FUZZ_SEED", "20261130"))
ASSOC_CASES = 1500
PDATA_CASES = 1000
DATASET_CASES = 7600
PER_ASSOCIATION = 400
ANSWER_S = 5.0
# 0xC000 is "internal error": a defect in the node, never an answer to bad input (docs/conformance.md)
ALLOWED_STATUSES = {0x0000, 0xA700, 0xA900, 0x0122} | set(range(0xC001, 0xD000))


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" * (len(raw) % 2)


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def associate_rq(called: str = "ITVNODE", calling: str = "FUZZ") -> bytes:
    ctx_ct = bytes([1, 0, 0, 0]) + _item(0x30, _uid(CT)) + _item(0x40, _uid(EXPLICIT_LE))
    ctx_echo = bytes([3, 0, 0, 0]) + _item(0x30, _uid(VERIFICATION)) + _item(0x40, _uid(IMPLICIT_LE))
    user = _item(0x51, struct.pack(">L", 65536)) + _item(0x52, _uid("1.2.826.0.1.3680043.10.1"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + b"\0" * 32
            + _item(0x10, _uid(APP_CONTEXT)) + _item(0x20, ctx_ct) + _item(0x20, ctx_echo)
            + _item(0x50, user))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def _implicit(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return fp.getvalue()


def command(fields: dict[str, object]) -> bytes:
    """A DIMSE command set (implicit VR LE) with its group length."""
    ds = Dataset()
    for key, value in fields.items():
        setattr(ds, key, value)
    body = _implicit(ds)
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def pdata(context_id: int, control: int, payload: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(payload) + 2, context_id, control) + payload
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


RELEASE_RQ = struct.pack(">BBLL", 0x05, 0, 4, 0)


def mutate(data: bytes, rng: random.Random, protect: int = 0) -> bytes:
    """One to four of: bit flips, byte overwrites, truncation, insertion, a length field rewritten, a chunk
    duplicated. ``protect`` leading bytes stay intact (framing that must survive to reach the parser)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        lo = protect
        if len(buf) <= lo + 4:
            buf += rng.randbytes(8)
        i = rng.randrange(lo, len(buf))
        if op == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[i] = rng.choice((0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2:
            del buf[rng.randrange(lo, len(buf)):]
        elif op == 3:
            buf[i:i] = rng.randbytes(rng.randint(1, 64))
        elif op == 4 and i + 4 <= len(buf):
            value = rng.choice((0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, len(buf), rng.randrange(1 << 32)))
            buf[i:i + 4] = struct.pack("<L", value)
        else:
            j = rng.randrange(lo, len(buf))
            buf[j:j] = buf[i:i + rng.randint(1, 256)]
    return bytes(buf)


class Peer:
    """One raw TCP connection to the SCP, reading whole PDUs with a deadline."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.context = ""  # what was sent, for the failure message

    def close(self) -> None:
        self.sock.close()

    def half_close(self) -> None:
        """No more bytes from us; the node may already have closed (an abort), which is fine."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def pdu(self) -> tuple[int, bytes] | None:
        """The next PDU (type, body), or None when the node closed the connection."""
        if not self._fill(6):
            return None
        kind, _, length = struct.unpack(">BBL", self.buf[:6])
        assert length < 1 << 20, f"node sent a {length}-byte PDU"
        if not self._fill(6 + length):
            return None
        body, self.buf = self.buf[6:6 + length], self.buf[6 + length:]
        return kind, body

    def until_closed(self) -> list[int]:
        """PDU types received until the node closes; fails if it neither closes nor aborts in time."""
        kinds = []
        deadline = time.monotonic() + ANSWER_S
        while time.monotonic() < deadline:
            try:
                got = self.pdu()
            except TimeoutError:
                raise AssertionError(f"no answer within {ANSWER_S} s (got {kinds}); {self.context}") from None
            if got is None:
                return kinds
            kinds.append(got[0])
            if got[0] in (0x03, 0x06, 0x07):  # RJ, release RP, abort: the node is done with us
                return kinds
        raise AssertionError(f"no answer nor close in {ANSWER_S} s (got {kinds}); {self.context}")

    def store_status(self, message_id: int, sop_uid: str, dataset: bytes) -> int:
        cmd = command({"AffectedSOPClassUID": CT, "CommandField": 0x0001, "MessageID": message_id,
                       "Priority": 0, "CommandDataSetType": 0x0000, "AffectedSOPInstanceUID": sop_uid})
        self.sock.sendall(pdata(1, 0x03, cmd) + pdata(1, 0x02, dataset))
        got = self.pdu()
        assert got is not None, "node closed the association instead of answering a C-STORE"
        kind, body = got
        assert kind == 0x04, f"expected a C-STORE response, got PDU type 0x{kind:02X}"
        status = _command_status(body[6:])  # one PDV: length (4), context id (1), control header (1)
        assert status in ALLOWED_STATUSES, f"undocumented status 0x{status:04X} in {body.hex()}"
        return status


LOCAL_LIMIT = (0x03, b"\x00\x02\x03\x02")  # A-ASSOCIATE-RJ transient, provider, local limit exceeded


def associated(port: int) -> Peer:
    """An accepted association. Like any SCU, retry a transient local-limit refusal: an association torn
    down by the previous case may hold its slot for ~0.1 s while its threads finish (bounded: 5 s)."""
    deadline = time.monotonic() + ANSWER_S
    while True:
        peer = Peer(port)
        peer.sock.sendall(associate_rq())
        got = peer.pdu()
        if got is not None and got[0] == 0x02:
            return peer
        peer.close()
        assert got == LOCAL_LIMIT and time.monotonic() < deadline, f"association refused: {got}"
        time.sleep(0.02)


def _command_status(command_set: bytes) -> int:
    """(0000,0900) Status from an implicit VR little endian command set, walking element by element."""
    i = 0
    while i + 8 <= len(command_set):
        group, elem, length = struct.unpack("<HHL", command_set[i:i + 8])
        if (group, elem) == (0x0000, 0x0900):
            return int(struct.unpack("<H", command_set[i + 8:i + 10])[0])
        i += 8 + length
    raise AssertionError(f"C-STORE response without a Status: {command_set.hex()}")


def _rss(node: RunningSCP) -> int:
    assert node.proc is not None
    return int(psutil.Process(node.proc.pid).memory_info().rss)


@pytest.fixture
def fuzz_node(serve_process: Callable[..., RunningSCP]) -> RunningSCP:
    return serve_process("--no-assembler", ITVNODE_SPOOL_FSYNC="false", ITVNODE_LOG_LEVEL="ERROR")


def test_fuzzed_pdus_and_datasets_are_answered_and_memory_stays_bounded(fuzz_node: RunningSCP) -> None:
    rng = random.Random(SEED)
    node = fuzz_node
    start_rss = _rss(node)
    outcomes: Counter[str] = Counter()

    valid_rq = associate_rq()
    for case in range(ASSOC_CASES):
        peer = Peer(node.port)
        sent_bytes = mutate(valid_rq, rng)
        peer.context = f"association case {case}: {sent_bytes.hex()}"
        try:
            # then half-close: a PDU cut short must be answered at once, not after the network timeout
            peer.sock.sendall(sent_bytes + RELEASE_RQ)
            peer.half_close()
            kinds = peer.until_closed()
            outcomes["assoc:" + (",".join(f"{k:02X}" for k in kinds[:2]) or "closed")] += 1
        except (ConnectionResetError, BrokenPipeError):
            outcomes["assoc:reset"] += 1
        finally:
            peer.close()

    echo = command({"AffectedSOPClassUID": VERIFICATION, "CommandField": 0x0030, "MessageID": 1,
                    "CommandDataSetType": 0x0101})
    for case in range(PDATA_CASES):
        peer = associated(node.port)
        sent_bytes = mutate(pdata(3, 0x03, echo), rng)
        peer.context = f"P-DATA case {case}: {sent_bytes.hex()}"
        try:
            peer.sock.sendall(sent_bytes + RELEASE_RQ)
            peer.half_close()
            kinds = peer.until_closed()
            outcomes["pdata:" + ("ok" if kinds else "closed")] += 1
        except (ConnectionResetError, BrokenPipeError):
            outcomes["pdata:reset"] += 1
        finally:
            peer.close()

    study = new_study([0.0], f"fuzz-{SEED}")
    statuses: Counter[int] = Counter()
    sent = 0
    while sent < DATASET_CASES:
        peer = associated(node.port)
        try:
            for _ in range(min(PER_ASSOCIATION, DATASET_CASES - sent)):
                ds = classic_slice(study, 0.0, sent, size=16)
                encoded = _explicit(ds)
                header_end = encoded.find(b"\xe0\x7f\x10\x00")  # mutate the header, where parsing happens
                mutated = mutate(encoded[:header_end], rng) + encoded[header_end:]
                status = peer.store_status(sent + 1, ds.SOPInstanceUID, mutated)
                assert status in ALLOWED_STATUSES, f"undocumented status 0x{status:04X}"
                statuses[status] += 1
                sent += 1
            peer.sock.sendall(RELEASE_RQ)
            peer.until_closed()
        finally:
            peer.close()
        assert node.proc is not None and node.proc.poll() is None, "the node died"

    total = sum(outcomes.values()) + sum(statuses.values())
    grown = _rss(node) - start_rss
    print(f"\nfuzz seed {SEED}: {total} cases; {dict(outcomes)}; "
          f"C-STORE statuses {{{', '.join(f'0x{k:04X}: {v}' for k, v in sorted(statuses.items()))}}}; "
          f"RSS +{grown / 2**20:.0f} MiB")
    assert total >= 10_000
    assert statuses[0x0000] > 0 and len(statuses) > 1  # the mutator reaches both outcomes
    assert node.proc is not None and node.proc.poll() is None
    assert echo_ok(node.port).returncode == 0
    assert grown < 100 * 2**20, f"SCP grew by {grown / 2**20:.0f} MiB"


def _explicit(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()

"""Idle connections, per-IP and association limits against ``itvnode serve``: dcmtk peers, raw sockets.

The campaign behind issue 9: twelve TCP connections that never send an A-ASSOCIATE-RQ locked every sender
out for 30 s ("Local Limit Exceeded") and nothing was logged.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

from scp_ctdata import new_study, write_study
from scp_helpers import ECHOSCU, STORESCU, RunningSCP


def _idle_sockets(stack: ExitStack, port: int, n: int, partial_header: int = 0) -> list[socket.socket]:
    """``n`` connections that never complete a PDU; ``partial_header`` of them send 3 bytes of a PDU header
    (a thread blocked in recv is the case a timer checked between reads would miss)."""
    socks = []
    for i in range(n):
        s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
        if i < partial_header:
            s.sendall(b"\x01\x00\x00")
        socks.append(s)
    return socks


def _closed_by_peer(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _log_lines(node: RunningSCP, pattern: str) -> list[str]:
    assert node.log is not None
    return [line for line in node.log.read_text().splitlines() if re.search(pattern, line)]


def test_idle_connections_do_not_lock_out_senders(serve_process, tmp_path: Path) -> None:
    """Defaults (10 associations, 10 connections per IP, first PDU within 5 s): twelve idle sockets from the
    sender's own address, then dcmtk echoscu and storescu from that address get in at once."""
    node: RunningSCP = serve_process()
    files = write_study(new_study([0.0], "idle"), tmp_path / "in", n_slices=3)
    with ExitStack() as stack:
        opened = time.monotonic()
        idle = _idle_sockets(stack, node.port, 12, partial_header=3)
        time.sleep(0.3)  # let the accept loop take all twelve
        t0 = time.monotonic()
        echo = subprocess.run([ECHOSCU, "-aet", "ECHOSCU", "-aec", "ITVNODE", "-to", "5", "127.0.0.1",
                               str(node.port)], capture_output=True, text=True, timeout=20)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        store = subprocess.run([STORESCU, "-aet", "PACS", "-aec", "ITVNODE", "-to", "5", "127.0.0.1",
                                str(node.port), *map(str, files)], capture_output=True, text=True, timeout=30)
        assert store.returncode == 0, store.stdout + store.stderr
        assert time.monotonic() - t0 < 3.0, "a legitimate sender waited for idle connections"
        # every idle connection is closed by the node: the ones evicted at once, the rest at first_pdu_timeout
        for s in idle:
            assert _closed_by_peer(s, within=max(0.1, opened + 5.0 + 2.0 - time.monotonic())), \
                "an idle connection outlived first_pdu_timeout"
        assert time.monotonic() - opened < 8.0
    assert len(list(node.spool_dir.glob("*/*/*.dcm"))) == 3
    evicted = _log_lines(node, r"connection from 127\.0\.0\.1 closed before its A-ASSOCIATE-RQ")
    timed_out = _log_lines(node, r"connection from 127\.0\.0\.1 closed: no A-ASSOCIATE-RQ within 5 s")
    # 2 evicted at accept + 1 each for echoscu and storescu; then the 8 left time out: one line per kind and
    # address per 10 s, not one per connection
    assert len(evicted) == 1 and len(timed_out) == 1, (evicted, timed_out)


def _associate_rq(calling: str, called: str = "ITVNODE") -> bytes:
    """A minimal A-ASSOCIATE-RQ: application context and one Verification presentation context."""
    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
            + app + pc + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _rejection(s: socket.socket) -> tuple[int, int, int]:
    s.settimeout(10)
    head = s.recv(10)
    assert head[:1] == b"\x03", f"expected A-ASSOCIATE-RJ, got {head!r}"
    return head[7], head[8], head[9]


def test_limit_rejections_logged_with_calling_ae_and_ip_rate_limited(serve_process) -> None:
    node: RunningSCP = serve_process(ITVNODE_MAX_ASSOCIATIONS="2")
    held = [node.associate("HOLDER") for _ in range(2)]
    assert all(a.is_established for a in held)
    try:
        res = subprocess.run([ECHOSCU, "-aet", "LATECOMER", "-aec", "ITVNODE", "-to", "5", "127.0.0.1",
                              str(node.port)], capture_output=True, text=True, timeout=20)
        assert res.returncode != 0
        assert "Local Limit Exceeded" in res.stdout + res.stderr
        for _ in range(40):  # a flood of requests over the limit
            with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
                s.sendall(_associate_rq("FLOOD"))
                assert _rejection(s) == (0x02, 0x03, 0x02)
    finally:
        for a in held:
            a.release()
    late = _log_lines(node, r"association from 127\.0\.0\.1 \(calling AE 'LATECOMER'\) rejected: local limit "
                            r"exceeded, 2 associations in progress \(max_associations 2\)")
    flood = _log_lines(node, r"calling AE 'FLOOD'\) rejected: local limit exceeded")
    assert len(late) == 1, late
    assert len(flood) == 1, f"40 rejections, {len(flood)} log lines"
    # slots come back after the release
    deadline = time.monotonic() + 10
    while subprocess.run([ECHOSCU, "-aec", "ITVNODE", "-to", "5", "127.0.0.1", str(node.port)],
                         capture_output=True, timeout=20).returncode != 0:
        assert time.monotonic() < deadline, "associations were not given back"
        time.sleep(0.2)


def test_per_ip_limit_counts_associations_from_one_address(serve_process) -> None:
    node: RunningSCP = serve_process(ITVNODE_MAX_CONNECTIONS_PER_IP="2")
    held = [node.associate("PACS") for _ in range(2)]
    assert all(a.is_established for a in held)
    try:
        extra = node.associate("PACS")
        assert extra.is_rejected
        rej = extra.acceptor.primitive
        assert (rej.result, rej.result_source, rej.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        for a in held:
            a.release()
    assert _log_lines(node, r"association from 127\.0\.0\.1 \(calling AE 'PACS'\) rejected: local limit "
                            r"exceeded, 2 associations from this address \(max_connections_per_ip 2\)")

"""A PDU length a peer claims is checked before anything is allocated (hardening issue, item 1).

A 6-byte header claiming ~4 GiB used to make the SCP zero-fill a 4 GiB buffer per connection. Now the
length is bounded per PDU type (association PDUs are small, P-DATA by the maximum we advertise) and an
oversized claim is answered with an A-ABORT before the body is read.
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from scp_ctdata import classic_slice, new_study
from scp_helpers import RunningSCP, echo_ok

from service.net.pdu_bounds import ASSOCIATION_PDU_BOUND, UNLIMITED_PDU_BOUND, pdu_length_limit
from service.net.tls import server_context

HUGE = 0xFFFF_FFF0  # ~4 GiB


def _claim(port: int, pdu_type: int, length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(struct.pack(">BBL", pdu_type, 0, length))
    return sock


def _read_abort(sock: socket.socket) -> bytes:
    """What the SCP answers before closing: an A-ABORT PDU (type 0x07), then EOF."""
    got = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def _rss(node: RunningSCP) -> int:
    assert node.proc is not None
    return int(psutil.Process(node.proc.pid).memory_info().rss)


def test_limits_per_pdu_type() -> None:
    assert pdu_length_limit(0x01, 0) == ASSOCIATION_PDU_BOUND
    assert pdu_length_limit(0x02, 16384) == ASSOCIATION_PDU_BOUND
    assert pdu_length_limit(0x04, 16384) == 16384
    assert pdu_length_limit(0x04, 0) == UNLIMITED_PDU_BOUND  # "unlimited" still has a bound
    for small in (0x03, 0x05, 0x06, 0x07):
        assert pdu_length_limit(small, 0) < 1024


@pytest.mark.parametrize("connections", [3])
def test_huge_association_claims_cost_no_memory(serve_process: Callable[..., RunningSCP],
                                                 connections: int) -> None:
    node = serve_process()
    before = _rss(node)
    socks = [_claim(node.port, 0x01, HUGE) for _ in range(connections)]
    try:
        for sock in socks:
            answer = _read_abort(sock)
            assert answer[:1] == b"\x07", f"expected an A-ABORT, got {answer[:16]!r}"
            assert answer[8:10] == b"\x02\x06"  # source: service provider; invalid PDU parameter value
    finally:
        for sock in socks:
            sock.close()
    grown = _rss(node) - before
    assert grown < 50 * 1024 * 1024, f"SCP grew by {grown / 2**20:.0f} MiB"
    assert echo_ok(node.port).returncode == 0  # still serving
    assert node.log is not None
    assert "announced a 4294967280-byte PDU of type 0x01" in node.log.read_text()


def test_huge_pdata_claim_inside_an_association_is_aborted(serve_process: Callable[..., RunningSCP]) -> None:
    node = serve_process(ITVNODE_MAXIMUM_PDU_SIZE="65536")
    before = _rss(node)
    assoc = node.associate()
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        raw = assoc.dul.socket.socket
        raw.sendall(struct.pack(">BBL", 0x04, 0, HUGE))
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted
    finally:
        if assoc.is_established:
            assoc.abort()
    assert _rss(node) - before < 50 * 1024 * 1024
    assert echo_ok(node.port).returncode == 0


def test_pdata_just_above_the_advertised_maximum_is_aborted(serve_process: Callable[..., RunningSCP]) -> None:
    node = serve_process(ITVNODE_MAXIMUM_PDU_SIZE="16384")
    assoc = node.associate()
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 16384 + 2048) + b"\0" * 64)
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted


def test_large_instances_within_the_bound_still_store(serve_process: Callable[..., RunningSCP]) -> None:
    """pynetdicom senders put a whole data set in one PDU when we advertise no maximum: that must work."""
    node = serve_process()
    study = new_study([0.0], "pdu")
    ds = classic_slice(study, 0.0, 0, size=1024)  # 2 MiB of pixels in one PDU
    assoc = node.associate(max_pdu=0)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert node.spool().count() == 1


def test_aborted_and_hung_up_connections_free_their_slot_at_once(make_scp: Callable[..., RunningSCP]) -> None:
    """The association thread waits for the A-ASSOCIATE-RQ up to the ACSE timeout; a connection that ends
    before one (aborted for a bad first PDU, or just closed) must not hold a slot that long."""
    node = make_scp(max_associations=2)
    for i in range(12):
        sock = _claim(node.port, 0x01, HUGE) if i % 2 else socket.create_connection(("127.0.0.1", node.port))
        if i % 2:
            _read_abort(sock)
        sock.close()
    assert node.scp is not None and node.scp._server is not None
    deadline = time.monotonic() + 3
    while node.scp._server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not node.scp._server.active_associations
    assoc = node.associate()
    assert assoc.is_established
    assoc.release()


def test_claim_after_an_anonymous_tls_handshake(make_scp: Callable[..., RunningSCP], tmp_path: Path) -> None:
    """Without ``tls.ca`` any client completes the handshake; the PDU bound applies inside TLS too."""
    subprocess.run(["/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem",
                    "-out", "c.pem", "-days", "1", "-subj", "/CN=localhost"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=60)
    node = make_scp(ssl_context=server_context(tmp_path / "c.pem", tmp_path / "k.pem"))
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw, \
            client.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(struct.pack(">BBL", 0x01, 0, HUGE))
        answer = _read_abort(tls)  # type: ignore[arg-type]
    assert answer[:1] == b"\x07"
    assoc = node.associate(tls_args=(client, None))
    assert assoc.is_established
    assoc.release()

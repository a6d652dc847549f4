"""ConnectionGate and RateLimitedLog on real socket pairs with a fake clock."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator

import pytest

from service.net.admission import ConnectionGate, RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def _pair(pairs: list[tuple[socket.socket, socket.socket]]) -> tuple[socket.socket, socket.socket]:
    """(server side, peer side)."""
    a, b = socket.socketpair()
    b.settimeout(0.2)
    pairs.append((a, b))
    return a, b


def _closed(peer: socket.socket) -> bool:
    try:
        return peer.recv(1) == b""
    except TimeoutError:
        return False


def _gate(clock: Clock, **kw: int | float) -> ConnectionGate:
    args: dict[str, float] = {"max_associations": 3, "max_per_ip": 2, "first_pdu_timeout": 5.0, **kw}
    return ConnectionGate(max_associations=int(args["max_associations"]), max_per_ip=int(args["max_per_ip"]),
                          first_pdu_timeout=args["first_pdu_timeout"], clock=clock)


def test_silent_connection_closed_at_first_pdu_timeout(pairs, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    gate = _gate(clock)
    srv, peer = _pair(pairs)
    gate.admit(srv, "10.0.0.1")
    clock.t += 4.9
    assert gate.expire() == 0
    clock.t += 0.2
    with caplog.at_level(logging.WARNING, "service.net.admission"):
        assert gate.expire() == 1
    assert _closed(peer)
    assert "connection from 10.0.0.1 closed: no A-ASSOCIATE-RQ within 5 s" in caplog.text
    assert gate.counts() == (0, 0)


def test_associated_connection_is_not_timed_out(pairs) -> None:
    clock = Clock()
    gate = _gate(clock)
    srv, peer = _pair(pairs)
    gate.admit(srv, "10.0.0.1")
    assert gate.request(srv, "10.0.0.1", "PACS") is None
    clock.t += 3600
    assert gate.expire() == 0
    assert not _closed(peer)
    assert gate.counts() == (1, 0)


def test_new_connection_replaces_oldest_idle_one_of_its_address(pairs) -> None:
    clock = Clock()
    gate = _gate(clock, max_per_ip=2)
    (s1, p1), (s2, p2), (s3, p3) = (_pair(pairs) for _ in range(3))
    other, p_other = _pair(pairs)
    gate.admit(other, "10.0.0.9")  # another address is never evicted for this one
    gate.admit(s1, "10.0.0.1")
    clock.t += 1
    gate.admit(s2, "10.0.0.1")
    gate.admit(s3, "10.0.0.1")
    assert _closed(p1) and not _closed(p2) and not _closed(p3) and not _closed(p_other)
    assert gate.request(s1, "10.0.0.1", "PACS") is not None  # the evicted one cannot associate any more
    assert gate.request(s3, "10.0.0.1", "PACS") is None


def test_association_limits_global_and_per_address(pairs, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    gate = _gate(clock, max_associations=3, max_per_ip=2)
    socks = [_pair(pairs)[0] for _ in range(5)]
    for s in socks[:2]:
        gate.admit(s, "10.0.0.1")
        assert gate.request(s, "10.0.0.1", "PACS") is None
    for s, ip in zip(socks[2:], ["10.0.0.1", "10.0.0.2", "10.0.0.3"], strict=True):
        gate.admit(s, ip)  # at its limit with no idle connection to replace: admitted, refused at the RQ
    with caplog.at_level(logging.WARNING, "service.net.admission"):
        why = gate.request(socks[2], "10.0.0.1", "PACS")  # third from one address
    assert why is not None and "max_connections_per_ip 2" in why
    assert "association from 10.0.0.1 (calling AE 'PACS') rejected: local limit exceeded" in caplog.text
    assert gate.request(socks[3], "10.0.0.2", "CT") is None
    why = gate.request(socks[4], "10.0.0.3", "MIM")
    assert why is not None and "max_associations 3" in why


def test_slot_freed_when_the_association_thread_ends(pairs) -> None:
    clock = Clock()
    gate = _gate(clock, max_associations=1)
    a, b = _pair(pairs)[0], _pair(pairs)[0]
    gate.admit(a, "10.0.0.1")
    done = threading.Event()
    thread = threading.Thread(target=done.wait, args=(5,))
    gate.attach(a, thread)
    thread.start()
    gate.handler_done(a)  # the server's handler thread returns once the association thread runs
    assert gate.request(a, "10.0.0.1", "PACS") is None
    gate.admit(b, "10.0.0.2")
    assert gate.request(b, "10.0.0.2", "CT") is not None
    done.set()
    thread.join()
    assert gate.request(b, "10.0.0.2", "CT") is None


def test_rate_limited_log_counts_what_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("test.ratelog"), interval=10.0, burst=3, clock=clock)
    with caplog.at_level(logging.WARNING, "test.ratelog"):
        emitted = [log.warning(("idle", "10.0.0.1"), "idle %s", "10.0.0.1") for _ in range(100)]
        assert emitted.count(True) == 1
        for i in range(2, 10):  # many addresses: the global budget (3 per 10 s) holds
            log.warning(("idle", f"10.0.0.{i}"), "idle %s", f"10.0.0.{i}")
        assert len(caplog.records) == 3
        clock.t += 10
        assert log.warning(("idle", "10.0.0.1"), "idle %s", "10.0.0.1")
    assert "(99 more like this in the last 10 s not logged)" in caplog.records[-1].getMessage()
    assert "(6 other refusal lines not logged: log rate limit)" in caplog.records[-1].getMessage()

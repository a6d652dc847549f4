"""Who gets a connection slot: first-PDU deadline, per-IP connection limit, association limit.

pynetdicom counts every accepted TCP connection against ``maximum_associations`` from the moment it is
accepted, and waits ``acse_timeout`` (30 s) for its A-ASSOCIATE-RQ: twelve idle sockets locked every sender
out for 30 s. :class:`ConnectionGate` replaces that count:

- A connection that has not delivered its A-ASSOCIATE-RQ within ``first_pdu_timeout`` (TLS handshake
  included) is closed by :meth:`ConnectionGate.expire`, which the server's accept loop calls several times a
  second. Closing the socket from outside also frees a thread blocked in ``recv`` or in the handshake.
- One IP holds at most ``max_per_ip`` connections (associations and connections still waiting for their
  first PDU). At the limit, a new connection replaces that IP's oldest connection still waiting; when none
  waits, the new one is answered A-ASSOCIATE-RJ (local limit exceeded) once its request arrives, so the log
  line can name the calling AE.
- Only connections that delivered an A-ASSOCIATE-RQ count against ``max_associations``.

Every refusal and every closed idle connection is logged with the peer address (and the calling AE once
known) through :class:`RateLimitedLog`, so a flood cannot flood the log.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LOG = logging.getLogger(__name__)

Clock = Callable[[], float]


class RateLimitedLog:
    """Log lines keyed by what they are about (e.g. ``("idle", ip)``), at most one per key per ``interval``
    and at most ``burst`` lines per ``interval`` over all keys; what was held back is counted and reported on
    the next line that gets through."""

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0, burst: int = 20,
                 max_keys: int = 4096, clock: Clock = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._lock = threading.Lock()
        self._last: OrderedDict[Any, float] = OrderedDict()  # key -> time of its last emitted line
        self._held: dict[Any, int] = {}
        self._held_other = 0  # held back by the global budget
        self._window_start = -float("inf")
        self._window_lines = 0

    def log(self, level: int, key: Any, msg: str, *args: Any) -> bool:
        """Emit ``msg % args`` unless rate-limited; returns whether it was emitted."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            if now - self._window_start >= self.interval:
                self._window_start, self._window_lines = now, 0
            if self._window_lines >= self.burst:
                self._held_other += 1
                return False
            self._window_lines += 1
            self._last[key] = now
            self._last.move_to_end(key)
            while len(self._last) > self.max_keys:
                old, _ = self._last.popitem(last=False)
                self._held.pop(old, None)
            held, other = self._held.pop(key, 0), self._held_other
            self._held_other = 0
        suffix = ""
        if held:
            suffix += f" ({held} more like this in the last {self.interval:g} s not logged)"
        if other:
            suffix += f" ({other} other refusal lines not logged: log rate limit)"
        self.logger.log(level, msg + suffix, *args)
        return True

    def warning(self, key: Any, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args)


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    ip: str
    deadline: float
    associated: bool = False  # delivered an A-ASSOCIATE-RQ and holds an association slot
    dropped: bool = False  # closed by the gate, or its association ended; the thread ends on its own
    thread: threading.Thread | None = None  # the association's thread: the record lives as long as it runs

    def finished(self) -> bool:
        return self.thread is not None and self.thread.ident is not None and not self.thread.is_alive()


def _close(sock: socket.socket) -> None:
    """Shut the socket down from another thread: the owner's blocked recv/handshake returns at once.

    ``socket.socket.shutdown`` on purpose: ``SSLSocket.shutdown`` would clear its SSL object under a
    handshake running in the connection's thread."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class ConnectionGate:
    """Counts connections per IP and associations; thread-safe. See the module docstring."""

    def __init__(self, *, max_associations: int, max_per_ip: int, first_pdu_timeout: float,
                 clock: Clock = time.monotonic, log: RateLimitedLog | None = None) -> None:
        if max_associations < 1 or max_per_ip < 1 or first_pdu_timeout <= 0:
            raise ValueError("max_associations and max_per_ip must be >= 1, first_pdu_timeout > 0")
        self.max_associations = max_associations
        self.max_per_ip = max_per_ip
        self.first_pdu_timeout = first_pdu_timeout
        self.clock = clock
        self.log = log or RateLimitedLog(LOG, clock=clock)
        self._lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}  # id(socket) -> record, in accept order

    def _prune(self) -> None:
        """Forget connections whose association thread has ended (call with the lock held)."""
        for key in [k for k, c in self._conns.items() if c.finished()]:
            del self._conns[key]

    # -- accept thread

    def admit(self, sock: socket.socket, ip: str) -> None:
        """A new TCP connection. May close the same IP's oldest connection still waiting for its first PDU."""
        now = self.clock()
        evicted: _Conn | None = None
        with self._lock:
            self._prune()
            live = [c for c in self._conns.values() if c.ip == ip and not c.dropped]
            if len(live) >= self.max_per_ip:
                evicted = next((c for c in live if not c.associated), None)
                if evicted is not None:
                    evicted.dropped = True
                    live.remove(evicted)
            self._conns[id(sock)] = _Conn(sock, ip, now + self.first_pdu_timeout)
        if evicted is not None:
            _close(evicted.sock)
            self.log.warning(("evicted", ip),
                             "connection from %s closed before its A-ASSOCIATE-RQ: a new connection from "
                             "this address took its place (max_connections_per_ip %d)", ip, self.max_per_ip)

    def expire(self) -> int:
        """Close connections past their first-PDU deadline; returns how many."""
        now = self.clock()
        with self._lock:
            self._prune()
            late = [c for c in self._conns.values()
                    if not c.associated and not c.dropped and now >= c.deadline]
            for c in late:
                c.dropped = True
        for c in late:
            _close(c.sock)
            self.log.warning(("idle", c.ip), "connection from %s closed: no A-ASSOCIATE-RQ within %g s "
                             "(first_pdu_timeout)", c.ip, self.first_pdu_timeout)
        return len(late)

    # -- connection threads

    def attach(self, sock: socket.socket, thread: threading.Thread) -> None:
        """The association thread that serves ``sock``: its end frees the connection's slot."""
        with self._lock:
            conn = self._conns.get(id(sock))
            if conn is not None:
                conn.thread = thread

    def request(self, sock: socket.socket | None, ip: str, calling_ae: str) -> str | None:
        """An A-ASSOCIATE-RQ arrived on ``sock``: take an association slot, or say why not (local limit)."""
        with self._lock:
            self._prune()
            conn = self._conns.get(id(sock)) if sock is not None else None
            if conn is not None and conn.dropped:
                return "connection already closed (first_pdu_timeout or max_connections_per_ip)"
            associated = [c for c in self._conns.values() if c.associated and not c.dropped]
            from_ip = sum(1 for c in associated if c.ip == ip)
            if len(associated) >= self.max_associations:
                why = f"{len(associated)} associations in progress (max_associations {self.max_associations})"
            elif from_ip >= self.max_per_ip:
                why = (f"{from_ip} associations from this address "
                       f"(max_connections_per_ip {self.max_per_ip})")
            else:
                if conn is not None:  # None: not admitted through the gate (not a server connection)
                    conn.associated = True
                return None
        self.log.warning(("limit", ip, calling_ae),
                         "association from %s (calling AE %r) rejected: local limit exceeded, %s",
                         ip, calling_ae, why)
        return why

    def ended(self, thread: threading.Thread) -> None:
        """The association on ``thread`` was released or aborted: its slot is free now, not only once its
        threads have wound down (a sender that associates again at once must not see "local limit")."""
        with self._lock:
            for conn in self._conns.values():
                if conn.thread is thread:
                    conn.dropped = True

    def handler_done(self, sock: socket.socket) -> None:
        """The server's handler thread for ``sock`` returned: forget the connection unless an association
        thread took it over (a failed TLS handshake, an error before the association started)."""
        with self._lock:
            conn = self._conns.get(id(sock))
            if conn is not None and (conn.thread is None or conn.thread.ident is None or conn.finished()):
                del self._conns[id(sock)]

    # -- introspection

    def counts(self) -> tuple[int, int]:
        """``(associations, connections waiting for their first PDU)``."""
        with self._lock:
            self._prune()
            live = [c for c in self._conns.values() if not c.dropped]
        return sum(c.associated for c in live), sum(not c.associated for c in live)

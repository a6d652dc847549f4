"""Oversized-PDU attack during a real transfer: SCP memory and the transfer's time, with and without attack.

Usage: ``.venv/bin/python -m bench.hostile [--attackers 3 20] [--phases 10 --slices 120 --size 512]``.

Starts ``itvnode serve`` as shipped (fsync on, assembler in-process) and sends the full-size phantom
(10 x 120 x 512^2, ~630 MB, cached by bench/ingest.py) with ``/usr/bin/storescu +sd +r``: once alone, then
while N attacker threads keep opening connections whose first 6 bytes claim a ~4 GiB A-ASSOCIATE-RQ and,
after each abort, a fresh connection (paced ``--pause`` s). A sampler reads the serve process's RSS every
20 ms. Printed per round: transfer time, its ratio to the undisturbed transfer in the same run, peak RSS
(goal < 600 MB), attack connections made and how each was answered (A-ABORT, closed, refused).

Before the fix (hardening issue, item 1) a single such connection took the SCP to 3.7-4.3 GB RSS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from bench.ingest import ITVNODE, phantom, send, stop, wait_echo
from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[1]

CLAIM = struct.pack(">BBL", 0x01, 0, 0xFFFF_FFF0)


class RssSampler(threading.Thread):
    def __init__(self, pid: int, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.period = period
        self.peak = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self.halt.wait(self.period)


def attacker(port: int, halt: threading.Event, pause: float, tally: Counter[str],
             lock: threading.Lock) -> None:
    """Claim a 4 GiB PDU, read the answer until EOF, repeat; bounded by ``halt`` and a 10 s read timeout."""
    while not halt.is_set():
        outcome = "refused"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(CLAIM)
                answer = b""
                while len(answer) < 4096:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
                outcome = "a-abort" if answer[:1] == b"\x07" else ("closed" if not answer else "other")
        except TimeoutError:
            outcome = "no answer in 10 s"
        except OSError:
            outcome = "refused"
        with lock:
            tally[outcome] += 1
        halt.wait(pause)


def one_round(folder: Path, work: Path, n_files: int, attackers: int, pause: float) -> dict[str, object]:
    data = Path(tempfile.mkdtemp(prefix="hostile-", dir=work))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
    env.update({"ITVNODE_PORT": str(port), "ITVNODE_HOST": "127.0.0.1", "ITVNODE_DATA_DIR": str(data),
                "ITVNODE_MIN_FREE_BYTES": "0", "ITVNODE_LOG_LEVEL": "WARNING"})
    proc = subprocess.Popen([str(ITVNODE), "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    halt = threading.Event()
    tally: Counter[str] = Counter()
    lock = threading.Lock()
    threads = [threading.Thread(target=attacker, args=(port, halt, pause, tally, lock), daemon=True)
               for _ in range(attackers)]
    sampler = None
    try:
        wait_echo(port, "ITVNODE", proc)
        sampler = RssSampler(proc.pid)
        sampler.start()
        start_rss = psutil.Process(proc.pid).memory_info().rss
        for t in threads:
            t.start()
        time.sleep(0.5 if attackers else 0.0)  # let the attack be under way before the transfer starts
        error = ""
        try:
            dt = send(folder, port, "ITVNODE")
        except RuntimeError as exc:
            dt, error = float("nan"), " | ".join(str(exc).splitlines()[1:4])
    finally:
        halt.set()
        for t in threads:
            t.join(timeout=15)
        if sampler is not None:
            sampler.halt.set()
            sampler.join(timeout=5)
        stop(proc)
    got = len(list((data / "spool").rglob("*.dcm")))
    shutil.rmtree(data, ignore_errors=True)
    return {"time": dt, "peak": sampler.peak if sampler else 0, "start": start_rss, "stored": got,
            "tally": dict(tally), "error": error}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attackers", type=int, nargs="+", default=[3, 20])
    ap.add_argument("--pause", type=float, default=0.05, help="seconds an attacker waits between connections")
    ap.add_argument("--phases", type=int, default=10)
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "itvnode-bench-cache")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    folder, n_files, n_bytes = phantom(args.cache, args.phases, args.slices, args.size)
    print(f"data: {n_files} files, {n_bytes / 1e6:.0f} MB; storescu +sd +r, TCP_NODELAY=1; "
          f"attack: 6-byte A-ASSOCIATE-RQ headers claiming 4 GiB, reconnecting every {args.pause} s")
    work = Path(tempfile.mkdtemp(prefix="itvnode-hostile-", dir=args.cache))
    worst_peak = 0
    try:
        base = one_round(folder, work, n_files, 0, args.pause)
        rows = [(0, base)] + [(n, one_round(folder, work, n_files, n, args.pause)) for n in args.attackers]
        print(f"\n{'attackers':>9} {'transfer':>9} {'vs alone':>8} {'stored':>7} {'start RSS':>10} "
              f"{'peak RSS':>9}  attack connections")
        for n, r in rows:
            ratio = float(r["time"]) / float(base["time"])  # type: ignore[arg-type]
            peak = int(r["peak"])  # type: ignore[call-overload]
            worst_peak = max(worst_peak, peak)
            print(f"{n:>9} {float(r['time']):>8.2f}s {ratio:>7.2f}x {r['stored']:>4}/{n_files} "  # type: ignore[arg-type]
                  f"{int(r['start']) / 2**20:>8.0f}MB {peak / 2**20:>7.0f}MB  {r['tally']}"  # type: ignore[call-overload]
                  + (f"  transfer failed: {r['error']}" if r["error"] else ""))
        ok = worst_peak < 600 * 2**20 and all(r["stored"] == n_files for _, r in rows)
        print(f"\npeak RSS of the SCP under attack: {worst_peak / 2**20:.0f} MB (goal < 600 MB): "
              f"{'met' if ok else 'NOT met'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak: many small studies through ``itvnode run`` with short retention; disk must stay flat, nothing lost.

dcmtk storescu sends ``--studies`` small 10-phase phantoms (distinct UIDs) one every ``--every`` seconds to
``itvnode run`` (embedded broker); dcmtk storescp receives the RTSTRUCTs. Retention is set short
(``--retention-s``), so finished studies are purged while new ones arrive. Printed: the data directory's size
over time, studies done (RTSTRUCTs received) and lost (goal 0), what retention purged, and the RSS of each
process of the node at start and at the end.

    .venv/bin/python -m bench.soak [--studies 30] [--every 4] [--slices 8] [--rows 64] [--sam3 none|tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[1]

STORESCU, STORESCP = "/usr/bin/storescu", "/usr/bin/storescp"


def du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def rss_by_role(root: psutil.Process) -> dict[str, float]:
    """MiB per process of the node: supervisor, scp, the workers' main and pool processes."""
    out: dict[str, float] = {}
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
            rss = p.memory_info().rss / 2**20
        except psutil.Error:
            continue
        if p.pid == root.pid:
            role = "supervisor (run)"
        elif " serve" in cmd:
            role = "scp (serve)"
        elif "--queues inference" in cmd:
            role = "inference worker" + (" main" if p.parent() and p.parent().pid == root.pid else " pool")
        elif "--queues export" in cmd:
            role = "export worker" + (" main" if p.parent() and p.parent().pid == root.pid else " pool")
        else:
            role = cmd.split()[0] if cmd else str(p.pid)
        n = 1
        name = role
        while name in out:
            n += 1
            name = f"{role} #{n}"
        out[name] = round(rss, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=30)
    ap.add_argument("--every", type=float, default=4.0, help="seconds between two studies")
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--retention-s", type=float, default=10.0, help="retention after a study finished")
    ap.add_argument("--sam3", default="none", help="none (threshold structures only) or tiny")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    from itvnode.commands.phantom import write_phantom
    from models.phantom_spec import PhantomSpec

    tmp = Path(tempfile.mkdtemp(prefix="itvnode-soak-"))
    spec = PhantomSpec.small(n_phases=10, shape=(args.slices, args.rows, args.rows))
    phantoms = []
    for i in range(args.studies):
        phantoms.append(write_phantom(tmp / f"study{i:03d}", spec, vendor="siemens", uid_seed=f"soak-{i}"))
    study_bytes = du(tmp / "study000")

    rx_dir = tmp / "rx"
    rx_dir.mkdir()
    rx_port, port, http_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
    env.update({
        "ITVNODE_DATA_DIR": str(tmp / "data"), "ITVNODE_PORT": str(port), "ITVNODE_HOST": "127.0.0.1",
        "ITVNODE_HTTP_PORT": str(http_port), "ITVNODE_QUIET_PERIOD": "3",
        "ITVNODE_DESTINATIONS": f"RX@127.0.0.1:{rx_port}", "ITVNODE_MIN_FREE_BYTES": "0",
        "ITVNODE_RETENTION_DAYS": str(args.retention_s / 86400.0), "ITVNODE_RETENTION_INTERVAL": "2",
        "ITVNODE_EXPORT_SWEEP_INTERVAL": "2", "ITVNODE_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
        "TCP_NODELAY": "1", "PYTHONUNBUFFERED": "1",
    })
    if args.sam3 == "tiny":
        from models.sam3.tiny import write_tiny_model

        env["ITVNODE_SAM3_DIR"] = str(write_tiny_model(tmp / "tiny"))
    elif args.sam3 != "none":
        env["ITVNODE_SAM3_DIR"] = args.sam3

    logs = tmp / "logs"
    logs.mkdir()
    rx = subprocess.Popen([STORESCP, "-aet", "RX", "-od", str(rx_dir), str(rx_port)],
                          stdout=open(logs / "storescp.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                          env=dict(os.environ, TCP_NODELAY="1"), start_new_session=True)
    node = subprocess.Popen([sys.executable, "-m", "itvnode.cli", "run", "--export-concurrency", "1"],
                            stdout=open(logs / "node.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            env=env, cwd=REPO, start_new_session=True)
    root = psutil.Process(node.pid)
    samples: list[tuple[float, int, int, int]] = []
    t0 = time.monotonic()

    def received() -> int:
        return sum(1 for p in rx_dir.iterdir() if p.is_file())

    def sample(sent: int) -> None:
        samples.append((time.monotonic() - t0, du(tmp / "data"), sent, received()))

    rss_start: dict[str, float] = {}
    refused = 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        time.sleep(5)  # the workers start
        rss_start = rss_by_role(root)
        for i, ph in enumerate(phantoms):
            res = subprocess.run([STORESCU, "-aet", "PACS", "-aec", "ITVNODE", "+sd", "+r", "127.0.0.1",
                                  str(port), str(ph.root)], capture_output=True, text=True,
                                 env=dict(os.environ, TCP_NODELAY="1"), timeout=120)
            refused += res.returncode != 0
            sample(i + 1)
            next_at = time.monotonic() + args.every
            while time.monotonic() < next_at:
                time.sleep(0.5)
        deadline = time.monotonic() + args.timeout
        last = 0.0
        while time.monotonic() < deadline and received() < args.studies:
            if time.monotonic() - last > 5:
                sample(args.studies)
                last = time.monotonic()
            time.sleep(0.5)
        settle = time.monotonic() + args.retention_s + 15  # the last studies' retention
        while time.monotonic() < settle:
            time.sleep(1)
        sample(args.studies)
        rss_end = rss_by_role(root)
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
        os.killpg(rx.pid, signal.SIGTERM)
        rx.wait(timeout=10)

    stats_path = tmp / "data" / "retention.json"
    purged = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    done = received()
    print(f"soak: {args.studies} studies of {study_bytes / 1e6:.1f} MB ({spec.shape} x 10 phases), one every "
          f"{args.every:g} s, retention {args.retention_s:g} s after finishing, SAM 3: {args.sam3}")
    print(f"{'t (s)':>7} {'data dir (MB)':>14} {'sent':>5} {'done':>5}")
    step = max(1, len(samples) // 25)
    for t, size, sent, got in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        print(f"{t:7.0f} {size / 1e6:14.1f} {sent:5d} {got:5d}")
    sizes = [s[1] for s in samples]
    print(f"data dir: max {max(sizes) / 1e6:.1f} MB, end {sizes[-1] / 1e6:.1f} MB; all sent studies together "
          f"{args.studies * study_bytes / 1e6:.1f} MB")
    print(f"studies done (RTSTRUCT received): {done} of {args.studies}; lost: {args.studies - done}; "
          f"refused sends: {refused}")
    print(f"purged: {purged.get('studies', {})} bytes {purged.get('bytes', {})}")
    print("RSS (MiB)                 start      end")
    for role in sorted(set(rss_start) | set(rss_end)):
        a, b = rss_start.get(role), rss_end.get(role)
        print(f"  {role:<22} {a if a is not None else '-':>7} {b if b is not None else '-':>8}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")
    result: dict[str, Any] = {"done": done, "lost": args.studies - done}
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

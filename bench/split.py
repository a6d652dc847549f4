"""One study's latency with 1 inference worker vs 2 workers splitting it (``phase_groups: 2``, a Celery chord
over phase groups, worker.study_split).

Each configuration runs the real node on loopback (``itvnode serve``, N ``itvnode worker --queues inference``
with their own node names, an export worker, dcmtk storescp as the destination; Redis when it answers on
127.0.0.1:6379, else the embedded broker) on a fresh data directory, sends the same phantom with storescu and
waits for the RTSTRUCT. The configurations alternate for ``--rounds`` rounds, so both see the same machine.

Latency is the study's computation, from ``processing`` to the RTSTRUCT handed to the outbox (manifest
history and ``results.finished_at``); the quiet period and the sending are the same in both and left out. The
wall time from storescu to the RTSTRUCT received is printed beside it.

The model is the random-init tiny SAM 3 on the CPU, one thread per worker (``OMP_NUM_THREADS=1``): each
worker stands for one GPU. On this 2-core machine two workers have one core each, so the ideal ratio is 2
minus the finishing task's serial part (reading the study again, the cross-phase post-processing, the
RTSTRUCT). Every score is kept (``score_threshold: 0``) so that the random model paints masks; its input size
(``--image-size``) makes its share of the study like SAM 3's on a GPU. The RTSTRUCTs of all runs must have
the same SOP Instance UID and the same contour points; the bench says so and fails otherwise.

Measured 2026-11-30 on the 2-core machine, quiet (load average 0.7), Redis, ``--rounds 2`` with the defaults
(10 x 64 x 256^2, image size 336): latency 1 worker 20.7 / 20.4 s, 2 workers 13.4 / 12.1 s, median speed-up
1.61x; each group 9.2-10.2 s on its own worker; the finishing task's serial part ~3 s (filter 1.9-2.2 s of
the random model's noisy masks, RTSTRUCT 0.5-0.6 s, reading the study 0.1 s); the same RTSTRUCT in all four
runs.

    .venv/bin/python -m bench.split [--rows 256] [--slices 64] [--image-size 336] [--phases 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.e2e import STORESCP, start, stop, storescu, wait_port
from tests.support.net import free_port

REDIS = "redis://127.0.0.1:6379/11"


def _redis_url() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            pass
    except OSError:
        return None
    import redis

    client = redis.Redis.from_url(REDIS)
    client.flushdb()
    client.close()
    return REDIS


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def run_once(work: Path, dicom: Path, sam3_dir: Path, config: Path, workers: int,
             broker: str | None) -> dict[str, Any]:
    """The node with ``workers`` inference workers (phase_groups = workers) on a fresh data dir."""
    work.mkdir(parents=True)
    data, rx = work / "data", work / "rx"
    rx.mkdir()
    node_port, rx_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
    env.update({
        "ITVNODE_DATA_DIR": str(data), "ITVNODE_PORT": str(node_port), "ITVNODE_HOST": "127.0.0.1",
        "ITVNODE_QUIET_PERIOD": "3", "ITVNODE_DESTINATIONS": f"RX@127.0.0.1:{rx_port}",
        "ITVNODE_EXPORT_RETRY_BASE": "1", "ITVNODE_EXPORT_SWEEP_INTERVAL": "5", "ITVNODE_MIN_FREE_BYTES": "0",
        "ITVNODE_DEVICE": "cpu", "ITVNODE_SAM3_DIR": str(sam3_dir), "ITVNODE_CONFIG": str(config),
        "ITVNODE_PHASE_GROUPS": str(workers), "ITVNODE_HTTP_PORT": str(free_port()),
        "ITVNODE_HTTP_HOST": "127.0.0.1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TCP_NODELAY": "1",
    })
    if broker:
        env["ITVNODE_BROKER_URL"] = broker
        import redis

        client = redis.Redis.from_url(broker)
        client.flushdb()
        client.close()
    itv = [sys.executable, "-m", "itvnode.cli"]
    procs = [start([STORESCP, "-aet", "RX", "-od", str(rx), str(rx_port)], work / "rx.log",
                   dict(os.environ, TCP_NODELAY="1"))]
    try:
        procs.append(start([*itv, "serve"], work / "serve.log", env))
        logs = []
        for i in range(workers):
            logs.append(work / f"inference{i}.log")
            procs.append(start([*itv, "worker", "--queues", "inference", "--concurrency", "1", "--hostname",
                                f"gpu{i}@bench"], logs[-1], env))
        procs.append(start([*itv, "worker", "--queues", "export", "--hostname", "export@bench"],
                           work / "export.log", env))
        wait_port(node_port, 60)
        wait_port(rx_port, 20)
        deadline = time.monotonic() + 300
        while not all("SAM 3 ready" in f.read_text(errors="replace") for f in logs if f.exists()) or \
                not all(f.exists() for f in logs):
            if time.monotonic() > deadline:
                raise SystemExit(f"workers not ready: see {work}")
            time.sleep(0.5)
        t0 = time.perf_counter()
        storescu(node_port, "ITVNODE", dicom)
        deadline = time.monotonic() + 1800
        m: dict[str, Any] = {}
        while not (list(rx.glob("RS*")) and m.get("state") == "done"):  # done: storescp answered
            if time.monotonic() > deadline:
                raise SystemExit(f"no RTSTRUCT after 30 min: see {work}")
            time.sleep(0.2)
            manifests = list(data.glob("studies/*/manifest.json"))
            m = json.loads(manifests[0].read_text()) if manifests else {}
        wall = time.perf_counter() - t0
        started = max(_epoch(h["at"]) for h in m["history"] if h["state"] == "processing")
        import pydicom

        (rs,) = rx.glob("RS*")
        ds = pydicom.dcmread(rs)
        contours = hashlib.sha256()  # every ROI's name and contour points: the content, not just the UID
        for roi, rc in zip(ds.StructureSetROISequence, ds.ROIContourSequence, strict=True):
            contours.update(str(roi.ROIName).encode())
            for c in getattr(rc, "ContourSequence", []):
                contours.update(repr(list(c.ContourData)).encode())
        return {"workers": workers, "latency": float(m["results"]["finished_at"]) - started, "wall": wall,
                "timings": m["results"]["timings"], "split": m["results"].get("split"),
                "content": (str(ds.SOPInstanceUID), contours.hexdigest())}
    finally:
        for p in reversed(procs):
            stop(p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--phases", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=336,
                    help="the random SAM 3's input size (multiple of 14): larger makes the model's share "
                         "of a study more like SAM 3's on a GPU")
    args = ap.parse_args()

    from itvnode.commands.phantom import write_phantom
    from models.phantom_spec import PhantomSpec
    from models.sam3.tiny import write_tiny_model
    from tests.support.tiny_runs import every_score_structures

    work = Path(tempfile.mkdtemp(prefix="itvnode-bench-split-"))
    series = write_phantom(work / "phantom", PhantomSpec.sized(args.rows, args.slices, n_phases=args.phases))
    sam3_dir = write_tiny_model(work / "tiny-sam3", image_size=args.image_size)
    config = work / "itvnode.yaml"
    config.write_text(json.dumps({"structures": every_score_structures()}))
    broker = _redis_url()
    print(f"phantom: {args.phases} phases x {args.slices} slices x {args.rows}^2 px; tiny SAM 3 on the CPU, "
          f"one thread per worker; broker: {broker or 'embedded (SQLite)'}; {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}")
    results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for r in range(args.rounds):
        for workers in (1, 2):
            res = run_once(work / f"r{r}-w{workers}", series.root, sam3_dir, config, workers, broker)
            results[workers].append(res)
            t = res["timings"]
            groups = [f"{g['worker']} {g['wall']:.1f} s" for g in (res["split"] or {}).get("done", [])]
            print(f"round {r + 1}, {workers} worker(s): latency {res['latency']:.1f} s (storescu -> RTSTRUCT "
                  f"received {res['wall']:.1f} s); segmenter busy {t.get('segmenter', 0):.1f} s"
                  + (f"; groups: {', '.join(groups)}; finishing task: load {t.get('load', 0):.1f} s, filter "
                     f"{t.get('filter', 0):.1f} s, rtstruct {t.get('rtstruct', 0):.1f} s" if groups else ""))
    one = statistics.median(r["latency"] for r in results[1])
    two = statistics.median(r["latency"] for r in results[2])
    same = len({r["content"] for rs in results.values() for r in rs}) == 1
    print(f"median latency: 1 worker {one:.1f} s, 2 workers {two:.1f} s: speed-up {one / two:.2f}x "
          f"(ideal 2 on 2 cores); same RTSTRUCT (UID and every contour point) in every run: "
          f"{'yes' if same else 'NO'}")
    print(f"work directory (logs): {work}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

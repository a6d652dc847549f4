"""External (body) threshold speed: models.threshold.threshold_body vs the previous implementation, same run.

Data: the cached breathing phantom of bench/load.py (10 phases x 120 x 512 x 512 by default), as read by the
node, and the same volume with a couch top painted under the patient across the whole field of view (12 mm
slab, 25 mm below the back: a wider bounding box, and a component that must be dropped). Each round runs
the previous implementation (tests/unit/threshold_previous.py, one phase after the other) and the shipped
one (phases on ``--workers`` threads) in alternating order; outputs must be identical.

Prints best and median seconds per phase, the speed-up and the load average.

    .venv/bin/python -m bench.threshold [--rounds 3] [--phases 10] [--slices 120] [--size 512] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.load import phantom
from models.threshold import threshold_body
from service.dicomio.volume import read_phases
from tests.support.threshold_previous import threshold_body as previous_body

ROOT = Path(__file__).resolve().parents[1]

HU_RANGE = (-350.0, 3000.0)  # the shipped External structure


def with_couch(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """A 12 mm couch top 25 mm below the lowest body row, across the field of view."""
    body_rows = np.flatnonzero((hu[0] > -350).any(axis=(0, 2)))
    y0 = int(body_rows[-1]) + int(25 / spacing[1])
    out = hu.copy()
    out[:, :, y0 : y0 + int(12 / spacing[1]), 5:-5] = 300
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--phases", type=int, default=10)
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "itvnode-bench-cache")
    args = ap.parse_args()
    lists = phantom(args.cache, args.phases, args.slices, args.size)
    hu, geoms = read_phases(lists)
    sp = geoms[0].spacing
    n_ph = hu.shape[0]
    print(f"data: {hu.shape} HU, spacing {tuple(round(s, 3) for s in sp)} mm; workers={args.workers}")
    status = 0
    for label, vol in (("phantom", hu), ("phantom+couch", with_couch(hu, sp))):
        runners = {
            "previous": lambda v=vol: previous_body(v, sp, HU_RANGE),
            "threshold_body": lambda v=vol: threshold_body(v, sp, HU_RANGE, workers=args.workers),
        }
        times: dict[str, list[float]] = {k: [] for k in runners}
        outs: dict[str, np.ndarray] = {}
        for r in range(args.rounds):
            for name in list(runners) if r % 2 == 0 else list(reversed(runners)):
                t0 = time.perf_counter()
                outs[name] = runners[name]()
                times[name].append((time.perf_counter() - t0) / n_ph)
        same = np.array_equal(outs["previous"], outs["threshold_body"])
        status |= not same
        print(f"\n{label}: outputs identical: {same}; load average {os.getloadavg()[0]:.2f} "
              f"on {os.cpu_count()} cores")
        print(f"{'implementation':<16}{'best s/phase':>14}{'median s/phase':>16}")
        for name, ts in times.items():
            print(f"{name:<16}{min(ts):>14.3f}{statistics.median(ts):>16.3f}")
        ratio = statistics.median(times["previous"]) / statistics.median(times["threshold_body"])
        print(f"speed-up (median): {ratio:.1f}x")
    return status


if __name__ == "__main__":
    sys.exit(main())

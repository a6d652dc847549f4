"""DICOM load speed: ``service.dicomio.volume.read_phases`` vs a naive pydicom read + decode of the same
files.

The data is the breathing phantom (10 phases x 120 x 512 x 512 by default, Explicit VR Little Endian, cached
under ``--cache``). Each round runs, in alternating order:

* ``naive``: ``pydicom.dcmread(f).pixel_array`` for every file (the peer; it keeps nothing);
* ``pydicom``: the previous reader (every file parsed and decoded by pydicom, each phase into its own array
  then copied into the 4D one), kept in service/dicomio/volume.py for what the fast reader does not handle;
* ``read_phases``: the shipped reader (header scan, pixels read in parallel into one preallocated array).

Prints best and median seconds per reader, the ratios against ``naive`` and the load average (2 shared cores
are noisy: compare ratios, not seconds). The reader outputs are checked to be identical.

    .venv/bin/python -m bench.load [--rounds 5] [--phases 10] [--slices 120] [--size 512] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom

from service.dicomio import volume

ROOT = Path(__file__).resolve().parents[1]


def phantom(cache: Path, phases: int, slices: int, size: int) -> list[list[Path]]:
    """File lists per phase of a cached phantom (written on first use)."""
    folder = cache / f"load-{phases}x{slices}x{size}"
    done = folder / ".complete"
    if not done.exists():
        from itvnode.commands.phantom import write_phantom
        from models.phantom_spec import PhantomSpec

        t0 = time.perf_counter()
        write_phantom(folder, PhantomSpec.sized(size, slices, n_phases=phases))
        done.write_text("ok\n")
        print(f"phantom written to {folder} in {time.perf_counter() - t0:.1f} s")
    dicom = folder / "dicom"
    return [sorted(d.glob("*.dcm")) for d in sorted(p for p in dicom.iterdir() if p.is_dir())]


def naive(lists: list[list[Path]]) -> None:
    for files in lists:
        for f in files:
            pydicom.dcmread(f).pixel_array  # noqa: B018 - the decode is the point


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--phases", type=int, default=10)
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=None, help="reader threads (default: the shipped default)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "itvnode-bench-cache")
    args = ap.parse_args()
    lists = phantom(args.cache, args.phases, args.slices, args.size)
    n = sum(len(f) for f in lists)
    mb = sum(f.stat().st_size for fl in lists for f in fl) / 1e6
    workers = args.workers or volume.default_workers()
    print(f"data: {len(lists)} phases, {n} files, {mb:.0f} MB; read_phases workers={workers}")

    new, _ = volume.read_phases(lists, workers=workers)
    old, _ = volume._read_phases_pydicom([[str(f) for f in fl] for fl in lists], None)
    if not (new.dtype == old.dtype and np.array_equal(new, old)):
        print("MISMATCH: read_phases differs from the pydicom reader", file=sys.stderr)
        return 1
    del new, old
    runners: dict[str, Callable[[], object]] = {
        "naive": lambda: naive(lists),
        "pydicom": lambda: volume._read_phases_pydicom([[str(f) for f in fl] for fl in lists], None),
        "read_phases": lambda: volume.read_phases(lists, workers=workers),
    }
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(args.rounds):
        for name in list(runners) if r % 2 == 0 else list(reversed(runners)):
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.rounds} rounds")
    med_naive = statistics.median(times["naive"])
    print(f"{'reader':<13}{'best s':>8}{'median s':>10}{'/ naive':>9}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<13}{min(ts):>8.2f}{med:>10.2f}{med / med_naive:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

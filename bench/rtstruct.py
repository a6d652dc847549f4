"""RTSTRUCT writing speed and fidelity: itvnode vs its previous writer and rt-utils 1.2.7, same masks and run.


Masks: the breathing phantom (models/phantom.py), 10 phases x 120 x 512 x 512 (0.98 x 0.98 x 2.5 mm) by
default, five structures (External, Lung_L, Lung_R, Heart, GTVp) per phase plus the ITV: 51 ROIs. Only
phase 0 is written as CT (rt-utils and plastimatch need a folder of one series; every phase shares its grid);
the other phases' geometries carry their own series/instance UIDs, which is all an RTSTRUCT writer reads.

Measured:

* speed (issue 14: <= 1 s): build + write of the ``combined`` layout by the current writer and, as the peer in
  the same process, by the previous one (tests/unit/rtstruct_previous.py: slice-by-slice tracer, per-contour
  datasets), alternating, ``--repeat`` times each after one warm-up; best and median, the load average, and
  whether both files are byte-identical;
* build + write wall time of our ``combined`` layout (one file, 51 ROIs) and ``per-series`` layout (10 files);
* rt-utils 1.2.7 (``RTStructBuilder.create_new`` on phase 0, ``add_roi`` for the same 51 masks, ``save``) and
  the time ratio rt-utils / ours-combined;
* round trip: ``plastimatch convert --input RS --referenced-ct PHASE0 --output-prefix OUT
  --prefix-format nrrd`` (plastimatch's default rasterisation, which ORs the contours of a slice), Dice
  per phase-0 structure and the ITV for our combined file, our per-series phase-0 file and rt-utils' file;
* DS values longer than 16 characters (Eclipse rejects them) and file sizes.

    .venv/bin/python -m bench.rtstruct                     # full size: ~1.6 GB of masks, a few minutes
    .venv/bin/python -m bench.rtstruct --speed-only        # only the timing against the previous writer
    .venv/bin/python -m bench.rtstruct --size 256 --slices 60
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from models.metrics import dice as metric_dice
from models.phantom import Phantom, make_phantom
from models.phantom_spec import PhantomSpec
from models.structures import default_structures
from service.dicomio.output import Algorithm
from service.dicomio.phantom_dicom import write_phantom_dicom
from service.dicomio.rtstruct import (
    build_rtstructs,
    roi_name,
    write_rtstruct,
)
from service.dicomio.volume import Geometry, read_geometry
from tests.support import rtstruct_previous
from tests.support.rtstruct_peers import plastimatch_masks
from worker.engine_settings import EngineConfig, roi_styles

ROOT = Path(__file__).resolve().parents[1]

ROIS = ("External", "Lung_L", "Lung_R", "Heart", "GTVp")
NOW = datetime(2026, 1, 1, tzinfo=UTC)  # one timestamp: the two writers' files compare byte for byte


class OnePhase:
    """Phase ``index`` of a phantom as a one-phase PhantomLike, so that only it is written as CT."""

    def __init__(self, phantom: Phantom, index: int) -> None:
        self._p, self._i = phantom, index
        self.shape = (1, *phantom.shape[1:])
        self.spacing = phantom.spacing
        self.origin = phantom.origin
        self.phase_percents: tuple[float, ...] = (phantom.phase_percents[index],)

    def phase_hu(self, index: int) -> np.ndarray:
        return self._p.phase_hu(self._i)


def phase_geometries(g0: Geometry, n: int) -> list[Geometry]:
    out = [g0]
    for p in range(1, n):
        uid = generate_uid(entropy_srcs=[g0.series_instance_uid, str(p)])
        sops = tuple(generate_uid(entropy_srcs=[uid, str(k)]) for k in range(len(g0.positions)))
        out.append(dataclasses.replace(g0, series_instance_uid=uid, sop_instance_uids=sops))
    return out


def dice(a: np.ndarray, b: np.ndarray | None) -> float:
    """Dice against a mask plastimatch may not have produced (NaN then)."""
    return float("nan") if b is None else metric_dice(a, b)


def long_ds(paths: list[Path]) -> int:
    """ContourData values over 16 characters, as stored (raw bytes, not re-formatted by pydicom)."""
    import pydicom

    n = 0
    for path in paths:
        ds = pydicom.dcmread(path)
        for roi in ds.get("ROIContourSequence", []):
            for c in roi.get("ContourSequence", []):
                raw = c.get_item(0x30060050).value
                vals = raw.split(b"\\") if isinstance(raw, bytes) else [str(v).encode() for v in raw]
                n += sum(len(v.strip()) > 16 for v in vals)
    return n


def speed(common: dict, out: Path, repeat: int) -> None:
    """Combined layout, build + write, current vs previous writer alternating in this process."""
    writers = {"previous": rtstruct_previous, "current": sys.modules["service.dicomio.rtstruct"]}
    times: dict[str, list[float]] = {k: [] for k in writers}
    paths: dict[str, Path] = {}
    load0 = os.getloadavg()
    for run in range(repeat + 1):  # run 0 warms up (imports, first allocations): not counted
        for name in (list(writers) if run % 2 else list(writers)[::-1]):
            mod = writers[name]
            kw = dict(common, styles={k: mod.RoiStyle(v.color, v.interpreted_type)
                                      for k, v in common["styles"].items()},
                      algorithm=mod.Algorithm("SAM 3", "bench", "bench"), now=NOW)
            t = time.perf_counter()
            (ds,) = mod.build_rtstructs(layout="combined", **kw)
            paths[name] = mod.write_rtstruct(ds, out / name)
            dt = time.perf_counter() - t
            del ds
            if run:
                times[name].append(dt)
    load1 = os.getloadavg()
    n_rois = len(common["masks"]) * len(common["geometries"]) + len(common["envelopes"])
    print(f"\nspeed: combined RTSTRUCT ({n_rois} ROIs), build + write, {repeat} runs each, "
          f"load average {load0[0]:.2f} -> {load1[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'writer':<22} {'best s':>8} {'median s':>9} {'runs':>32}")
    for name, ts in times.items():
        print(f"{name:<22} {min(ts):>8.3f} {statistics.median(ts):>9.3f}   "
              + " ".join(f"{t:.3f}" for t in ts))
    ratio = statistics.median(times["previous"]) / statistics.median(times["current"])
    same = paths["previous"].read_bytes() == paths["current"].read_bytes()
    print(f"speed-up (median): {ratio:.1f}x; files byte-identical: {same}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phases", type=int, default=10)
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--size", type=int, default=512, help="rows = columns, 500 mm field of view")
    ap.add_argument("--no-rtutils", action="store_true")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of each writer (after one warm-up)")
    ap.add_argument(
        "--speed-only", action="store_true", help="only the timing against the previous writer"
    )
    ap.add_argument(
        "--keep", type=Path, help="write everything here and keep it (default: a temporary folder)"
    )
    args = ap.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_rtstruct_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        spec = PhantomSpec.sized(args.size, args.slices, n_phases=args.phases)
        print(
            f"phantom {args.phases} x {args.slices} x {args.size} x {args.size}, spacing "
            f"{spec.pixel_spacing[0]:.3f} x {spec.pixel_spacing[1]:.3f} x {spec.slice_thickness} mm",
            flush=True,
        )
        t = time.perf_counter()
        phantom = make_phantom(spec)
        masks = phantom.masks
        masks = {k: masks[k] for k in ROIS}
        itv = phantom.itv
        series = write_phantom_dicom(OnePhase(phantom, 0), work / "ct")
        ct0 = series.phases[0]
        g0 = read_geometry(ct0.files)
        geoms = phase_geometries(g0, args.phases)
        print(f"  generated + phase 0 written in {time.perf_counter() - t:.1f} s", flush=True)

        common = dict(
            study_key="bench",
            identifiers={"PatientName": "Bench^Phantom", "PatientID": "BENCH"},
            geometries=geoms,
            phase_percents=phantom.phase_percents,
            masks=masks,
            envelopes={"ITV": itv},
            styles=roi_styles(EngineConfig(structures=tuple(default_structures()))),
            algorithm=Algorithm("SAM 3", "bench", "bench"),
        )
        speed(common, work / "speed", args.repeat)
        if args.speed_only:
            return 0

        timings: dict[str, float] = {}
        files: dict[str, list[Path]] = {}
        for layout in ("combined", "per-series"):
            t = time.perf_counter()
            dss = build_rtstructs(layout=layout, **common)  # type: ignore[arg-type]
            files[layout] = [write_rtstruct(ds, work / layout) for ds in dss]
            timings[layout] = time.perf_counter() - t
            del dss
            print(f"  itvnode {layout}: {timings[layout]:.1f} s", flush=True)

        if not args.no_rtutils:
            from rt_utils import RTStructBuilder

            t = time.perf_counter()
            rs = RTStructBuilder.create_new(dicom_series_path=str(ct0.folder))
            for name in ROIS:
                for p, pct in enumerate(phantom.phase_percents):
                    rs.add_roi(mask=np.transpose(masks[name][p], (1, 2, 0)), name=roi_name(name, pct))
            rs.add_roi(mask=np.transpose(itv, (1, 2, 0)), name="ITV")
            out = work / "rtutils" / "rs.dcm"
            out.parent.mkdir(parents=True, exist_ok=True)
            rs.save(str(out))
            timings["rt-utils"] = time.perf_counter() - t
            files["rt-utils"] = [out]
            print(f"  rt-utils 1.2.7: {timings['rt-utils']:.1f} s", flush=True)

        print("\nbuild + write, 51 ROIs (5 structures x 10 phases + ITV)")
        print(f"{'writer':<22} {'files':>5} {'MB':>8} {'seconds':>8} {'DS>16ch':>8} {'vs rt-utils':>11}")
        for key, label in (
            ("combined", "itvnode combined"),
            ("per-series", "itvnode per-series"),
            ("rt-utils", "rt-utils 1.2.7"),
        ):
            if key not in files:
                continue
            mb = sum(p.stat().st_size for p in files[key]) / 1e6
            ratio = timings["rt-utils"] / timings[key] if "rt-utils" in timings else float("nan")
            print(
                f"{label:<22} {len(files[key]):>5} {mb:>8.1f} {timings[key]:>8.1f} {long_ds(files[key]):>8} "
                f"{ratio:>10.2f}x"
            )

        print(
            "\nround trip, plastimatch convert (default rasterisation) onto phase 0, Dice vs the source mask"
        )
        round_trip = {"itvnode combined": files["combined"][0], "itvnode per-series": files["per-series"][0]}
        if "rt-utils" in files:
            round_trip["rt-utils 1.2.7"] = files["rt-utils"][0]
        got = {
            k: plastimatch_masks(v, ct0.folder, work / "nrrd" / k.replace(" ", "_"))
            for k, v in round_trip.items()
        }
        print(f"{'ROI':<14} {'voxels':>9} " + " ".join(f"{k:>19}" for k in got))
        for name in [*ROIS, "ITV"]:
            want = itv if name == "ITV" else masks[name][0]
            key = "ITV" if name == "ITV" else roi_name(name, phantom.phase_percents[0])
            print(
                f"{key:<14} {int(want.sum()):>9} "
                + " ".join(f"{dice(want, g.get(key)):>19.4f}" for g in got.values())
            )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

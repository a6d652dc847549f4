"""``itvnode phantom OUT``: a synthetic breathing-thorax 4DCT (DICOM) with exact ground truth.

Writes ``OUT/dicom/<NN_series>/IMxxxx.dcm`` and ``OUT/ground_truth/ground_truth.{npz,json}``
(format: docs/phantom.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.phantom_spec import PhantomSpec
    from service.dicomio.phantom_dicom import PhantomSeries


_VENDORS = ("siemens", "philips", "enhanced", "siemens-amplitude", "ge", "canon")  # dicomio.phantom_dicom


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder (dicom/ and ground_truth/ are created in it)")
    parser.add_argument("--vendor", choices=list(_VENDORS), default="siemens",
                        help="how phases are labelled (default: siemens; siemens-amplitude: amplitude "
                             "binning, 0%% In .. 100%% In .. Ex, even --phases; table: docs/phases.md)")
    parser.add_argument("--size", choices=["small", "full"], default="full",
                        help="full: 10 x 120 x 512 x 512, 0.98 mm, 2.5 mm slices; small: 4 x 24 x 96 x 96")
    parser.add_argument("--phases", type=int, help="number of respiratory phases (default 10; small: 4)")
    parser.add_argument("--rows", type=int, help="rows = columns over a 500 mm field of view")
    parser.add_argument("--slices", type=int, help="number of slices")
    parser.add_argument("--slice-thickness", type=float, help="mm (default 2.5; small: 5)")
    parser.add_argument("--tumour-amplitude", type=float, help="tumour SI motion in mm (default 15)")
    parser.add_argument("--tumour-radius", type=float, help="tumour radius in mm (default 12)")
    parser.add_argument("--noise", type=float, help="Gaussian noise sigma in HU (default 20)")
    parser.add_argument("--arms", action="store_true", help="arms beside the torso")
    parser.add_argument("--avg", action="store_true", help="also write an AVG series")
    parser.add_argument("--mip", action="store_true", help="also write a MIP series")
    parser.add_argument("--extra-ct", nargs="?", const="other-for", choices=["other-for", "same-for"],
                        help="add a non-4D 'Thorax 3.0 B31f' series (default: its own frame of reference)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the noise and the lung vessel pattern (default 0)")
    parser.add_argument("--uid-seed", help="seed for all UIDs (default: derived from every option)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT/dicom and OUT/ground_truth when they already hold files")


def spec_from_args(args: argparse.Namespace) -> PhantomSpec:
    from models.phantom_spec import PhantomSpec

    over: dict[str, Any] = {"seed": args.seed}
    for attr, key in (("phases", "n_phases"), ("slice_thickness", "slice_thickness"),
                      ("tumour_amplitude", "tumour_amplitude_mm"), ("tumour_radius", "tumour_radius_mm"),
                      ("noise", "noise_hu")):
        value = getattr(args, attr, None)
        if value is not None:
            over[key] = value
    if args.arms:
        over["arms"] = True
    if getattr(args, "vendor", "") == "siemens-amplitude":
        over["sampling"] = "amplitude"
        if args.size == "small" and args.phases is None:
            over["n_phases"] = 4  # 0% In, 50% In, 100% In, 50% Ex
    base = PhantomSpec.small() if args.size == "small" else PhantomSpec.full()
    z, y, _ = base.shape
    if args.rows is not None or args.slices is not None:
        rows = args.rows if args.rows is not None else y
        slices = args.slices if args.slices is not None else z
        d = 500.0 / rows
        over.update(shape=(slices, rows, rows), pixel_spacing=(d, d))
    return PhantomSpec.small(**over) if args.size == "small" else PhantomSpec.full(**over)


def write_phantom(
    out: str | Path,
    spec: PhantomSpec,
    vendor: str = "siemens",
    with_avg: bool = False,
    with_mip: bool = False,
    with_extra_ct: bool | str = False,
    uid_seed: str | None = None,
) -> PhantomSeries:
    """Generate, write DICOM under ``out/dicom`` and the ground truth under ``out/ground_truth``.

    Each phase is generated once: the writer keeps its masks bit-packed for the ground truth.
    """
    from models.phantom import make_phantom
    from models.phantom_truth import save_ground_truth
    from service.dicomio.phantom_dicom import write_phantom_dicom

    out = Path(out)
    phantom = make_phantom(spec)
    series = write_phantom_dicom(phantom, out / "dicom", vendor=vendor, with_avg=with_avg, with_mip=with_mip,
                                 with_extra_ct=with_extra_ct, uid_seed=uid_seed)  # type: ignore[arg-type]
    save_ground_truth(phantom, out / "ground_truth")
    series.ground_truth_dir = out / "ground_truth"
    return series


def run(args: argparse.Namespace) -> int:
    try:
        spec = spec_from_args(args)
    except (ValueError, TypeError) as exc:
        print(f"itvnode phantom: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    existing = [d for d in (out / "dicom", out / "ground_truth") if d.is_dir() and any(d.iterdir())]
    if existing and not args.force:
        print(f"itvnode phantom: {existing[0]} is not empty (use --force to replace it)", file=sys.stderr)
        return 2
    for d in existing:
        shutil.rmtree(d)
    t0 = time.perf_counter()
    series = write_phantom(args.out, spec, vendor=args.vendor, with_avg=args.avg, with_mip=args.mip,
                           with_extra_ct=args.extra_ct or False, uid_seed=args.uid_seed)
    dt = time.perf_counter() - t0
    p, (z, y, x) = spec.n_phases, spec.shape
    extras = ", ".join(f"{s.kind} '{s.description}'" for s in series.series if s.kind != "phase") or "none"
    print(
        f"Wrote a synthetic {args.vendor} 4DCT to {series.root}: {p} phases "
        f"({', '.join(f'{s.percent:g}%' for s in series.phases)}) x {z} slices of {y}x{x} "
        f"({spec.pixel_spacing[1]:.3f} mm pixels, {spec.slice_thickness:g} mm slices), "
        f"{len(series.all_files())} files in {len(series.series)} series, extra series: {extras}; "
        f"StudyInstanceUID {series.study_instance_uid}, FrameOfReferenceUID {series.frame_of_reference_uid}. "
        f"Tumour radius {spec.tumour_radius_mm:g} mm moving {spec.tumour_amplitude_mm:g} mm SI "
        f"(0% = end-inhale, 50% = end-exhale). Ground truth (External, Lung_L, Lung_R, Heart, GTVp, ITV): "
        f"{Path(args.out) / 'ground_truth'} (format: docs/phantom.md). Took {dt:.1f} s."
    )
    return 0

"""What the post-processing buys: phantom ground truth + injected artifacts, Dice / HD95 before and after.

Artifacts injected into the SAM 3 structures (Lung_L, Lung_R, Heart, GTVp) of the breathing phantom:

* one-phase blobs inside the body (soft tissue, away from every structure) and outside it (air), per ROI;
* boundary noise: a fraction of the surface voxels removed and of the outer shell voxels added, every phase;
* isolated specks 2-4 voxels off the surface in random single phases;
* a dropped phase: the heart is missed completely in one phase.

External comes from the phantom's truth (the engine makes it with a HU threshold, no SAM 3 artifacts).
The table compares the raw masks, connectivity alone, and the full post-processing (temporal filter +
connectivity + holes), per ROI (mean / min Dice and mean / max HD95 over phases) and for the ITV; it then
checks that every injected artifact is gone and that nothing genuine was removed.

    .venv/bin/python -m bench.artifacts                    # 10 phases x 64 x 256 x 256 (about a minute)
    .venv/bin/python -m bench.artifacts --size full        # 10 x 150 x 512 x 512
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from models.engine import OutputStructure, output_structures, postprocess
from models.metrics import compare
from models.phantom import Phantom, make_phantom
from models.phantom_spec import PhantomSpec
from models.post.labels import bounding_box
from models.post.temporal import TemporalParams
from models.structures import default_structures
from service.settings import Settings, TemporalSettings
from worker.engine_settings import temporal_params

SAM_ROIS = ("Lung_L", "Lung_R", "Heart", "GTVp")
_CROSS = ndi.generate_binary_structure(3, 1)
_CUBE = np.ones((3, 3, 3), bool)


@dataclass
class Injected:
    masks: dict[str, np.ndarray]  # noisy masks per ROI (External untouched)
    artifacts: dict[str, np.ndarray]  # per ROI: voxels of the single-phase blobs and specks
    dropped: list[tuple[str, int]]
    counts: dict[str, int]  # artifact components injected per ROI


def phantom_spec(size: str, n_phases: int = 10, seed: int = 0, **tumour: float) -> PhantomSpec:
    """``tumour``: optional ``tumour_radius_mm`` / ``tumour_amplitude_mm`` (a small, fast tumour)."""
    if size == "full":
        return PhantomSpec.full(n_phases=n_phases, shape=(150, 512, 512), seed=seed, **tumour)
    if size == "medium":
        return PhantomSpec.sized(256, 64, slice_thickness=5.0, n_phases=n_phases, seed=seed, **tumour)
    return PhantomSpec.small(n_phases=n_phases, seed=seed, **tumour)


def _grow(box: tuple[slice, ...], shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n))
                 for s, n in zip(box, shape, strict=True))


def _ball(radius_vox: tuple[float, float, float]) -> np.ndarray:
    rz, ry, rx = (max(r, 0.5) for r in radius_vox)
    z, y, x = np.ogrid[-int(rz):int(rz) + 1, -int(ry):int(ry) + 1, -int(rx):int(rx) + 1]
    return (z / rz) ** 2 + (y / ry) ** 2 + (x / rx) ** 2 <= 1.0


def _place(target: np.ndarray, centre: np.ndarray, shape_mask: np.ndarray) -> None:
    lo = centre - np.asarray(shape_mask.shape) // 2
    sl_t, sl_s = [], []
    for a in range(3):
        a0, a1 = lo[a], lo[a] + shape_mask.shape[a]
        c0, c1 = max(a0, 0), min(a1, target.shape[a])
        sl_t.append(slice(c0, c1))
        sl_s.append(slice(c0 - a0, c1 - a0))
    target[tuple(sl_t)] |= shape_mask[tuple(sl_s)]


def inject_artifacts(gt: dict[str, np.ndarray], spacing: tuple[float, float, float], seed: int = 0,
                     noise: float = 0.15, specks_per_phase: int = 6, blob_mm: float = 5.0) -> Injected:
    """Noisy copies of the SAM 3 ROIs of ``gt`` with recorded single-phase artifacts (module docstring)."""
    rng = np.random.default_rng(seed)
    n_ph = gt["External"].shape[0]
    vol_shape = gt["External"].shape[1:]
    masks = {k: gt[k].copy() for k in SAM_ROIS}
    artifacts = {k: np.zeros(gt[k].shape, bool) for k in SAM_ROIS}
    counts = dict.fromkeys(SAM_ROIS, 0)
    anything = np.zeros(gt["External"].shape, bool)
    for k in SAM_ROIS:
        anything |= gt[k]
    speck = {k: (np.ones((2, 2, 2), bool) if k == "GTVp" else np.ones((1, 1, 1), bool)) for k in SAM_ROIS}
    for k in SAM_ROIS:
        box = bounding_box(gt[k])
        assert box is not None
        box = _grow(box, vol_shape, 6)
        for p in range(n_ph):
            m = masks[k][p][box]
            surf = m & ~ndi.binary_erosion(m, _CROSS)
            shell = ndi.binary_dilation(m, _CROSS) & ~m
            m &= ~(surf & (rng.random(m.shape) < noise))
            m |= shell & (rng.random(m.shape) < noise)
            # 2-4 voxels off this ROI's surface (inside another ROI is fine: a tumour prompt firing in lung)
            near = ndi.binary_dilation(gt[k][p][box], _CROSS, iterations=4)
            near &= ~ndi.binary_dilation(gt[k][p][box], _CUBE, iterations=2)
            cand = np.argwhere(near)
            if not len(cand):
                continue
            taken = ndi.binary_dilation(m, _CUBE, iterations=2)
            for c in cand[rng.choice(len(cand), size=min(specks_per_phase, len(cand)), replace=False)]:
                if taken[tuple(c)]:
                    continue
                art = np.zeros(m.shape, bool)
                _place(art, c, speck[k])
                art &= ~taken
                m |= art
                artifacts[k][p][box] |= art
                taken |= ndi.binary_dilation(art, _CUBE, iterations=2)
                counts[k] += 1
    # blobs: one inside the body, one outside, per ROI, each in one random phase (rejection sampling)
    r_vox = tuple(blob_mm / s for s in spacing)
    ball = _ball(r_vox)  # type: ignore[arg-type]
    half = np.asarray(ball.shape) // 2 + 3  # the blob and a 3-voxel clearance
    for k in SAM_ROIS:
        for inside in (True, False):
            p = int(rng.integers(n_ph))
            body = gt["External"][p]
            for _ in range(5000):
                c = np.array([rng.integers(h, n - h) for h, n in zip(half, vol_shape, strict=True)])
                win = tuple(slice(int(ci - h), int(ci + h + 1)) for ci, h in zip(c, half, strict=True))
                if anything[p][win].any():
                    continue
                if (inside and body[win].all()) or (not inside and not body[win].any()):
                    blob = np.zeros(vol_shape, bool)
                    _place(blob, c, ball)
                    masks[k][p] |= blob
                    artifacts[k][p] |= blob
                    counts[k] += 1
                    break
    drop = int(rng.integers(n_ph))
    masks["Heart"][drop] = False
    artifacts["Heart"][drop] = False
    return Injected(masks, artifacts, [("Heart", drop)], counts)


def _summary(masks: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float]) -> tuple[float, ...]:
    """Mean / min Dice over phases, mean / max HD95 over phases where the ROI was found, phases missed."""
    ds, hs, missed = [], [], 0
    for p in range(masks.shape[0]):
        if not truth[p].any():
            continue
        c = compare(masks[p], truth[p], spacing)
        ds.append(c["dice"])
        if masks[p].any():
            hs.append(c["hd95"])
        else:
            missed += 1
    return float(np.mean(ds)), float(np.min(ds)), float(np.mean(hs)), float(np.max(hs)), missed


def run(size: str, seed: int, workers: int, k: int, centroid_mm: float | None,
        tumour: dict[str, float]) -> int:
    t0 = time.perf_counter()
    ph: Phantom = make_phantom(phantom_spec(size, seed=seed, **tumour))
    gt = ph.masks
    sp = ph.spacing
    print(f"phantom {ph.shape} spacing {tuple(round(s, 3) for s in sp)} mm, built in "
          f"{time.perf_counter() - t0:.1f} s")
    inj = inject_artifacts(gt, sp, seed=seed)
    outputs: list[OutputStructure] = output_structures(default_structures())
    print("injected artifacts (components): " + ", ".join(f"{k} {v}" for k, v in inj.counts.items())
          + f"; dropped phase: {inj.dropped}")

    variants: dict[str, dict[str, np.ndarray]] = {"raw": {k: v.copy() for k, v in inj.masks.items()}}
    envs: dict[str, np.ndarray] = {"raw": np.asarray(inj.masks["GTVp"].any(axis=0))}
    times: dict[str, float] = {}
    links: dict[str, list[tuple[int, int, int]]] = {}
    product = temporal_params(TemporalSettings(temporal_min_phases=k, temporal_max_centroid_mm=centroid_mm))
    for name, temporal in (("connectivity", None), ("temporal+conn", product)):
        work = {k2: v.copy() for k2, v in inj.masks.items()}
        work["External"] = gt["External"].copy()
        t = time.perf_counter()
        if temporal is None:
            # connectivity alone: same rules, temporal filter switched off (min_phases=1 keeps everything)
            env, _ = postprocess(work, sp, outputs, TemporalParams(min_phases=1), workers)
        else:
            env, reps = postprocess(work, sp, outputs, temporal, workers, hu=ph.hu)  # with the CT
            links = {k: r.motion_links for k, r in reps.items() if r.motion_links}
        times[name] = time.perf_counter() - t
        variants[name] = work
        envs[name] = env["ITV"]

    cols = list(variants)
    print()
    head = ("ROI", "variant", "Dice mean", "Dice min", "HD95 mean", "HD95 max", "missed")
    print(f"{head[0]:8s} {head[1]:14s} {head[2]:>9s} {head[3]:>9s} {head[4]:>10s} {head[5]:>9s} "
          f"{head[6]:>6s}")
    for roi in SAM_ROIS:
        for v in cols:
            dm, dmin, hm, hmax, missed = _summary(variants[v][roi], gt[roi], sp)
            print(f"{roi:8s} {v:14s} {dm:9.4f} {dmin:9.4f} {hm:9.2f}mm {hmax:7.2f}mm {int(missed):6d}")
    itv = ph.itv
    for v in cols:
        c = compare(envs[v], itv, sp)
        print(f"{'ITV':8s} {v:14s} {c['dice']:9.4f} {'':9s} {c['hd95']:9.2f}mm")
    print("(HD95 over the phases where the ROI was found; 'missed': phases where it is empty, "
          "e.g. the dropped phase)")
    print()
    print(f"temporal filter: CT given, motion links {links or 'none'}")
    print("post-processing time: " + ", ".join(f"{n} {t:.2f} s" for n, t in times.items())
          + f" ({workers} worker threads)")

    ok = True
    final = variants["temporal+conn"]
    for roi in SAM_ROIS:
        left = int((final[roi] & inj.artifacts[roi]).sum())
        genuine = gt[roi] & inj.masks[roi]  # true voxels that reached the post-processing
        lost = int((genuine & ~final[roi]).sum())
        left_conn = int((variants["connectivity"][roi] & inj.artifacts[roi]).sum())
        print(f"{roi:8s} artifact voxels {int(inj.artifacts[roi].sum()):6d} -> left after connectivity alone "
              f"{left_conn:6d}, after temporal+conn {left:3d}; genuine voxels lost {lost}")
        ok &= left == 0 and lost == 0
    print("RESULT:", "every single-phase artifact removed, anatomy and tumour kept whole" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("small", "medium", "full"), default="medium")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    defaults = Settings.model_fields
    ap.add_argument("--k", type=int, default=defaults["temporal_min_phases"].default,
                    help="temporal min_phases (default: the product setting)")
    ap.add_argument("--centroid-mm", type=float, default=defaults["temporal_max_centroid_mm"].default,
                    help="temporal_max_centroid_mm (default: the product setting; 0: IoU only)")
    ap.add_argument("--tumour-radius", type=float, help="tumour radius, mm (default: the phantom's)")
    ap.add_argument("--tumour-amplitude", type=float, help="tumour SI motion, mm (default: the phantom's)")
    a = ap.parse_args()
    tumour = {k: v for k, v in (("tumour_radius_mm", a.tumour_radius),
                                ("tumour_amplitude_mm", a.tumour_amplitude)) if v is not None}
    return run(a.size, a.seed, a.workers, a.k, a.centroid_mm or None, tumour)


if __name__ == "__main__":
    sys.exit(main())

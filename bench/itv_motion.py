"""Does the temporal filter keep every position of a small fast tumour and remove one-phase false positives?

Per cell of a grid (tumour radius x SI amplitude x breathing shape x number of phases), a synthetic 4DCT and
its per-phase predicted tumour masks:

* CT: lung parenchyma (-800 HU, smooth texture and per-phase noise), random vessel-like blobs and tubes, the
  tumour (0 HU) at its true position in every phase; everything moves with a smooth breathing field that
  equals the tumour's motion at the tumour and fades with distance.
* Breathing: SI = A cos^2n(pi t - phi) (Lujan), n = 1, 2, 3 ("cos2", "cos4", "cos6"), or "hyst": cos^4 SI
  with AP and LR components out of step (a hysteresis loop); a random phase offset phi per cell, so the
  fastest steps fall between samples differently.
* Masks: the tumour sphere in every phase except one (the dropped phase: the phase with the largest motion;
  its CT still holds the tumour), plus one-phase false positives:
  - beside the path: one in EVERY phase, 5, 10 or 15 mm from the tumour's swept volume (its surface to the
    path), on alternating sides (the direction turns 230 degrees per phase), about the tumour's size, each
    sitting on a vessel-like blob of tumour-like HU, so the CT shows a feature there in every phase;
  - far: two, at least 25 mm from the path, also on blobs;
  - specks: single voxels and pairs, up to four per phase, clear of every other component.

Coverage counts the positions the input holds (the union of the tumour masks given); the dropped phase's
own position stays missing and QA reports it (`vanished_phases`). Variants, in the same run: OLD (IoU only),
CENTROID (IoU or centroids within 15 mm), NEW (defaults, with the CT). Goal: NEW keeps coverage >= 0.99 and
false-positive voxels kept <= 1 % in every cell.

    .venv/bin/python -m bench.itv_motion            # 4 radii x 4 amplitudes x 4 shapes x 8/10 phases
    .venv/bin/python -m bench.itv_motion --quick    # 8 cells (smoke test)
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from models.post.qa import structure_qa
from models.post.temporal import TemporalParams, temporal_filter

SHAPES = ("cos2", "cos4", "cos6", "hyst")
SPACING = (3.0, 1.2, 1.2)  # coarse slices: a 3 mm tumour spans two or three of them
GAPS_MM = (5.0, 10.0, 15.0)
VARIANTS = {
    "old": (TemporalParams(motion_mm=None), False),
    "centroid": (TemporalParams(motion_mm=None, max_centroid_mm=15.0), False),
    "new": (TemporalParams(), True),
}


@dataclass
class Case:
    hu: np.ndarray  # int16 (P, Z, Y, X)
    masks: np.ndarray  # bool (P, Z, Y, X): the predicted masks (tumour, minus the dropped phase, plus FPs)
    held: np.ndarray  # bool (Z, Y, X): union of the tumour positions the masks hold
    fp: np.ndarray  # bool (P, Z, Y, X): every injected false-positive voxel
    dropped: int
    spacing: tuple[float, float, float]


def trajectory(shape: str, amplitude: float, n_phases: int, offset: float) -> np.ndarray:
    """(P, 3) tumour displacement (SI, AP, LR) in mm per phase."""
    t = np.arange(n_phases) / n_phases + offset
    out = np.zeros((n_phases, 3))
    if shape == "hyst":
        out[:, 0] = amplitude * np.cos(np.pi * t) ** 4
        out[:, 1] = 0.25 * amplitude * np.cos(np.pi * t - 0.45) ** 2  # AP lags SI: a loop, not a line
        out[:, 2] = 0.15 * amplitude * np.cos(np.pi * t + 0.35) ** 2
    else:
        out[:, 0] = amplitude * np.cos(np.pi * t) ** {"cos2": 2, "cos4": 4, "cos6": 6}[shape]
    return out


def _sphere(grid: tuple[np.ndarray, ...], centre: np.ndarray, r: float) -> np.ndarray:
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return np.asarray(d2 <= r * r)


def _soft_sphere(grid: tuple[np.ndarray, ...], centre: np.ndarray, r: float, edge: float) -> np.ndarray:
    """0..1 occupancy with a linear edge of ``edge`` mm (partial volume)."""
    d = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    return np.asarray(np.clip((r - d) / edge + 0.5, 0.0, 1.0))


def make_case(radius: float, amplitude: float, shape: str, n_phases: int, seed: int = 0,
              spacing: tuple[float, float, float] = SPACING, gaps_mm: tuple[float, ...] = GAPS_MM,
              far: int = 2, specks: int = 4, drop: bool = True) -> Case:
    """One synthetic cell (module docstring); every position in mm, array axes (z, y, x) = (SI, AP, LR)."""
    rng = np.random.default_rng(seed)
    traj = trajectory(shape, amplitude, n_phases, float(rng.uniform(0, 1.0 / n_phases)))
    r_fp = max(3.0, radius * 0.9)
    lateral = radius + max(gaps_mm) + 2 * r_fp + 12.0
    lo = traj.min(axis=0) - np.array([radius + 14.0, lateral, lateral])
    hi = traj.max(axis=0) + np.array([radius + 14.0, lateral, lateral])
    dims = tuple(int(np.ceil((h - lo_) / s)) for lo_, h, s in zip(lo, hi, spacing, strict=True))
    grid = tuple(np.asarray(g) for g in np.meshgrid(*[lo[a] + (np.arange(dims[a]) + 0.5) * spacing[a]
                                                     for a in range(3)], indexing="ij", sparse=True))
    n_vox = int(np.prod(dims))
    edge = float(min(spacing))
    mid = traj.mean(axis=0)

    def weight(pos: np.ndarray) -> float:  # the breathing field: 1 at the tumour, fading with distance
        return float(np.exp(-np.sum((pos - mid) ** 2) / (2 * 60.0**2)))

    # the tumour's truth per phase, and its swept volume
    tumour = np.zeros((n_phases, *dims), bool)
    for p in range(n_phases):
        tumour[p] = _sphere(grid, traj[p], radius)
    swept = tumour.any(axis=0)
    dist_out = ndi.distance_transform_edt(~swept, sampling=spacing)
    steps = np.linalg.norm(np.diff(np.vstack([traj[-1:], traj, traj[:1]]), axis=0), axis=1)
    dropped = int(np.argmax(steps[:-1] + steps[1:])) if drop else -1

    # false positives (masks) and the CT blobs they sit on (reference positions, moved by the field)
    fp = np.zeros_like(tumour)
    blobs: list[tuple[np.ndarray, float, float]] = []  # (reference centre, radius, HU)

    def add_fp(p: int, centre: np.ndarray, r: float) -> None:
        fp[p] |= _sphere(grid, centre, r)
        blobs.append((centre - weight(centre) * traj[p], r, float(rng.uniform(-60, 20))))

    turn = float(rng.uniform(0, 2 * np.pi))
    for p in range(n_phases):
        ang = turn + np.deg2rad(230.0) * p
        u = np.array([0.0, np.cos(ang), np.sin(ang)])
        gap = gaps_mm[p % len(gaps_mm)]
        s = radius + gap + r_fp
        for _ in range(80):  # push outwards until the whole blob is `gap` from the swept volume
            c = traj[p] + u * s
            inside = _sphere(grid, c, r_fp)
            if inside.any() and float(dist_out[inside].min()) >= gap:
                break
            s += 0.5
        add_fp(p, c, r_fp)
    placed = 0
    for _ in range(2000):
        if placed >= far:
            break
        c = np.array([rng.uniform(lo[a] + r_fp + 6, hi[a] - r_fp - 6) for a in range(3)])
        inside = _sphere(grid, c, r_fp)
        if inside.any() and float(dist_out[inside].min()) >= 25.0:
            add_fp(int(rng.integers(n_phases)), c, r_fp)
            placed += 1
    for p in range(n_phases):  # specks clear of everything else (touching, they would be part of it)
        clear = ~ndi.binary_dilation(tumour[p] | fp[p], np.ones((3, 3, 3), bool), iterations=2)
        for _ in range(specks):
            z, y, x = (int(rng.integers(0, d - 1)) for d in dims)
            if clear[z, y, x] and clear[z, y, x + 1]:
                fp[p, z, y, x] = True
                fp[p, z, y, x + 1] = rng.random() < 0.5
    fp &= ~tumour  # a false positive is only what is not tumour

    # the CT: static texture + vessels, moved by the field, plus per-phase noise and the tumour
    texture = ndi.gaussian_filter(rng.normal(0, 1, dims), sigma=1.2) * 120.0
    vessels = [(np.array([rng.uniform(lo[a], hi[a]) for a in range(3)]), float(rng.uniform(1.0, 3.0)),
                float(rng.uniform(-250, 0))) for _ in range(max(8, n_vox // 20000))]
    tubes = [(np.array([rng.uniform(lo[a], hi[a]) for a in range(3)]), rng.normal(size=3),
              float(rng.uniform(0.8, 1.8))) for _ in range(6)]
    coords = np.stack(np.meshgrid(*[np.arange(d, dtype=np.float32) for d in dims], indexing="ij"))
    w_field = np.exp(-sum((g - m) ** 2 for g, m in zip(grid, mid, strict=True)) / (2 * 60.0**2))
    hu = np.zeros((n_phases, *dims), np.int16)
    for p in range(n_phases):
        disp = [w_field * traj[p][a] / spacing[a] for a in range(3)]
        moved = ndi.map_coordinates(texture, [coords[a] - disp[a] for a in range(3)], order=1, mode="nearest")
        img = -800.0 + moved + rng.normal(0, 20.0, dims)
        for c, r, h in vessels + blobs:
            occ = _soft_sphere(grid, c + weight(c) * traj[p], r, edge)
            img += occ * (h + 800.0)
        for c, direction, r in tubes:
            d = direction / np.linalg.norm(direction)
            rel = [g - (ci + weight(c) * traj[p][a]) for a, (g, ci) in enumerate(zip(grid, c, strict=True))]
            along = sum(rv * dv for rv, dv in zip(rel, d, strict=True))
            perp = np.sqrt(np.maximum(sum(rv * rv for rv in rel) - along * along, 0.0))
            img += np.clip((r - perp) / edge + 0.5, 0.0, 1.0) * 600.0
        occ = _soft_sphere(grid, traj[p], radius, edge)
        img = img * (1 - occ) + occ * (rng.normal(0, 20.0, dims) + 0.0)
        hu[p] = np.clip(img, -1024, 3000).astype(np.int16)

    masks = tumour.copy()
    if dropped >= 0:
        masks[dropped] = False
    held = masks.any(axis=0)
    return Case(hu, masks | fp, held, fp, dropped, spacing)


def score(case: Case, out: np.ndarray) -> tuple[float, float, bool]:
    """(ITV coverage of the held positions, share of false-positive voxels kept, dropped phase reported)."""
    itv = out.any(axis=0)
    coverage = float((itv & case.held).sum() / max(int(case.held.sum()), 1))
    fp_kept = float((out & case.fp).sum() / max(int(case.fp.sum()), 1))
    vanished = case.dropped < 0 or case.dropped in structure_qa(out, case.spacing)["vanished_phases"]
    return coverage, fp_kept, vanished


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 cells: radius 3/15, amplitude 5/35, cos6/hyst")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    if a.quick:
        grid = list(itertools.product((3.0, 15.0), (5.0, 35.0), ("cos6", "hyst"), (8,)))
    else:
        grid = list(itertools.product((3.0, 5.0, 8.0, 15.0), (5.0, 15.0, 25.0, 35.0), SHAPES, (8, 10)))
    worst = {v: [1.0, 0.0] for v in VARIANTS}
    secs = dict.fromkeys(VARIANTS, 0.0)
    fails = 0
    not_reported = 0
    t_build = 0.0
    print(f"spacing {SPACING} mm; {len(grid)} cells; goal for NEW: coverage >= 0.99, FP kept <= 1 %")
    print(f"{'r mm':>5s} {'A mm':>5s} {'shape':>5s} {'P':>3s} | " + " | ".join(
        f"{v:>8s} cov  fp%" for v in VARIANTS) + " | motion links")
    for i, (r, amp, shape, n_ph) in enumerate(grid):
        t = time.perf_counter()
        case = make_case(r, amp, shape, n_ph, seed=a.seed * 1000 + i)
        t_build += time.perf_counter() - t
        row = []
        links = 0
        for v, (params, with_ct) in VARIANTS.items():
            t = time.perf_counter()
            out, rep = temporal_filter(case.masks, params, case.spacing, a.workers,
                                       hu=case.hu if with_ct else None)
            secs[v] += time.perf_counter() - t
            cov, kept, reported = score(case, out)
            worst[v][0] = min(worst[v][0], cov)
            worst[v][1] = max(worst[v][1], kept)
            row.append(f"{cov:12.3f} {100 * kept:5.1f}")
            if v == "new":
                links = sum(n for _, _, n in rep.motion_links)
                fails += int(cov < 0.99 or kept > 0.01)
                not_reported += int(not reported)
        flag = "" if (cov >= 0.99 and kept <= 0.01) else "  <- goal missed"
        print(f"{r:5.0f} {amp:5.0f} {shape:>5s} {n_ph:3d} | " + " | ".join(row) + f" | {links:3d}{flag}")
    print()
    print(f"{'variant':10s} {'worst coverage':>15s} {'worst FP kept':>14s} {'filter time':>12s}")
    for v in VARIANTS:
        print(f"{v:10s} {worst[v][0]:15.3f} {100 * worst[v][1]:13.1f}% {secs[v]:11.2f}s")
    print(f"scene generation {t_build:.1f} s; dropped phase reported as vanished by QA in "
          f"{len(grid) - not_reported}/{len(grid)} cells (NEW)")
    print(f"RESULT: NEW meets the goal in {len(grid) - fails}/{len(grid)} cells")
    return 0 if fails == 0 and not_reported == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

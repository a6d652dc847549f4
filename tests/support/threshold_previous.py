"""The body threshold as it was before the bounding-box rewrite (commit 96580ce), kept verbatim as the reference.

tests/unit/test_threshold_previous.py checks that models.threshold.threshold_body gives exactly this;
bench/threshold.py times both in one run.
"""

# ruff: noqa
# mypy: ignore-errors

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

_CONN6 = ndimage.generate_binary_structure(3, 1)
_PLANE4 = np.zeros((3, 3, 3), dtype=bool)  # 4-connectivity within an axial slice, none across slices
_PLANE4[1] = ndimage.generate_binary_structure(2, 1)

def _per_phase(hu: np.ndarray) -> tuple[np.ndarray, bool]:
    arr = np.asarray(hu)
    if arr.ndim == 3:
        return arr[None], False
    if arr.ndim == 4:
        return arr, True
    raise ValueError(f"expected (Z, Y, X) or (P, Z, Y, X) HU, got shape {arr.shape}")


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive values (dz, dy, dx) in mm, got {tuple(spacing)}")
    return float(spacing[0]), float(spacing[1]), float(spacing[2])


def _disk(radius_mm: float, dy: float, dx: float) -> np.ndarray | None:
    """In-plane elliptical footprint (1, h, w) of ``radius_mm``; ``None`` when it would be a single pixel."""
    ry, rx = int(radius_mm / dy), int(radius_mm / dx)
    if ry < 1 and rx < 1:
        return None
    yy, xx = np.mgrid[-ry : ry + 1, -rx : rx + 1]
    disk = ((yy * dy) ** 2 + (xx * dx) ** 2) <= radius_mm**2 + 1e-6
    return disk[None]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes per axial slice (4-connected background not reaching the slice border).

    One labelling pass over the volume instead of a fill per slice; a cavity enclosed in 3D is enclosed on
    each of its slices too, so this also fills every 3D hole.
    """
    background, n = ndimage.label(~mask, structure=_PLANE4)
    outside = np.zeros(n + 1, dtype=bool)
    for edge in (background[:, 0, :], background[:, -1, :], background[:, :, 0], background[:, :, -1]):
        outside[np.unique(edge)] = True
    outside[0] = True  # label 0 is the foreground itself
    return np.asarray(mask | ~outside[background], dtype=bool)


def _is_couch(comp: np.ndarray, dy: float, dx: float, max_thickness_mm: float, min_width_mm: float) -> bool:
    """A couch/table top is a slab: wide left-right, thin front-back on every slice it occupies."""
    zs = np.flatnonzero(comp.any(axis=(1, 2)))
    thick, wide = [], []
    for k in zs:
        sl = comp[k]
        cols = np.flatnonzero(sl.any(axis=0))
        width = (cols[-1] - cols[0] + 1) * dx
        thick.append(sl.sum() * dy * dx / width)  # mean AP thickness across its width
        wide.append(width)
    return bool(np.median(thick) < max_thickness_mm and np.median(wide) >= min_width_mm)


def _body_one(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    hu_range: tuple[float, float],
    min_part_cc: float,
    min_part_fraction: float,
    bridge_mm: float,
    couch_thickness_mm: float,
    couch_min_width_mm: float,
) -> np.ndarray:
    dz, dy, dx = spacing
    lo, hi = hu_range
    raw = (hu >= lo) & (hu <= hi)
    if not raw.any():
        return raw
    foot = _disk(bridge_mm, dy, dx) if bridge_mm > 0 else None
    core = ndimage.binary_opening(raw, structure=foot) if foot is not None else raw
    labels, n = ndimage.label(core, structure=_CONN6)
    if n == 0:
        return np.zeros_like(raw)
    voxel_cc = dz * dy * dx / 1000.0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * voxel_cc
    objects = ndimage.find_objects(labels)
    floor = max(min_part_cc, min_part_fraction * float(sizes.max()))
    keep = np.zeros(n + 1, dtype=bool)
    couches = 0
    for i, (size, sl) in enumerate(zip(sizes, objects, strict=True), start=1):
        if size < floor or sl is None:
            continue
        if couch_thickness_mm > 0 and _is_couch(
            labels[sl] == i, dy, dx, couch_thickness_mm, couch_min_width_mm
        ):
            couches += 1
            continue
        keep[i] = True
    if couches:
        pass
    kept = keep[labels]
    if foot is not None:  # give back the boundary the opening shaved off, but not what it cut loose
        kept = raw & ndimage.binary_dilation(kept, structure=foot)
    return fill_holes(kept)


def threshold_body(
    hu: np.ndarray,
    spacing: Sequence[float],
    hu_range: tuple[float, float] = (-350.0, 3000.0),
    *,
    min_part_cc: float = 5.0,
    min_part_fraction: float = 0.005,
    bridge_mm: float = 0.0,
    couch_thickness_mm: float = 20.0,
    couch_min_width_mm: float = 150.0,
) -> np.ndarray:
    """Body outline: bool mask of the same shape as ``hu`` ((Z, Y, X) or (P, Z, Y, X), per phase).

    ``couch_thickness_mm=0`` disables couch removal; ``bridge_mm=0`` disables the opening.
    """
    phases, is4d = _per_phase(hu)
    sp = _check_spacing(spacing)
    lo, hi = float(hu_range[0]), float(hu_range[1])
    if not lo < hi:
        raise ValueError(f"hu_range {hu_range} must be (low, high) with low < high")
    out = np.stack(
        [
            _body_one(
                p,
                sp,
                (lo, hi),
                min_part_cc,
                min_part_fraction,
                bridge_mm,
                couch_thickness_mm,
                couch_min_width_mm,
            )
            for p in phases
        ]
    )
    return out if is4d else out[0]



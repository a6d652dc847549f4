"""Overlap and surface-distance metrics between two 3D masks, with one pinned definition.

* Dice = 2 |A & B| / (|A| + |B|).
* Surface voxels of a mask = mask XOR (mask eroded with the 6-neighbour cross); voxels on the array
  border count as surface (erosion with a background border).
* Directed distances A -> B: for every surface voxel of A, the Euclidean distance in mm
  (``sampling=spacing``) to the nearest surface voxel of B (``scipy.ndimage.distance_transform_edt`` of
  B's surface complement).
* HD95 = max(95th percentile of A -> B, 95th percentile of B -> A) (DeepMind surface-distance definition,
  ``compute_robust_hausdorff(.., 95)`` on voxel surfaces; percentiles by numpy's linear interpolation).
* MSD (mean surface distance, symmetric) = mean of the pooled distances A -> B and B -> A
  = (sum(A -> B) + sum(B -> A)) / (|surface A| + |surface B|).

Empty masks have a defined answer: both empty -> Dice 1, HD95 0, MSD 0 (perfect agreement on absence);
exactly one empty -> Dice 0, HD95 inf, MSD inf (no surface to measure against; ``inf`` rather than NaN so
that worst-case aggregation such as ``max`` stays meaningful and NaN keeps meaning "not computed").

Spacing is always explicit and in mm, ordered like the array axes ``(dz, dy, dx)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

_CROSS = ndi.generate_binary_structure(3, 1)


def _check(a: np.ndarray, b: np.ndarray,
           spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    if spacing is not None:
        if len(spacing) != a.ndim:
            raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for {a.ndim}-D masks")
        if any(not float(s) > 0 for s in spacing):
            raise ValueError(f"spacing {tuple(spacing)} must be positive")
    return a, b


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient; 1.0 when both masks are empty."""
    a, b = _check(a, b)
    na, nb = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    if na + nb == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / (na + nb)


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = _CROSS if mask.ndim == 3 else ndi.generate_binary_structure(mask.ndim, 1)
    eroded = ndi.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def _crop(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their joint bounding box grown by one voxel (clipped at the array edge).

    The margin keeps erosion identical to the uncropped one (voxels on the real array border stay surface),
    and every surface voxel lies inside the crop, so the distance transform is exact.
    """
    union = a | b
    box = []
    for axis in range(a.ndim):
        other = tuple(i for i in range(a.ndim) if i != axis)
        idx = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, a.shape[axis])))
    t = tuple(box)
    return a[t], b[t]


def surface_distances(a: np.ndarray, b: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (A -> B per surface voxel of A, B -> A); both masks non-empty."""
    a, b = _check(a, b, spacing)
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    a, b = _crop(a, b)
    sa, sb = _surface(a), _surface(b)
    sampling = tuple(float(s) for s in spacing)
    dist_to_b = ndi.distance_transform_edt(~sb, sampling=sampling)
    dist_to_a = ndi.distance_transform_edt(~sa, sampling=sampling)
    return np.asarray(dist_to_b[sa]), np.asarray(dist_to_a[sb])


def _empty_case(a: np.ndarray, b: np.ndarray) -> float | None:
    ea, eb = not a.any(), not b.any()
    if ea and eb:
        return 0.0
    if ea or eb:
        return float("inf")
    return None


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (module docstring)."""
    a, b = _check(a, b, spacing)
    special = _empty_case(a, b)
    if special is not None:
        return special
    d_ab, d_ba = surface_distances(a, b, spacing)
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def hausdorff(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """Maximum symmetric surface distance in mm (HD100), same conventions as :func:`hd95`."""
    a, b = _check(a, b, spacing)
    special = _empty_case(a, b)
    if special is not None:
        return special
    d_ab, d_ba = surface_distances(a, b, spacing)
    return float(max(d_ab.max(), d_ba.max()))


def msd(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric mean surface distance in mm: mean of the pooled directed distances (module docstring)."""
    a, b = _check(a, b, spacing)
    special = _empty_case(a, b)
    if special is not None:
        return special
    d_ab, d_ba = surface_distances(a, b, spacing)
    return float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size))


def compare(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice, HD95 and MSD in one pass over the surfaces (JSON-ready except for inf)."""
    a, b = _check(a, b, spacing)
    special = _empty_case(a, b)
    if special is not None:
        return {"dice": dice(a, b), "hd95": special, "msd": special}
    d_ab, d_ba = surface_distances(a, b, spacing)
    return {
        "dice": dice(a, b),
        "hd95": float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))),
        "msd": float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size)),
    }

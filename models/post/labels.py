"""Per-phase 3D connected components and their overlaps, the raw material of the phase-coherence rule
(models/post/temporal.py): bounding boxes, labelling (uint16 when the labels fit), label sizes, overlapping
label pairs of two phases, and :func:`thread_map` (``scipy.ndimage.label`` releases the GIL)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from scipy import ndimage as ndi

T = TypeVar("T")
R = TypeVar("R")

_MAX_DENSE_PAIRS = 1 << 20  # above this many (label_a, label_b) bins (and 2x the voxels), use np.unique


def thread_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``map`` over a thread pool (numpy / ndimage release the GIL); in order; serial when workers <= 1."""
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _any_rows(arr2d: np.ndarray) -> np.ndarray:
    """``arr2d.any(axis=1)`` for a C-contiguous bool (N, M) array, 8 voxels at a time when M allows."""
    if arr2d.shape[1] % 8 == 0 and arr2d.flags.c_contiguous:
        return np.asarray(arr2d.view(np.uint64).any(axis=1))
    return np.asarray(arr2d.any(axis=1))


def _or_planes(vol: np.ndarray) -> np.ndarray:
    """OR of the (Y, X) planes of a bool (Z, Y, X) array, 8 voxels at a time when the layout allows."""
    nz, ny, nx = vol.shape
    if nz == 0:
        return np.zeros((ny, nx), bool)
    if (ny * nx) % 8 == 0 and vol.flags.c_contiguous:
        packed = np.bitwise_or.reduce(vol.reshape(nz, -1).view(np.uint64), axis=0)
        return np.asarray(packed.view(np.bool_).reshape(ny, nx))
    return np.asarray(vol.any(axis=0))


def bounding_box(masks: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box (z, y, x slices) of a (Z, Y, X) mask or of a (P, Z, Y, X) stack's union; None if empty.

    One pass finds the occupied slices of each phase; the in-plane extent is reduced over those slices only,
    so a small structure costs little more than reading the volume once.
    """
    vols = masks.reshape((-1,) + masks.shape[-3:])
    nz, ny, nx = vols.shape[1:]
    plane = np.zeros((ny, nx), dtype=bool)
    z_lo, z_hi = nz, -1
    for vol in vols:
        iz = np.flatnonzero(_any_rows(vol.reshape(nz, -1)))
        if iz.size == 0:
            continue
        z0, z1 = int(iz[0]), int(iz[-1]) + 1
        z_lo, z_hi = min(z_lo, z0), max(z_hi, z1)
        plane |= _or_planes(vol[z0:z1])
    if z_hi < 0:
        return None
    iy = np.flatnonzero(plane.any(axis=1))
    ix = np.flatnonzero(plane.any(axis=0))
    return (slice(z_lo, z_hi), slice(int(iy[0]), int(iy[-1]) + 1), slice(int(ix[0]), int(ix[-1]) + 1))


def label_components(mask: np.ndarray, connectivity: int = 3,
                     structure: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """3D connected components; uint16 labels when they fit (half the memory traffic), else int32.

    ``structure`` (optional) overrides ``connectivity`` with an explicit neighbourhood.
    """
    if structure is None:
        structure = ndi.generate_binary_structure(3, connectivity)
    out16 = np.empty(mask.shape, dtype=np.uint16)
    try:
        n = int(ndi.label(mask, structure=structure, output=out16))
        return out16, n
    except RuntimeError:  # more than 65535 components
        out32 = np.empty(mask.shape, dtype=np.int32)
        n = int(ndi.label(mask, structure=structure, output=out32))
        return out32, n


def label_counts(labels: np.ndarray, n: int, chunk: int = 1 << 18) -> np.ndarray:
    """Voxels per label 0..n (int64), by bincount over cache-sized chunks (no full-size intp temporary)."""
    flat = labels.reshape(-1)
    out = np.zeros(n + 1, dtype=np.int64)
    for i in range(0, flat.size, chunk):
        out += np.bincount(flat[i:i + chunk], minlength=n + 1)
    return out


@dataclass
class PhaseLabels:
    """Per-phase 3D components of one structure, each phase labelled inside its own bounding box."""

    boxes: list[tuple[slice, ...] | None]  # per phase; None: empty phase
    labels: list[np.ndarray]  # per phase, shape of its box (empty array for an empty phase)
    counts: list[int]  # components per phase
    sizes: list[np.ndarray]  # per phase, voxels per label (index 0 = background)
    shape: tuple[int, ...]  # full (P, Z, Y, X)

    @property
    def n_phases(self) -> int:
        return self.shape[0]

    @property
    def empty(self) -> bool:
        return all(b is None for b in self.boxes)

    def keep_all(self) -> list[np.ndarray]:
        """A keep table per phase (index = label) with every component kept."""
        out = []
        for n in self.counts:
            keep = np.ones(n + 1, dtype=bool)
            keep[0] = False
            out.append(keep)
        return out


def label_phases(masks: np.ndarray, connectivity: int = 3, workers: int = 2) -> PhaseLabels:
    """Label every phase of ``masks`` (P, Z, Y, X) inside its own bounding box."""
    if masks.ndim != 4:
        raise ValueError(f"masks must be (phases, z, y, x), got shape {masks.shape}")

    def one(p: int) -> tuple[tuple[slice, ...] | None, np.ndarray, int, np.ndarray]:
        box = bounding_box(masks[p])
        if box is None:
            return None, np.zeros((0, 0, 0), np.uint16), 0, np.zeros(1, np.int64)
        lab, n = label_components(masks[p][box], connectivity)
        return box, lab, n, label_counts(lab, n)

    res = thread_map(one, list(range(masks.shape[0])), workers)
    return PhaseLabels([r[0] for r in res], [r[1] for r in res], [r[2] for r in res], [r[3] for r in res],
                       tuple(masks.shape))


def pair_overlaps(la: np.ndarray, na: int, lb: np.ndarray,
                  nb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlapping label pairs of two label arrays of one shape: (label_a, label_b, voxels), labels >= 1.

    Only voxels set in both are gathered; their pair codes are counted with bincount when the code range is
    small, else with np.unique.
    """
    e = np.zeros(0, dtype=np.int64)
    if na == 0 or nb == 0:
        return e, e, e
    both = la != 0
    both &= lb != 0
    ia = la[both].astype(np.int64)
    if ia.size == 0:
        return e, e, e
    code = ia * (nb + 1)
    code += lb[both]
    m = (na + 1) * (nb + 1)
    if m <= max(_MAX_DENSE_PAIRS, 2 * code.size):
        counts = np.bincount(code, minlength=m)
        nz = np.flatnonzero(counts)
        return nz // (nb + 1), nz % (nb + 1), counts[nz]
    uniq, cnt = np.unique(code, return_counts=True)
    return uniq // (nb + 1), uniq % (nb + 1), cnt.astype(np.int64)

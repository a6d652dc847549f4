"""Local rigid displacement of a small region between two CT phases, by normalised cross-correlation (NCC).

Used by the temporal filter (models/post/temporal.py) to follow a component that moved too far to overlap its
position in a neighbouring phase. The CT of phase ``p`` around the component's box (plus a margin, so the
template holds texture: the tumour's edge, vessels) is searched for in phase ``q``'s CT within a motion
bound. Both are block-averaged onto a grid of about ``GRID_MM`` first: small tumours still span several
cells, and the search costs a fraction of full resolution. The answer is accurate to about half a cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft

GRID_MM = 2.0  # block-average the CT to cells of about this size before correlating
_FLAT = 1e-3  # a window whose HU variance is below this (HU^2 per voxel) carries no texture


@dataclass(frozen=True)
class Shift:
    """Displacement in voxels (z, y, x) from phase p to phase q, and the NCC at its peak (-1 .. 1)."""

    voxels: tuple[int, int, int]
    score: float


def grid_factors(spacing: Sequence[float]) -> tuple[int, int, int]:
    """Per-axis block size so that a cell is about ``GRID_MM`` (1 where voxels are already that coarse)."""
    f = [max(1, int(round(GRID_MM / float(s)))) for s in spacing]
    return f[0], f[1], f[2]


def _aligned(lo: int, hi: int, n: int, f: int) -> tuple[int, int]:
    """[lo, hi) clipped to [0, n), start floored to a multiple of f, length cut to a multiple of f."""
    lo = max(lo, 0) // f * f
    hi = min(hi, n)
    hi = lo + max((hi - lo) // f, 0) * f
    return lo, hi


def _coarse(vol: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    a = np.asarray(vol, dtype=np.float32)
    if f == (1, 1, 1):
        return a
    z, y, x = (s // k for s, k in zip(a.shape, f, strict=True))
    return a.reshape(z, f[0], y, f[1], x, f[2]).mean(axis=(1, 3, 5), dtype=np.float32)


def _box_sum(a: np.ndarray, w: tuple[int, ...]) -> np.ndarray:
    """Sums of ``a`` over every window of shape ``w`` fully inside it (the 'valid' positions)."""
    c = np.pad(a.astype(np.float64), [(1, 0)] * 3).cumsum(0).cumsum(1).cumsum(2)
    dz, dy, dx = w
    return (c[dz:, dy:, dx:] - c[:-dz, dy:, dx:] - c[dz:, :-dy, dx:] - c[dz:, dy:, :-dx]
            + c[:-dz, :-dy, dx:] + c[:-dz, dy:, :-dx] + c[dz:, :-dy, :-dx] - c[:-dz, :-dy, :-dx])


def ncc_valid(search: np.ndarray, template: np.ndarray) -> np.ndarray:
    """NCC of ``template`` at every position fully inside ``search`` (3D; FFT for the cross term)."""
    t = template.astype(np.float64) - float(template.mean())
    t_norm = float(np.sqrt((t * t).sum()))
    out_shape = tuple(s - k + 1 for s, k in zip(search.shape, t.shape, strict=True))
    if t_norm == 0.0 or min(out_shape) < 1:
        return np.zeros(tuple(max(s, 0) for s in out_shape), dtype=np.float64)
    s = search.astype(np.float64)
    size = [sfft.next_fast_len(n, real=True) for n in s.shape]
    spec = sfft.rfftn(s, size) * np.conj(sfft.rfftn(t, size))
    cross = sfft.irfftn(spec, size)[tuple(slice(0, n) for n in out_shape)]
    n = t.size
    ssum = _box_sum(s, t.shape)
    var = _box_sum(s * s, t.shape) - ssum * ssum / n
    ok = var > _FLAT * n
    out = np.zeros(out_shape, dtype=np.float64)
    out[ok] = cross[ok] / (t_norm * np.sqrt(var[ok]))
    return out


def estimate_shift(hu_p: np.ndarray, hu_q: np.ndarray, box: tuple[slice, ...], spacing: Sequence[float],
                   margin_mm: float, bound_mm: float) -> Shift | None:
    """Displacement of the CT around ``box`` (global voxel slices) from ``hu_p`` to ``hu_q`` (both (Z, Y, X)).

    Searches every displacement up to ``bound_mm`` per axis. None when the template has no texture or the
    search region cannot hold it (the volume's edge).
    """
    f = grid_factors(spacing)
    shape = hu_p.shape
    t_rng, s_rng = [], []
    for a in range(3):
        m = int(np.ceil(margin_mm / float(spacing[a])))
        b = int(np.ceil(bound_mm / float(spacing[a])))
        t_lo, t_hi = _aligned(box[a].start - m, box[a].stop + m, shape[a], f[a])
        s_lo, s_hi = _aligned(t_lo - b, t_hi + b, shape[a], f[a])
        if t_hi <= t_lo:
            return None
        t_rng.append((t_lo, t_hi))
        s_rng.append((s_lo, s_hi))
    template = _coarse(hu_p[tuple(slice(*r) for r in t_rng)], f)
    search = _coarse(hu_q[tuple(slice(*r) for r in s_rng)], f)
    score = ncc_valid(search, template)
    if score.size == 0 or not score.any():
        return None
    at = np.unravel_index(int(np.argmax(score)), score.shape)
    shift = tuple(int((s_rng[a][0] + at[a] * f[a]) - t_rng[a][0]) for a in range(3))
    return Shift((shift[0], shift[1], shift[2]), float(score[at]))

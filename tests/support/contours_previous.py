"""service/dicomio/contours.py as it was before the all-slices-at-once tracer (commit aa180ff), kept verbatim below this
header as the reference: tests/unit/test_contours_equal.py checks that the new tracer gives exactly these
contours; bench/rtstruct.py times both in one run.
"""

# ruff: noqa
# mypy: ignore-errors


from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Directions in (row, col) index space: E, S, W, N. A right turn (screen, row down) is d + 1.
_DR = np.array([0, 1, 0, -1], dtype=np.int64)
_DC = np.array([1, 0, -1, 0], dtype=np.int64)


@dataclass(frozen=True)
class PlanarContour:
    """One closed loop on one slice; ``points`` are (N, 3) patient coordinates in mm (LPS)."""

    slice_index: int
    points: np.ndarray
    is_hole: bool


def trace_loops(mask: np.ndarray, keyhole: bool = False) -> list[np.ndarray]:
    """Pixel-edge loops of a 2D boolean mask as (N, 2) float arrays of (row, col) index coordinates.

    Pixel (r, c) covers [r - 0.5, r + 0.5] x [c - 0.5, c + 0.5], so vertices have half-integer coordinates.
    Consecutive vertices differ along one axis only (collinear runs merged); the loop closes implicitly.
    ``keyhole=False``: holes are separate loops (even-odd/XOR). ``keyhole=True``: each hole is joined to the
    loop around it by a zero-width vertical channel on a pixel-edge line (DICOM PS3.3 C.8.8.6.3), so every
    loop is an outer boundary and receivers that OR the loops of a slice (plastimatch's default) see the hole.
    """
    m2 = np.asarray(mask, dtype=bool)
    if m2.ndim != 2:
        raise ValueError(f"trace_loops needs a 2D mask, got shape {m2.shape}")
    rows = np.flatnonzero(m2.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(m2.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    m = np.zeros((r1 - r0 + 2, c1 - c0 + 2), dtype=bool)
    m[1:-1, 1:-1] = m2[r0:r1, c0:c1]
    h, w = m.shape

    # Vertex (i, j) is the top-left corner of padded pixel (i, j). Edges keep the mask on their right.
    inner = m[1:-1, 1:-1]
    starts_r: list[np.ndarray] = []
    starts_c: list[np.ndarray] = []
    dirs: list[np.ndarray] = []
    for d, (nbr, dr0, dc0) in enumerate(
        (
            (m[:-2, 1:-1], 0, 0),  # top edge, going E from the top-left corner
            (m[1:-1, 2:], 0, 1),  # right edge, going S from the top-right corner
            (m[2:, 1:-1], 1, 1),  # bottom edge, going W from the bottom-right corner
            (m[1:-1, :-2], 1, 0),  # left edge, going N from the bottom-left corner
        )
    ):
        ii, jj = np.nonzero(inner & ~nbr)
        starts_r.append(ii + 1 + dr0)
        starts_c.append(jj + 1 + dc0)
        dirs.append(np.full(ii.size, d, dtype=np.int64))
    sr = np.concatenate(starts_r)
    sc = np.concatenate(starts_c)
    dd = np.concatenate(dirs)
    n = sr.size

    out = np.full((h + 1, w + 1, 4), -1, dtype=np.int32)
    out[sr, sc, dd] = np.arange(n)
    er, ec = sr + _DR[dd], sc + _DC[dd]
    # Prefer a right turn (hug the current pixel), then straight, then left: diagonal neighbours stay apart.
    right = out[er, ec, (dd + 1) % 4]
    straight = out[er, ec, dd]
    left = out[er, ec, (dd + 3) % 4]
    nxt = np.where(right >= 0, right, np.where(straight >= 0, straight, left))
    if (nxt < 0).any():  # pragma: no cover - impossible for a closed pixel boundary
        raise AssertionError("open boundary while tracing a mask")
    cycles = _cycles(nxt)
    if keyhole:
        holes = _holes(cycles, sr, sc, dd)
        if holes:
            sr, sc, dd, nxt = _join_holes(m, out, sr, sc, dd, nxt, holes)
            cycles = _cycles(nxt)
    return _walk(sr, sc, dd, nxt, cycles, r0 - 1.5, c0 - 1.5)


def _cycles(nxt: np.ndarray) -> list[list[int]]:
    nxt_l = nxt.tolist()
    seen = bytearray(len(nxt_l))
    cycles = []
    for e0 in range(len(nxt_l)):
        if seen[e0]:
            continue
        cyc = []
        e = e0
        while not seen[e]:
            seen[e] = 1
            cyc.append(e)
            e = nxt_l[e]
        cycles.append(cyc)
    return cycles


def _walk(
    sr: np.ndarray,
    sc: np.ndarray,
    dd: np.ndarray,
    nxt: np.ndarray,
    cycles: list[list[int]],
    dr: float,
    dc: float,
) -> list[np.ndarray]:
    """Vertices where the direction changes, loop by loop, shifted into index coordinates."""
    prev = np.empty(nxt.size, dtype=np.int64)
    prev[nxt] = np.arange(nxt.size)
    corner = dd != dd[prev]
    loops = []
    for cyc in cycles:
        ia = np.asarray(cyc, dtype=np.int64)
        ia = ia[corner[ia]]
        pts = np.empty((ia.size, 2), dtype=np.float64)
        pts[:, 0] = sr[ia] + dr
        pts[:, 1] = sc[ia] + dc
        loops.append(pts)
    return loops


def _holes(
    cycles: list[list[int]], sr: np.ndarray, sc: np.ndarray, dd: np.ndarray
) -> list[tuple[int, int, int]]:
    """(row, col, edge leaving it) of each hole's top-left vertex, top to bottom."""
    holes = []
    for cyc in cycles:
        ia = np.asarray(cyc, dtype=np.int64)
        k = ia[np.lexsort((sc[ia], sr[ia]))[0]]  # edge leaving the top-left vertex
        if dd[k] == 1:  # going S there: background below-right, i.e. a hole (an outer loop goes E)
            holes.append((int(sr[k]), int(sc[k]), int(k)))
    return sorted(holes)


def _join_holes(
    m: np.ndarray,
    out: np.ndarray,
    sr: np.ndarray,
    sc: np.ndarray,
    dd: np.ndarray,
    nxt: np.ndarray,
    holes: list[tuple[int, int, int]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Splice every hole into the loop above it through a vertical two-way channel.

    A hole's top-left vertex v = (r, c) has mask on both sides of the vertex line above it (background is
    8-connected, so a background pixel there would belong to the hole). Going up that line until a background
    pixel borders it finds vertex w on a loop of the same component: its outer loop, or a hole whose top is
    higher and that is therefore already joined. v and w are ordinary corners (degree 2), and no two channels
    share a vertex or a segment, so each splice rewires four successor links.
    """
    n = nxt.size
    prev = np.empty(n, dtype=np.int64)
    prev[nxt] = np.arange(n)
    nxt = np.concatenate([nxt, np.empty(2 * len(holes), dtype=np.int64)])
    new_r, new_c, new_d = [], [], []
    for i, (r, c, v_out) in enumerate(holes):
        k = r - 1
        while m[k - 1, c - 1] and m[k - 1, c]:
            k -= 1
        w_out = int(out[k, c].max())
        v_in, w_in = int(prev[v_out]), int(prev[w_out])
        down, up = n + 2 * i, n + 2 * i + 1
        nxt[w_in], nxt[down] = down, v_out
        nxt[v_in], nxt[up] = up, w_out
        new_r += [k, r]
        new_c += [c, c]
        new_d += [1, 3]
    return (
        np.concatenate([sr, new_r]).astype(np.int64),
        np.concatenate([sc, new_c]).astype(np.int64),
        np.concatenate([dd, new_d]).astype(np.int64),
        nxt,
    )


def signed_area(loop: np.ndarray) -> float:
    """Shoelace area in (row, col) index units; > 0 for outer loops (clockwise on screen), < 0 for holes."""
    r, c = loop[:, 0], loop[:, 1]
    return float(0.5 * (np.dot(c, np.roll(r, -1)) - np.dot(r, np.roll(c, -1))))


def mask_to_contours(
    mask: np.ndarray,
    slice_positions: Sequence[Sequence[float]] | np.ndarray,
    pixel_spacing: tuple[float, float],
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    keyhole: bool = True,
) -> list[PlanarContour]:
    """Contours of a (Z, Y, X) mask in patient mm.

    ``slice_positions``: ImagePositionPatient (x, y, z) of each slice's first pixel; ``pixel_spacing``:
    DICOM PixelSpacing (row spacing dy, column spacing dx); ``orientation``: ImageOrientationPatient;
    ``keyhole``: join holes to their outer loop (see :func:`trace_loops`) instead of separate hole loops.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"mask_to_contours needs a (Z, Y, X) mask, got shape {m.shape}")
    ipp = np.asarray(slice_positions, dtype=np.float64).reshape(-1, 3)
    if ipp.shape[0] != m.shape[0]:
        raise ValueError(f"{m.shape[0]} mask slices but {ipp.shape[0]} slice positions")
    iop = np.asarray(orientation, dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]  # direction of increasing column index, of increasing row index
    dy, dx = float(pixel_spacing[0]), float(pixel_spacing[1])
    out: list[PlanarContour] = []
    for z in np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1)):
        for loop in trace_loops(m[z], keyhole=keyhole):
            pts = ipp[z] + np.outer(loop[:, 1] * dx, row_cos) + np.outer(loop[:, 0] * dy, col_cos)
            out.append(PlanarContour(int(z), pts, signed_area(loop) < 0))
    return out

"""Binary masks -> closed planar contours in patient coordinates.

Contours follow the *edges* of the mask's pixels, not their centres: every pixel centre of the mask is
0.5 px inside a polygon and every other centre 0.5 px outside, so any rasteriser that samples pixel
centres (plastimatch, TPSs) gives the mask back exactly, down to a single voxel. rt-utils traces pixel
centres instead and loses the outer half-pixel ring (Dice 0.85 on an 8 mm tumour on 2 mm pixels).

Each slice gives one loop per boundary: outer boundaries run clockwise on screen (row index down),
holes anticlockwise and lie inside their outer loop. Receivers combine the loops of one slice by the
even-odd rule (DICOM PS3.3 C.8.8.6.3; plastimatch XORs them), which reproduces holes and islands.
Pixels that touch only at a corner belong to different loops (4-connectivity); loops may then share
that vertex but never cross. Collinear points are dropped, so a rectangle is 4 points.

How (all slices of a mask at once, inside its bounding box): a loop's vertices are the pixel corners where
the boundary turns, found from the 2 x 2 pixels around every corner in a few array passes. At a corner
where two pixels touch diagonally (a saddle) the boundary passes twice, keeping to 4-connectivity (a right
turn); it counts as two corners. Along a row, corners pair up into horizontal runs in row-major order,
along a column into vertical runs in column-major order, so two sorts link every corner to the next one.
Each slice lists its loops by their top-left rightward run (the topmost, then leftmost corner where the
boundary leaves to the right), each loop starting at that corner.

One algorithm whose array passes feed each other, so it stays in one module (just over 400 lines).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Pixels around a corner: bit 1 above-left (TL), 2 above-right (TR), 4 below-left (BL), 8 below-right (BR).
# Boundary edges keep the mask on their right (clockwise outer loops on screen, rows down).


def _corner_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per 2 x 2 code: how many times the boundary turns there (0, 1 or 2) and, per pass (code * 2 + k),
    whether it leaves along its horizontal edge (else along its vertical one) and whether rightward."""
    count = np.zeros(16, dtype=np.uint8)
    h_out = np.zeros(32, dtype=bool)
    east = np.zeros(32, dtype=bool)
    for code in range(16):
        tl, tr, bl, br = (bool(code & b) for b in (1, 2, 4, 8))
        if code == 9:  # TL + BR: in from above -> out to the left; in from below -> out to the right
            count[code] = 2
            h_out[2 * code] = h_out[2 * code + 1] = True
            east[2 * code + 1] = True
        elif code == 6:  # TR + BL: in from the left -> out down; in from the right -> out up
            count[code] = 2
        elif (tl != tr) != (bl != br):  # exactly one vertical edge: a turn
            count[code] = 1
            if tr != br:  # the horizontal edge is on the right: out if the mask is below it
                h_out[2 * code] = east[2 * code] = br
            else:  # on the left: out (westward) if the mask is above it
                h_out[2 * code] = tl
    return count, h_out, east


_COUNT, _H_OUT, _EAST = _corner_table()


@dataclass(frozen=True)
class PlanarContour:
    """One closed loop on one slice; ``points`` are (N, 3) patient coordinates in mm (LPS)."""

    slice_index: int
    points: np.ndarray
    is_hole: bool


@dataclass(frozen=True)
class Loops:
    """Every loop of a (Z, Y, X) mask, slice by slice: loop ``k`` lies on slice ``slices[k]`` and has
    vertices ``offsets[k]:offsets[k + 1]`` of ``rows``/``cols`` (index coordinates, half-integers: pixel
    (r, c) covers [r - 0.5, r + 0.5] x [c - 0.5, c + 0.5]); consecutive vertices differ along one axis,
    loops close implicitly."""

    slices: np.ndarray  # (L,) int64
    offsets: np.ndarray  # (L + 1,) int64
    rows: np.ndarray  # (N,) float64
    cols: np.ndarray  # (N,) float64

    def __len__(self) -> int:
        return int(self.slices.size)

    def signed_areas(self) -> np.ndarray:
        """Shoelace area of each loop in index units; > 0 outer loops (clockwise on screen), < 0 holes."""
        if not len(self):
            return np.zeros(0)
        n = self.rows.size
        nxt = np.arange(1, n + 1)
        nxt[self.offsets[1:] - 1] = self.offsets[:-1]
        r, c = self.rows, self.cols
        terms = c * r[nxt] - r * c[nxt]  # half-integer products: exact, so the sign is exact
        return 0.5 * np.add.reduceat(terms, self.offsets[:-1])


def _empty_loops() -> Loops:
    z = np.zeros(0, dtype=np.int64)
    return Loops(z, np.zeros(1, dtype=np.int64), np.zeros(0), np.zeros(0))


def trace_mask(mask: np.ndarray, keyhole: bool = False) -> Loops:
    """Pixel-edge loops of every slice of a (Z, Y, X) boolean mask (see :func:`trace_loops`)."""
    m3 = np.asarray(mask, dtype=bool)
    if m3.ndim != 3:
        raise ValueError(f"trace_mask needs a (Z, Y, X) mask, got shape {m3.shape}")
    if m3.size == 0:
        return _empty_loops()
    box = _bounding_box(m3)
    if box is None:
        return _empty_loops()
    r0, r1, c0, c1 = box
    h = r1 - r0
    words = _pixel_words(m3[:, r0:r1, c0:c1])
    nz, _, nw = words.shape
    wv = 64 * nw  # corner (z, i, j) is node_v = (z * (h + 1) + i) * wv + j
    vtx, vcode = _corners(words)
    cnt = _COUNT[vcode]
    node_v = np.repeat(vtx, cnt)
    second = np.zeros(node_v.size, dtype=np.int64)
    second[(np.cumsum(cnt, dtype=np.int64) - 1)[cnt == 2]] = 1
    ncode = np.repeat(vcode, cnt) * 2 + second
    n = node_v.size

    # Horizontal runs: consecutive corners of a row, in row-major order. Vertical runs: the same in
    # column-major order (a stable sort by slice and column); at a TR + BL saddle the pass that leaves
    # upward (the second) must come first there.
    zz, rem = np.divmod(node_v, (h + 1) * wv)
    col_key = zz * wv + rem % wv
    order = np.argsort(col_key.astype(np.uint16) if wv * nz < 65536 else col_key, kind="stable")
    flip = np.flatnonzero(ncode[order] == 12)  # first pass of a TR + BL saddle
    order[flip], order[flip + 1] = order[flip + 1], order[flip].copy()
    vpart = np.empty(n, dtype=np.int64)
    vpart[order[0::2]] = order[1::2]
    vpart[order[1::2]] = order[0::2]
    hpart = np.arange(n) ^ 1
    h_out = _H_OUT[ncode]
    nxt = np.where(h_out, hpart, vpart)
    east = _EAST[ncode]
    emit = np.ones(n, dtype=bool)

    starts = np.flatnonzero(east)  # ascending: row-major order of the corners
    walked, bounds = _walk(nxt, starts, n)
    if keyhole:
        # a loop's top-left corner is its smallest corner; a hole leaves it downward (code 7: only BR empty)
        top_left = np.minimum.reduceat(walked, bounds[:-1]) if walked.size else walked
        holes = top_left[(ncode[top_left] >> 1) == 7]
        if holes.size:
            nxt, node_v, emit, east_keys = _join_holes(
                np.sort(holes), nxt, node_v, ncode, words
            )
            n = nxt.size
            cand = np.flatnonzero(east_keys >= 0)
            starts = cand[np.argsort(east_keys[cand], kind="stable")]
            walked, bounds = _walk(nxt, starts, n)
    keep = emit[walked]
    cum = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    offsets = cum[bounds]
    nodes = walked[keep]
    zq, remq = np.divmod(node_v[nodes], (h + 1) * wv)
    iq, jq = np.divmod(remq, wv)
    slices = zq[offsets[:-1]]
    return Loops(
        np.asarray(slices, dtype=np.int64),
        offsets,
        iq + (r0 - 0.5),
        jq + (c0 - 0.5),
    )


def _bounding_box(m3: np.ndarray) -> tuple[int, int, int, int] | None:
    """Rows r0:r1 and columns c0:c1 holding every True of a (Z, Y, X) mask, or None when it is empty."""
    z, y, x = m3.shape
    if m3.size == 0:
        return None
    if m3.flags.c_contiguous and (y * x) % 8 == 0:  # OR over slices, 8 pixels at a time
        proj = np.bitwise_or.reduce(m3.reshape(z, -1).view(np.uint64), axis=0).view(np.uint8).reshape(y, x)
    else:
        proj = m3.any(axis=0)
    rows, cols = np.flatnonzero(proj.any(axis=1)), np.flatnonzero(proj.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _pixel_words(box: np.ndarray) -> np.ndarray:
    """The pixels of a (Z, h, w) box as bits, framed by one empty pixel on every side of a slice: (Z, h + 2,
    nw) little-endian 64-bit words, row i + 1, bit j + 1 (of the row's words) = pixel (i, j)."""
    nz, h, w = box.shape
    nw = (w + 2 + 63) // 64
    packed = np.packbits(box, axis=2, bitorder="little")
    buf = np.zeros((nz, h + 2, nw * 8), dtype=np.uint8)
    buf[:, 1:-1, : packed.shape[2]] = packed
    words = buf.view("<u8")
    carry = np.zeros_like(words)
    carry[:, :, 1:] = words[:, :, :-1] >> 63
    words <<= 1
    words |= carry
    return words


def _right(words: np.ndarray) -> np.ndarray:
    """Bit j of the result is bit j + 1 of the row (0 past the end)."""
    out = words >> 1
    out[..., :-1] |= words[..., 1:] << 63
    return out


def _corners(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Corners where the boundary turns, in row-major order, as node_v and their 2 x 2 codes.

    Corner (i, j) has pixels (i, j), (i, j + 1) above and (i + 1, j), (i + 1, j + 1) below it (framed
    coordinates). It is a turn unless the four are equal in pairs along a row or along a column."""
    nz, hp, nw = words.shape
    vert = _right(words)
    vert ^= words  # bit j: the vertical edge between pixels j and j + 1 of a row
    horiz = words[:, 1:] ^ words[:, :-1]  # bit j: the edge between pixel j of row i and of row i + 1
    turn = vert[:, 1:] | vert[:, :-1]
    either = _right(horiz)
    either |= horiz
    turn &= either
    # corners are sparse: nonzero words, then their nonzero bytes (little-endian: byte b = bits 8b..8b+7)
    flat = turn.reshape(-1)
    word = np.flatnonzero(flat)
    wi, bi = np.nonzero(flat[word].view(np.uint8).reshape(-1, 8))
    byte = word[wi] * 8 + bi
    wi, bit = np.nonzero(np.unpackbits(flat.view(np.uint8)[byte], bitorder="little").reshape(-1, 8))
    byte = byte[wi]
    z, rem = np.divmod(byte >> 3, (hp - 1) * nw)
    i, k = np.divmod(rem, nw)
    j = k * 64 + (byte & 7) * 8 + bit
    vtx = (z * (hp - 1) + i) * (64 * nw) + j

    flat_words = words.reshape(-1)
    top = (z * hp + i) * nw  # first word of row i (framed) of slice z

    def pixel(row_start: np.ndarray, cols: np.ndarray) -> np.ndarray:
        w = flat_words[row_start + (cols >> 6)]
        return ((w >> (cols & 63).astype(np.uint64)) & np.uint64(1)).astype(np.int64)

    code = pixel(top, j) | pixel(top, j + 1) << 1 | pixel(top + nw, j) << 2 | pixel(top + nw, j + 1) << 3
    return vtx, code


def _walk(nxt: np.ndarray, starts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Follow ``nxt`` from each start in turn unless already visited: the nodes in walking order and the
    bounds of each loop among them.

    A depth-first search (in C) does exactly that from a chain of extra roots, root t leading first to
    ``starts[t]`` and then to root t + 1: it walks a loop until it comes back to a visited corner.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import depth_first_order

    k = starts.size
    if k == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    roots = np.empty(2 * k, dtype=np.int64)
    roots[0::2] = starts
    roots[1::2] = n + np.arange(1, k + 1)
    roots[-1] = starts[-1]  # the last root leads to its start only (twice)
    indices = np.concatenate([nxt, roots])
    indptr = np.concatenate([np.arange(n + 1), n + 2 * np.arange(1, k + 1)])
    graph = csr_matrix((np.ones(indices.size), indices, indptr), shape=(n + k, n + k))
    order, pred = depth_first_order(graph, n, directed=True, return_predecessors=True)
    walked = order[order < n].astype(np.int64)
    first = np.flatnonzero(pred[walked] >= n)  # reached from a root: a loop's start
    return walked, np.append(first, walked.size)


def _join_holes(
    holes: np.ndarray,
    nxt: np.ndarray,
    node_v: np.ndarray,
    ncode: np.ndarray,
    words: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Splice every hole into the loop above it through a vertical two-way channel (keyhole).

    A hole's top-left corner v = (i, j) has mask on both sides of the vertical pixel edge above it (the
    background is 8-connected, so a background pixel there would belong to the hole). Going up that line until
    a background pixel borders it finds corner w on a loop of the same component: its outer loop, or a hole
    whose top is higher and that is therefore already joined. At w the pixels below are mask; above, either
    both are background (w lies inside a rightward run, which is split there) or one is (w is a turn).
    The loop then runs ... -> w -> down the channel -> v -> along the hole -> v -> up the channel -> w -> ...;
    where it does not turn at w (or at v going down) no vertex is written. Holes go top to bottom, left to
    right; no two channels share a corner or a segment.
    """
    n, n_holes = nxt.size, holes.size
    _, hp, nw = words.shape
    hv, wv = hp - 1, 64 * nw
    z, rem = np.divmod(node_v[holes], hv * wv)
    i, j = np.divmod(rem, wv)
    w_vert, w_code = np.empty(n_holes, dtype=np.int64), np.empty(n_holes, dtype=np.int64)
    for h in range(n_holes):  # up the pixel-edge line j from v to w: corner (k, j) has rows k, k + 1 about it
        zh, ih, jh = int(z[h]), int(i[h]), int(j[h])
        left = (words[zh, : ih + 1, jh >> 6] >> np.uint64(jh & 63)) & np.uint64(1)
        right = (words[zh, : ih + 1, (jh + 1) >> 6] >> np.uint64((jh + 1) & 63)) & np.uint64(1)
        k = int(np.flatnonzero((left & right)[:ih] == 0)[-1])  # row 0 is the empty frame
        w_vert[h] = (zh * hv + k) * wv + jh
        w_code[h] = left[k] + 2 * right[k] + 4 * left[k + 1] + 8 * right[k + 1]
    # w inside a rightward run: the run's left corner; w a turn: its one corner (original corners only)
    found = np.searchsorted(node_v, w_vert) - (w_code == 12)

    size = n + 3 * n_holes  # each hole adds three passes: down at w, up at v, up at w
    nx = np.concatenate([nxt, np.full(3 * n_holes, -1, dtype=np.int64)])
    pv = np.empty(size, dtype=np.int64)
    pv[nxt] = np.arange(n)
    vertex = np.concatenate([node_v, np.zeros(3 * n_holes, dtype=np.int64)])
    emit = np.ones(size, dtype=bool)
    east_key = np.concatenate([np.where(_EAST[ncode], node_v, -1), np.full(3 * n_holes, -1, dtype=np.int64)])
    # rightward runs already split: left corner -> [(column, the pass that comes up there and goes on right)]
    splits: dict[int, list[tuple[int, int]]] = {}
    moved: dict[int, int] = {}  # a turn replaced by a channel's passes -> the pass that goes on rightward
    for h, (v, wvert, wcode, a, col) in enumerate(
        zip(holes.tolist(), w_vert.tolist(), w_code.tolist(), found.tolist(), j.tolist(), strict=True)
    ):
        down, up, vup = n + 3 * h, n + 3 * h + 1, n + 3 * h + 2
        if wcode == 12:  # both above background: inside a rightward run, split it
            seg = moved.get(a, a)  # the part of the run around column j: from w's left turn or split
            for c, u in sorted(splits.get(a, [])):
                if c < col:
                    seg = u
            pw, sw = seg, int(nx[seg])
            splits.setdefault(a, []).append((col, up))
        else:  # a turn
            pw, sw = int(pv[a]), int(nx[a])
            emit[down] = wcode != 13  # code 13: in from above, so no turn going on down
            emit[up] = wcode != 14  # code 14: out upward, so no turn coming up
            east_key[a] = -1
            if wcode == 13:  # the rightward run from w now starts at the upward pass
                moved[a] = up
        vertex[down] = vertex[up] = wvert
        vertex[vup] = vertex[v]
        east_key[up] = wvert if wcode != 14 else -1
        pvv, sv = int(pv[v]), int(nx[v])
        nx[pw], pv[down] = down, pw
        nx[down], pv[sv] = sv, down
        nx[pvv], pv[vup] = vup, pvv
        nx[vup], pv[up] = up, vup
        nx[up], pv[sw] = sw, up
        emit[v] = False  # v's corner is replaced by the upward pass (the downward one goes straight on)
        east_key[v] = -1
    return nx, vertex, emit, east_key


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
    loops = trace_mask(m2[None], keyhole=keyhole)
    pts = np.stack([loops.rows, loops.cols], axis=1)
    return [pts[a:b] for a, b in zip(loops.offsets[:-1].tolist(), loops.offsets[1:].tolist(), strict=True)]


def signed_area(loop: np.ndarray) -> float:
    """Shoelace area in (row, col) index units; > 0 for outer loops (clockwise on screen), < 0 for holes."""
    r, c = loop[:, 0], loop[:, 1]
    return float(0.5 * (np.dot(c, np.roll(r, -1)) - np.dot(r, np.roll(c, -1))))


def loop_points(
    loops: Loops,
    slice_positions: Sequence[Sequence[float]] | np.ndarray,
    pixel_spacing: tuple[float, float],
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
) -> np.ndarray:
    """(N, 3) patient coordinates in mm of every vertex of ``loops`` (see :func:`mask_to_contours`)."""
    ipp = np.asarray(slice_positions, dtype=np.float64).reshape(-1, 3)
    iop = np.asarray(orientation, dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]  # direction of increasing column index, of increasing row index
    dy, dx = float(pixel_spacing[0]), float(pixel_spacing[1])
    z = np.repeat(loops.slices, np.diff(loops.offsets))
    return ipp[z] + (loops.cols * dx)[:, None] * row_cos + (loops.rows * dy)[:, None] * col_cos


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
    loops = trace_mask(m, keyhole=keyhole)
    pts = loop_points(loops, ipp, pixel_spacing, orientation)
    holes = (loops.signed_areas() < 0).tolist()
    bounds = loops.offsets.tolist()
    return [
        PlanarContour(z, pts[bounds[k] : bounds[k + 1]], holes[k])
        for k, z in enumerate(loops.slices.tolist())
    ]

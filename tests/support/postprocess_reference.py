"""The post-processing rules (temporal filter + connectivity) written the straightforward way: full-volume
int32 labels, a Python loop over every component for sizes / overlaps / rendering, full-volume hole filling,
no threads. The independent reference that tests/unit/models_post/test_post_cross_check.py compares the
vectorised rules with, and the naive peer bench/postprocess.py times them against.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from models.engine import OutputStructure, connectivity_params
from models.post.connectivity import ConnectivityParams
from models.post.temporal import TemporalParams


def _naive_fill(mask: np.ndarray, mode: str, max_hole: int | None) -> np.ndarray:
    if mode == "none" or not mask.any():
        return mask
    if mode == "slice":
        st = np.zeros((3, 3, 3), bool)
        st[1] = ndi.generate_binary_structure(2, 1)
    else:
        st = ndi.generate_binary_structure(3, 1)
    lab, n = ndi.label(~mask, st)
    border = set(np.unique(lab[:, 0, :])) | set(np.unique(lab[:, -1, :])) | set(np.unique(lab[:, :, 0]))
    border |= set(np.unique(lab[:, :, -1]))
    if mode == "3d":
        border |= set(np.unique(lab[0])) | set(np.unique(lab[-1]))
    sizes = np.bincount(lab.ravel())
    fill = np.zeros(n + 1, bool)
    for i in range(1, n + 1):
        fill[i] = i not in border and (max_hole is None or sizes[i] <= max_hole)
    mask |= fill[lab]
    return mask


def naive_clean(masks: np.ndarray, spacing: Sequence[float], temporal: TemporalParams | None,
                conn: ConnectivityParams) -> None:
    """The temporal + connectivity rules of models/ with per-component Python loops, in place."""
    n_ph = masks.shape[0]
    st = ndi.generate_binary_structure(3, temporal.connectivity if temporal else conn.connectivity)
    labels, objs, sizes = [], [], []
    for p in range(n_ph):
        lab, n = ndi.label(masks[p], st)
        o = ndi.find_objects(lab)
        labels.append(lab)
        objs.append(o)
        sizes.append({i: int(np.count_nonzero(lab[o[i - 1]] == i)) for i in range(1, n + 1)})
    genuine = {(p, i) for p in range(n_ph) for i in sizes[p]}
    k = min(temporal.min_phases, n_ph) if temporal else 1
    if temporal is not None and n_ph > 1 and k > 1:
        if temporal.max_centroid_mm is not None:
            raise NotImplementedError("the naive peer implements the overlap rule only")

        def matched(a: int, b: int) -> list[tuple[int, int]]:
            out = []
            for i, sl in enumerate(objs[a], 1):
                other = labels[b][sl][labels[a][sl] == i]
                other = other[other > 0]
                for j, c in zip(*np.unique(other, return_counts=True), strict=True):
                    sa, sb = sizes[a][i], sizes[b][int(j)]
                    denom = min(sa, sb) if temporal.match == "overlap" else sa + sb - c
                    if c >= temporal.min_overlap * denom:
                        out.append((i, int(j)))
            return out

        adj: dict[tuple[int, int], set[tuple[int, int]]] = defaultdict(set)
        fwd: set[tuple[int, int]] = set()
        bwd: set[tuple[int, int]] = set()
        steps = [(p, p + 1) for p in range(n_ph - 1)]
        if temporal.circular and n_ph > 2:
            steps.append((n_ph - 1, 0))
        for a, b in steps:
            for i, j in matched(a, b):
                adj[(a, i)].add((b, j))
                adj[(b, j)].add((a, i))
                fwd.add((a, i))
                bwd.add((b, j))
        if n_ph == 2 and temporal.circular:
            fwd |= {(1, j) for (_, j) in [n for n in bwd if n[0] == 1]}
            bwd |= {(0, i) for (_, i) in [n for n in fwd if n[0] == 0]}
        for d in range(2, temporal.max_gap + 2):
            for a in range(n_ph):
                if temporal.circular:
                    if 2 * d > n_ph or (2 * d == n_ph and a >= n_ph // 2):
                        continue
                    b = (a + d) % n_ph
                elif a + d < n_ph:
                    b = a + d
                else:
                    continue
                for i, j in matched(a, b):
                    if (a, i) not in fwd and (b, j) not in bwd:
                        adj[(a, i)].add((b, j))
                        adj[(b, j)].add((a, i))
        seen: set[tuple[int, int]] = set()
        genuine = set()
        for start in [(p, i) for p in range(n_ph) for i in sizes[p]]:
            if start in seen:
                continue
            track, queue = {start}, deque([start])
            while queue:
                node = queue.popleft()
                for nb in adj[node]:
                    if nb not in track:
                        track.add(nb)
                        queue.append(nb)
            seen |= track
            present = {p for p, _ in track}
            for node in track:
                if _naive_block_size(node[0], present, n_ph, temporal.max_gap, temporal.circular) >= k:
                    genuine.add(node)
    vcc = float(np.prod(spacing)) / 1000.0
    max_hole = None if conn.max_hole_cc is None else int(np.floor(conn.max_hole_cc / vcc + 1e-9))
    for p in range(n_ph):
        cands = [(i, s) for i, s in sizes[p].items() if (p, i) in genuine and s * vcc >= conn.min_volume_cc]
        cands.sort(key=lambda t: (-t[1], t[0]))
        if conn.expected_components is not None:
            cands = cands[: conn.expected_components]
        out = np.zeros(masks.shape[1:], bool)
        for i, _ in cands:
            sl = objs[p][i - 1]
            out[sl] |= labels[p][sl] == i
        masks[p] = _naive_fill(out, conn.fill_holes, max_hole)


def _naive_block_size(p: int, present: set[int], n_ph: int, max_gap: int, circular: bool) -> int:
    """Present phases reachable from ``p`` stepping over at most ``max_gap`` missing phases at a time."""
    def walk(step: int) -> list[int]:
        got: list[int] = []
        cur = p
        while True:
            nxt = None
            for s in range(1, max_gap + 2):
                q = cur + step * s
                if circular:
                    q %= n_ph
                elif not 0 <= q < n_ph:
                    break
                if q == p:
                    return got + [p]  # went round the circle
                if q in present:
                    nxt = q
                    break
            if nxt is None:
                return got
            got.append(nxt)
            cur = nxt

    fw = walk(1)
    if fw and fw[-1] == p:
        return len(present)
    return 1 + len(fw) + len(walk(-1))


def naive_postprocess(masks: dict[str, np.ndarray], spacing: Sequence[float],
                      outputs: Sequence[OutputStructure], temporal: TemporalParams) -> dict[str, np.ndarray]:
    envelopes: dict[str, np.ndarray] = {}
    for out in outputs:
        tp = temporal if out.spec.method == "sam3" else None
        params = connectivity_params(out.spec)
        if params is not None:
            naive_clean(masks[out.name], spacing, tp, params)
        if out.envelope_name:
            envelopes[out.envelope_name] = np.asarray(masks[out.name].any(axis=0))
    return envelopes

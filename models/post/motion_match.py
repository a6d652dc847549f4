"""Motion-compensated, mutual, one-to-one matching of components between two phases (docs/postprocessing.md).

A component A (phase p) and a component B (phase q) that do not overlap are linked when

1. the CT around A, followed into q (:func:`models.post.motion.estimate_shift`, NCC peak >= ``min_ncc``),
   carries A onto B: overlap (the filter's ``match`` measure) of the shifted A with B >= ``min_overlap``;
2. the CT around B, followed back into p, carries B onto A likewise (mutual);
3. no other pair claims A or B with a better score (one-to-one: Hungarian assignment on
   ``min(overlap A->B, overlap B->A)``).

Only components left unmatched by plain overlap are considered, and only pairs that could meet: both at
least ``min_mm3``, volumes compatible with ``min_overlap`` (IoU), boxes within ``bound_mm`` per phase step.
So large structures that overlap anyway cost nothing, and each CT search is a small box.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from models.post.motion import Shift, estimate_shift

if TYPE_CHECKING:
    from models.post.labels import PhaseLabels
    from models.post.temporal import TemporalParams

Box = tuple[slice, ...]


class MotionMatcher:
    """Motion links between the phases of one labelled structure, given the study's HU volume."""

    def __init__(self, lab: PhaseLabels, hu: np.ndarray, spacing: Sequence[float],
                 params: TemporalParams) -> None:
        if hu.shape != lab.shape:
            raise ValueError(f"hu shape {hu.shape} differs from the masks' shape {lab.shape}")
        assert params.motion_mm is not None
        self.lab, self.hu, self.params = lab, hu, params
        self.spacing = tuple(float(s) for s in spacing)
        self.bound_mm = float(params.motion_mm)
        self.min_vox = params.motion_min_mm3 / float(np.prod(self.spacing))
        self._objs: dict[int, np.ndarray] = {}  # phase -> (n + 1, 2, 3) global [lo, hi) per label
        self._shifts: dict[tuple[int, int, int], Shift | None] = {}
        self._lock = threading.Lock()

    # -- component geometry --------------------------------------------------------------------------------

    def _boxes(self, p: int) -> np.ndarray:
        with self._lock:
            got = self._objs.get(p)
        if got is not None:
            return got
        box = self.lab.boxes[p]
        out = np.zeros((self.lab.counts[p] + 1, 2, 3), dtype=np.int64)
        if box is not None:
            origin = np.array([s.start for s in box])
            for i, sl in enumerate(ndi.find_objects(self.lab.labels[p]), start=1):
                if sl is not None:
                    out[i, 0] = [s.start for s in sl] + origin
                    out[i, 1] = [s.stop for s in sl] + origin
        with self._lock:
            self._objs[p] = out
        return out

    def _box(self, p: int, a: int) -> Box:
        b = self._boxes(p)[a]
        return tuple(slice(int(lo), int(hi)) for lo, hi in zip(b[0], b[1], strict=True))

    def _shift(self, p: int, a: int, q: int) -> Shift | None:
        key = (p, a, q)
        if key not in self._shifts:
            self._shifts[key] = estimate_shift(self.hu[p], self.hu[q], self._box(p, a), self.spacing,
                                               self.params.motion_margin_mm, self._bound(p, q))
        return self._shifts[key]

    def _bound(self, p: int, q: int) -> float:
        n = self.lab.n_phases
        d = abs(q - p)
        steps = min(d, n - d) if self.params.circular else d
        return self.bound_mm * max(steps, 1)

    def _shifted_overlaps(self, p: int, a: int, q: int,
                          shift: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Labels of phase q under component ``a`` of phase p moved by ``shift`` voxels, and voxels each."""
        box_p = self.lab.boxes[p]
        box_q = self.lab.boxes[q]
        e = np.zeros(0, np.int64)
        if box_p is None or box_q is None:
            return e, e
        ba = self._box(p, a)
        comp = self.lab.labels[p][tuple(slice(s.start - o.start, s.stop - o.start)
                                        for s, o in zip(ba, box_p, strict=True))] == a
        src, dst = [], []
        for ax in range(3):
            lo, hi = ba[ax].start + shift[ax], ba[ax].stop + shift[ax]
            c_lo, c_hi = max(lo, box_q[ax].start), min(hi, box_q[ax].stop)
            if c_lo >= c_hi:
                return e, e
            src.append(slice(c_lo - lo, c_hi - lo))
            dst.append(slice(c_lo - box_q[ax].start, c_hi - box_q[ax].start))
        under = self.lab.labels[q][tuple(dst)][comp[tuple(src)]]
        counts = np.bincount(under.astype(np.int64), minlength=self.lab.counts[q] + 1)
        counts[0] = 0
        nz = np.flatnonzero(counts)
        return nz, counts[nz]

    def _measure(self, inter: np.ndarray, sa: np.ndarray | int, sb: np.ndarray) -> np.ndarray:
        if self.params.match == "overlap":
            return inter / np.minimum(sa, sb)
        return inter / (sa + sb - inter)

    # -- linking ---------------------------------------------------------------------------------------------

    def candidates(self, p: int, q: int, free_a: np.ndarray, free_b: np.ndarray) -> list[tuple[int, int]]:
        """Pairs (a, b) of free components, large enough, of compatible volume, within the motion bound."""
        sa_all, sb_all = self.lab.sizes[p], self.lab.sizes[q]
        ia = np.flatnonzero(free_a & (sa_all >= self.min_vox))
        ib = np.flatnonzero(free_b & (sb_all >= self.min_vox))
        ia, ib = ia[ia > 0], ib[ib > 0]
        if ia.size == 0 or ib.size == 0:
            return []
        sa, sb = sa_all[ia][:, None].astype(float), sb_all[ib][None, :].astype(float)
        ok = np.ones((ia.size, ib.size), bool)
        if self.params.match == "iou":  # IoU <= min / max for any shift
            ok &= np.minimum(sa, sb) >= self.params.min_overlap * np.maximum(sa, sb)
        if not ok.any():
            return []
        boxes_a, boxes_b = self._boxes(p)[ia], self._boxes(q)[ib]
        reach = np.ceil(self._bound(p, q) / np.asarray(self.spacing)).astype(np.int64)
        lo_a, hi_a = boxes_a[:, None, 0] - reach, boxes_a[:, None, 1] + reach
        ok &= ((boxes_b[None, :, 0] < hi_a) & (boxes_b[None, :, 1] > lo_a)).all(axis=2)
        ra, rb = np.nonzero(ok)
        return [(int(ia[i]), int(ib[j])) for i, j in zip(ra, rb, strict=True)]

    def links(self, p: int, q: int, free_a: np.ndarray, free_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mutual one-to-one motion links (labels in p, labels in q) among the free components."""
        e = np.zeros(0, np.int64)
        pairs = self.candidates(p, q, free_a, free_b)
        if not pairs:
            return e, e
        need = self.params.min_overlap
        cand_b: dict[int, set[int]] = {}
        for a, b in pairs:
            cand_b.setdefault(a, set()).add(b)
        scored: dict[tuple[int, int], float] = {}
        for a, allowed in cand_b.items():
            fwd = self._shift(p, a, q)
            if fwd is None or fwd.score < self.params.motion_min_ncc:
                continue
            lb, inter = self._shifted_overlaps(p, a, q, fwd.voxels)
            m_ab = self._measure(inter, int(self.lab.sizes[p][a]), self.lab.sizes[q][lb])
            for b, mab in zip(lb.tolist(), m_ab.tolist(), strict=True):
                if b not in allowed or mab < need:
                    continue
                back = self._shift(q, b, p)
                if back is None or back.score < self.params.motion_min_ncc:
                    continue
                la, inter_b = self._shifted_overlaps(q, b, p, back.voxels)
                hit = la == a
                if not hit.any():
                    continue
                mba = float(self._measure(inter_b[hit], int(self.lab.sizes[q][b]),
                                          self.lab.sizes[p][la[hit]])[0])
                if mba >= need:
                    scored[(a, b)] = min(mab, mba)
        if not scored:
            return e, e
        a_ids = sorted({a for a, _ in scored})
        b_ids = sorted({b for _, b in scored})
        cost = np.zeros((len(a_ids), len(b_ids)))
        for (a, b), s in scored.items():
            cost[a_ids.index(a), b_ids.index(b)] = -s
        rows, cols = linear_sum_assignment(cost)
        keep = cost[rows, cols] < 0
        return (np.asarray([a_ids[r] for r in rows[keep]], np.int64),
                np.asarray([b_ids[c] for c in cols[keep]], np.int64))

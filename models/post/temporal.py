"""Phase-coherent filtering: keep 3D components that persist through a block of contiguous breathing phases.

Breathing is continuous and periodic, so genuine anatomy appears in every phase and moves little between
neighbouring phases, while segmentation artifacts appear sporadically. The rule (see docs/postprocessing.md):

1. Each phase is labelled into 3D connected components (``connectivity`` 1/2/3 = 6/18/26 neighbours).
2. Two components in phases ``p`` and ``q`` *match* when their overlap is at least ``min_overlap``: by
   default (``match="iou"``) the intersection over union ``|A & B| / |A | B|``; with ``match="overlap"`` the
   overlap fraction ``|A & B| / min(|A|, |B|)`` (more permissive: a small blob touching a large structure's
   position in the next phase matches it). When ``max_centroid_mm`` is set they also match when their
   centroids are closer than that motion bound and their volumes are within a factor
   ``1 / centroid_volume_ratio``.
   When the CT is given (``hu``) and ``motion_mm`` is set, components left unmatched are followed through
   the CT into the other phase (models/post/motion_match.py): a link needs the CT displacement of A to carry A
   onto B, and B's back onto A (mutual), one-to-one; without a CT the rule is overlap (and centroids).
   Neighbouring phases (``q = p + 1``) are always compared. A gap of up to ``max_gap`` missing phases is
   bridged: a component with no match in the next phase is compared with components ``d = 2 .. max_gap + 1``
   phases later that have no match in their previous phase. This keeps anatomy whole when a structure is
   absent in one phase (a dropped phase): its neighbours are linked across the gap.
3. Matches chain components into *tracks* (connected components of the match graph).
4. A track's phases form *blocks*: runs of present phases where consecutive present phases are at most
   ``max_gap`` missing phases apart; with ``circular`` the last phase neighbours the first.
5. A component is genuine when its phase lies in a block of its track holding at least ``min_phases`` (k)
   present phases; missing (bridged) phases do not count towards k. Everything else is removed as sporadic.

With fewer phases than k in the study, k is lowered to the number of phases (a 2-phase study needs both);
a single-phase study is left untouched.

Work is done on the bounding box of the structure in each phase (pairs of phases on the intersection of
their boxes), labels are uint16 when they fit, and phases are labelled in a thread pool
(``scipy.ndimage.label`` releases the GIL).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from models.post.labels import PhaseLabels, label_phases, pair_overlaps, thread_map
from models.post.motion_match import MotionMatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TemporalParams:
    """Knobs of the phase-coherence rule (module docstring)."""

    min_phases: int = 3  # k: present phases a component's block must hold
    min_overlap: float = 0.1  # IoU (or overlap fraction, see ``match``) that makes two components match
    match: Literal["iou", "overlap"] = "iou"  # "iou": |A & B| / |A | B|; "overlap": |A & B| / min(|A|, |B|)
    max_centroid_mm: float | None = None  # also match when centroids are closer than this (mm); None: off
    centroid_volume_ratio: float = 0.5  # centroid matches need min(|A|,|B|) / max(|A|,|B|) >= this
    max_gap: int = 1  # missing phases a block may bridge (a dropped phase)
    circular: bool = True  # the last phase neighbours the first
    connectivity: int = 3  # 1, 2, 3: 6-, 18-, 26-connected components
    # motion-compensated matching from the CT (models/post/motion_match.py); used only when the HU volume is
    # given
    motion_mm: float | None = 25.0  # search bound per phase step (mm, per axis); None: off
    motion_margin_mm: float = 8.0  # CT context around a component that is followed into the other phase
    motion_min_ncc: float = 0.5  # a CT displacement is trusted only when its NCC peak reaches this
    motion_min_mm3: float = 30.0  # smaller components are not followed (specks; a 3 mm sphere is 113 mm3)

    def __post_init__(self) -> None:
        if self.min_phases < 1:
            raise ValueError(f"min_phases must be >= 1, got {self.min_phases}")
        if not 0.0 < self.min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in (0, 1], got {self.min_overlap}")
        if self.match not in ("iou", "overlap"):
            raise ValueError(f"match must be 'iou' or 'overlap', got {self.match!r}")
        if self.max_centroid_mm is not None and self.max_centroid_mm <= 0:
            raise ValueError(f"max_centroid_mm must be > 0 or None, got {self.max_centroid_mm}")
        if not 0.0 <= self.centroid_volume_ratio <= 1.0:
            raise ValueError(f"centroid_volume_ratio must be in [0, 1], got {self.centroid_volume_ratio}")
        if self.max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {self.max_gap}")
        if self.connectivity not in (1, 2, 3):
            raise ValueError(f"connectivity must be 1, 2 or 3, got {self.connectivity}")
        if self.motion_mm is not None and self.motion_mm <= 0:
            raise ValueError(f"motion_mm must be > 0 or None, got {self.motion_mm}")
        if self.motion_margin_mm < 0:
            raise ValueError(f"motion_margin_mm must be >= 0, got {self.motion_margin_mm}")
        if not -1.0 <= self.motion_min_ncc <= 1.0:
            raise ValueError(f"motion_min_ncc must be in [-1, 1], got {self.motion_min_ncc}")
        if self.motion_min_mm3 < 0:
            raise ValueError(f"motion_min_mm3 must be >= 0, got {self.motion_min_mm3}")


def _intersection(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...] | None:
    out = []
    for sa, sb in zip(a, b, strict=True):
        lo, hi = max(sa.start, sb.start), min(sa.stop, sb.stop)
        if lo >= hi:
            return None
        out.append(slice(lo, hi))
    return tuple(out)


def _local(box: tuple[slice, ...], region: tuple[slice, ...]) -> tuple[slice, ...]:
    """``region`` (global coordinates) expressed inside ``box``."""
    return tuple(slice(r.start - b.start, r.stop - b.start) for r, b in zip(region, box, strict=True))


def _centroids(labels: np.ndarray, n: int, sizes: np.ndarray, spacing: Sequence[float],
               origin: Sequence[int]) -> np.ndarray:
    """(n + 1, 3) component centroids in mm (row 0 is NaN), from per-label coordinate sums over set voxels."""
    out = np.full((n + 1, 3), np.nan)
    if n == 0:
        return out
    flat = np.flatnonzero(labels)
    lbl = labels.ravel()[flat]
    coords = np.unravel_index(flat, labels.shape)
    denom = np.maximum(sizes[1:], 1).astype(float)
    for axis in range(3):
        sums = np.bincount(lbl, weights=coords[axis], minlength=n + 1)[1:]
        out[1:, axis] = (sums / denom + origin[axis]) * spacing[axis]
    return out


@dataclass
class TemporalReport:
    """What the filter did: per phase, components seen and removed, and the voxels removed."""

    components: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    removed_voxels: list[int] = field(default_factory=list)
    effective_min_phases: int = 0
    tracks: int = 0
    motion: str = "off"  # "ct": motion-compensated matching ran; "no CT": mask-only fallback; "off": disabled
    motion_links: list[tuple[int, int, int]] = field(default_factory=list)  # (phase p, phase q, links)


def _blocks_ok(row: np.ndarray, k: int, max_gap: int, circular: bool) -> np.ndarray:
    """For one track's presence over phases, which present phases lie in a block with >= k present phases."""
    p_count = row.size
    present = np.flatnonzero(row)
    out = np.zeros(p_count, dtype=bool)
    if present.size == 0:
        return out
    breaks = np.flatnonzero(np.diff(present) - 1 > max_gap)
    blocks = np.split(present, breaks + 1)
    if circular and len(blocks) > 1 and (present[0] + p_count - present[-1] - 1) <= max_gap:
        blocks = [np.concatenate([blocks[-1], blocks[0]])] + blocks[1:-1]
    for b in blocks:
        if b.size >= k:
            out[b] = True
    return out


def find_genuine(lab: PhaseLabels, params: TemporalParams, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 workers: int = 2, hu: np.ndarray | None = None) -> tuple[list[np.ndarray], TemporalReport]:
    """Keep tables (per phase, indexed by label) of the components that pass the phase-coherence rule.

    ``hu`` (P, Z, Y, X), the CT the masks were drawn on, enables motion-compensated matching.
    """
    n_ph = lab.n_phases
    keep = lab.keep_all()
    report = TemporalReport(components=list(lab.counts), removed=[0] * n_ph, removed_voxels=[0] * n_ph)
    if params.motion_mm is not None:
        report.motion = "ct" if hu is not None else "no CT"
    k = min(params.min_phases, n_ph)
    report.effective_min_phases = k
    if n_ph <= 1 or k <= 1 or lab.empty:
        return keep, report

    offsets = np.concatenate([[0], np.cumsum([c for c in lab.counts])])
    n_nodes = int(offsets[-1])
    if n_nodes == 0:
        return keep, report
    motion = None
    if hu is not None and params.motion_mm is not None:
        motion = MotionMatcher(lab, hu, spacing, params)

    centroids: list[np.ndarray] | None = None
    if params.max_centroid_mm is not None:
        centroids = thread_map(
            lambda p: _centroids(lab.labels[p], lab.counts[p], lab.sizes[p], spacing,
                                 [s.start for s in lab.boxes[p] or (slice(0, 0),) * 3]),
            list(range(n_ph)), workers)

    def matches(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        box_a, box_b = lab.boxes[a], lab.boxes[b]
        common = _intersection(box_a, box_b) if box_a is not None and box_b is not None else None
        if common is None or box_a is None or box_b is None:
            ia = ib = inter = np.zeros(0, np.int64)
        else:
            ia, ib, inter = pair_overlaps(lab.labels[a][_local(box_a, common)], lab.counts[a],
                                          lab.labels[b][_local(box_b, common)], lab.counts[b])
        sa, sb = lab.sizes[a][ia], lab.sizes[b][ib]
        denom = np.minimum(sa, sb) if params.match == "overlap" else sa + sb - inter
        ok = inter >= params.min_overlap * denom
        ea, eb = ia[ok], ib[ok]
        if centroids is not None and lab.counts[a] and lab.counts[b]:
            assert params.max_centroid_mm is not None
            # pairs of centroids within the motion bound (a KD-tree: no n_a x n_b matrix for noisy masks)
            near = cKDTree(centroids[a][1:]).sparse_distance_matrix(
                cKDTree(centroids[b][1:]), params.max_centroid_mm, output_type="ndarray")
            if near.size:
                ca_i, cb_i = near["i"].astype(np.int64) + 1, near["j"].astype(np.int64) + 1
                va, vb = lab.sizes[a][ca_i].astype(float), lab.sizes[b][cb_i].astype(float)
                similar = np.minimum(va, vb) >= params.centroid_volume_ratio * np.maximum(va, vb)
                ea = np.concatenate([ea, ca_i[similar]])
                eb = np.concatenate([eb, cb_i[similar]])
        return ea, eb

    # neighbouring phases
    step_pairs = [(p, p + 1) for p in range(n_ph - 1)]
    if params.circular and n_ph > 2:
        step_pairs.append((n_ph - 1, 0))
    direct = thread_map(lambda ab: matches(*ab), step_pairs, workers)

    edges_a: list[np.ndarray] = []
    edges_b: list[np.ndarray] = []
    fwd = [np.zeros(c + 1, bool) for c in lab.counts]  # matched in the next phase
    bwd = [np.zeros(c + 1, bool) for c in lab.counts]  # matched in the previous phase
    for (a, b), (ea, eb) in zip(step_pairs, direct, strict=True):
        edges_a.append(ea + offsets[a])
        edges_b.append(eb + offsets[b])
        fwd[a][ea] = True
        bwd[b][eb] = True
    if motion is not None:  # components left unmatched: follow the CT (mutual, one-to-one)
        jobs = [(a, b, ~fwd[a], ~bwd[b]) for a, b in step_pairs]
        moved = thread_map(lambda j: motion.links(*j), jobs, workers)
        for (a, b), (ea, eb) in zip(step_pairs, moved, strict=True):
            _add_motion(report, a, b, ea, eb, offsets, edges_a, edges_b)
            fwd[a][ea] = True
            bwd[b][eb] = True
    if n_ph == 2 and params.circular:  # the pair (1, 0) is the pair (0, 1): both directions matched
        fwd[1][:] |= bwd[1]
        bwd[0][:] |= fwd[0]

    # bridge gaps: components unmatched forward, to components unmatched backward d phases later
    for d in range(2, params.max_gap + 2):
        gap_pairs = []
        for a in range(n_ph):
            b = a + d
            if b >= n_ph:
                # circular: phases d apart forwards are n_ph - d apart backwards; compare each pair once,
                # at its shorter circular distance
                if not params.circular or n_ph - d < d or (n_ph - d == d and a > b - n_ph):
                    continue
                b -= n_ph
            elif params.circular and (n_ph - d < d or (n_ph - d == d and a > b)):
                continue
            if lab.counts[a] and lab.counts[b] and (~fwd[a][1:]).any() and (~bwd[b][1:]).any():
                gap_pairs.append((a, b))
        found = thread_map(lambda ab: matches(*ab), gap_pairs, workers)
        jobs = []
        for (a, b), (ea, eb) in zip(gap_pairs, found, strict=True):
            ok = ~fwd[a][ea] & ~bwd[b][eb]
            edges_a.append(ea[ok] + offsets[a])
            edges_b.append(eb[ok] + offsets[b])
            if motion is not None:  # components still unlinked across the gap: the motion step's candidates
                fa, fb = ~fwd[a], ~bwd[b]
                fa[ea[ok]] = False
                fb[eb[ok]] = False
                jobs.append((a, b, fa, fb))
        if motion is not None:
            moved = thread_map(lambda j: motion.links(*j), jobs, workers)
            for (a, b), (ea, eb) in zip(gap_pairs, moved, strict=True):
                _add_motion(report, a, b, ea, eb, offsets, edges_a, edges_b)

    # tracks = connected components of the match graph; node = (phase, label) flattened, label 1..n -> 0..n-1
    ea_all = np.concatenate(edges_a) - 1 if edges_a else np.zeros(0, np.int64)
    eb_all = np.concatenate(edges_b) - 1 if edges_b else np.zeros(0, np.int64)
    # offsets index label 1 of phase p at offsets[p] + 1 - 1 = offsets[p]
    graph = coo_matrix((np.ones(ea_all.size, np.int8), (ea_all, eb_all)), shape=(n_nodes, n_nodes))
    n_tracks, track_of = connected_components(graph, directed=False)
    report.tracks = int(n_tracks)
    phase_of = np.repeat(np.arange(n_ph), lab.counts)
    presence = np.zeros((n_tracks, n_ph), dtype=bool)
    presence[track_of, phase_of] = True

    n_present = presence.sum(axis=1)
    support = np.zeros_like(presence)
    support[n_present >= n_ph] = True  # present everywhere: one block
    for t in np.flatnonzero((n_present >= k) & (n_present < n_ph)):
        support[t] = _blocks_ok(presence[t], k, params.max_gap, params.circular)
    genuine = support[track_of, phase_of]

    for p in range(n_ph):
        g = genuine[offsets[p]:offsets[p + 1]]
        keep[p][1:] = g
        report.removed[p] = int((~g).sum())
        report.removed_voxels[p] = int(lab.sizes[p][1:][~g].sum())
    return keep, report


def _add_motion(report: TemporalReport, a: int, b: int, ea: np.ndarray, eb: np.ndarray, offsets: np.ndarray,
                edges_a: list[np.ndarray], edges_b: list[np.ndarray]) -> None:
    if ea.size:
        edges_a.append(ea + offsets[a])
        edges_b.append(eb + offsets[b])
        report.motion_links.append((a, b, int(ea.size)))


def render(lab: PhaseLabels, keep: list[np.ndarray], out: np.ndarray | None = None,
           workers: int = 2) -> np.ndarray:
    """Masks (P, Z, Y, X) holding the kept components.

    ``out`` (optional) must be empty outside each phase's box; the labelled input masks themselves qualify, so
    the result can be written in place.
    """
    if out is None:
        out = np.zeros(lab.shape, dtype=bool)

    def one(p: int) -> None:
        box = lab.boxes[p]
        if box is None:
            return
        kept = np.flatnonzero(keep[p])
        labels = lab.labels[p]
        if kept.size == 0:
            region = np.zeros(labels.shape, bool)
        elif kept.size == lab.counts[p]:
            region = labels != 0
        elif kept.size <= 3:  # a few comparisons beat a gather on large boxes
            region = labels == kept[0]
            for v in kept[1:]:
                region |= labels == v
        else:
            region = keep[p][labels]
        out[p][box] = region

    thread_map(one, list(range(lab.n_phases)), workers)
    return out


def temporal_filter(masks: np.ndarray, params: TemporalParams | None = None,
                    spacing: Sequence[float] = (1.0, 1.0, 1.0),
                    workers: int = 2, hu: np.ndarray | None = None) -> tuple[np.ndarray, TemporalReport]:
    """Remove sporadic components from ``masks`` (P, Z, Y, X) bool; returns a new array and a report.

    ``hu``: the CT (P, Z, Y, X) of the masks; without it, matching falls back to overlap (and centroids).
    """
    params = params or TemporalParams()
    lab = label_phases(np.asarray(masks, dtype=bool), params.connectivity, workers)
    keep, report = find_genuine(lab, params, spacing, workers, hu)
    return render(lab, keep, workers=workers), report

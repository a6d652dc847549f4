"""Spatial connectivity: keep the real 3D components of a structure, drop specks, fill holes.

Per phase, after the temporal filter (:mod:`models.post.temporal`), using the same component labels:

* components smaller than ``min_volume_cc`` are dropped (specks);
* with ``expected_components = N`` only the N largest remaining components are kept (one per lung, one heart);
  with ``None`` every component above the floor is kept (a tumour may be multifocal);
* holes are filled: ``"slice"`` fills every background region enclosed in its axial slice (4-connected
  background), ``"3d"`` fills background cavities enclosed in 3D (6-connected background), ``"none"``
  keeps holes. Every 3D cavity is enclosed in each of its slices, so ``"slice"`` includes ``"3d"``; it is
  what a body outline needs (the lungs are holes of a HU-thresholded body), while organs usually want
  ``"3d"`` only so that a neighbour lying in a concavity of one slice is not swallowed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from models.post.labels import (
    PhaseLabels,
    bounding_box,
    label_components,
    label_counts,
    label_phases,
    thread_map,
)
from models.post.temporal import TemporalParams, find_genuine

log = logging.getLogger(__name__)

FillMode = Literal["none", "3d", "slice"]
FILL_MODES: tuple[str, ...] = ("none", "3d", "slice")

_SLICE_BG = np.zeros((3, 3, 3), dtype=bool)
_SLICE_BG[1] = ndi.generate_binary_structure(2, 1)  # 4-connected in-plane, never across slices
_VOLUME_BG = ndi.generate_binary_structure(3, 1)  # 6-connected


@dataclass(frozen=True)
class ConnectivityParams:
    """Which components of a structure to keep, and how to fill holes."""

    expected_components: int | None = None  # keep this many largest components; None: all above the floor
    min_volume_cc: float = 0.05  # specks below this are dropped
    fill_holes: FillMode = "3d"
    max_hole_cc: float | None = None  # fill only holes up to this volume (cc); None: every hole
    connectivity: int = 3  # 1, 2, 3: 6-, 18-, 26-connected components

    def __post_init__(self) -> None:
        if self.expected_components is not None and self.expected_components < 1:
            raise ValueError(f"expected_components must be >= 1 or None, got {self.expected_components}")
        if self.min_volume_cc < 0:
            raise ValueError(f"min_volume_cc must be >= 0, got {self.min_volume_cc}")
        if self.fill_holes not in FILL_MODES:
            raise ValueError(f"fill_holes must be one of {FILL_MODES}, got {self.fill_holes!r}")
        if self.connectivity not in (1, 2, 3):
            raise ValueError(f"connectivity must be 1, 2 or 3, got {self.connectivity}")
        if self.max_hole_cc is not None and self.max_hole_cc < 0:
            raise ValueError(f"max_hole_cc must be >= 0 or None, got {self.max_hole_cc}")


def voxel_cc(spacing: Sequence[float]) -> float:
    """Volume of one voxel in cc (spacing in mm)."""
    dz, dy, dx = (float(s) for s in spacing)
    return dz * dy * dx / 1000.0


def select_components(sizes: np.ndarray, keep: np.ndarray, params: ConnectivityParams,
                      voxel_volume_cc: float) -> np.ndarray:
    """Narrow a keep table (index = label, 0 = background) by the volume floor and the expected count."""
    out = keep.copy()
    out[0] = False
    out &= sizes * voxel_volume_cc >= params.min_volume_cc
    if params.expected_components is not None:
        candidates = np.flatnonzero(out)
        if candidates.size > params.expected_components:
            # largest first; ties broken by label (raster order) so the result is deterministic
            order = candidates[np.lexsort((candidates, -sizes[candidates]))]
            out[:] = False
            out[order[: params.expected_components]] = True
    return out


def fill_holes(mask: np.ndarray, mode: FillMode = "3d", max_hole_voxels: int | None = None) -> np.ndarray:
    """Fill holes of a (Z, Y, X) mask in place, returned; regions touching the array border are outside."""
    if mode == "none" or not mask.any():
        return mask
    lab, n = label_components(~mask, structure=_SLICE_BG if mode == "slice" else _VOLUME_BG)
    if n == 0:
        return mask
    outside = np.zeros(n + 1, dtype=bool)
    faces = [lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]]
    if mode == "3d":
        faces += [lab[0], lab[-1]]
    for f in faces:
        outside[np.unique(f)] = True
    outside[0] = True  # label 0 is the mask itself
    fill = ~outside
    if fill.any() and max_hole_voxels is not None:
        fill &= label_counts(lab, n) <= max_hole_voxels
    holes = np.flatnonzero(fill)
    if holes.size == 0:
        return mask
    if holes.size <= 3:  # a few comparisons beat a table gather
        for v in holes:
            mask |= lab == v
    else:
        mask |= fill[lab]
    return mask


@dataclass
class CleanReport:
    """Per phase: components found, removed by the temporal rule, removed by connectivity, voxels after."""

    components: list[int] = field(default_factory=list)
    removed_temporal: list[int] = field(default_factory=list)
    removed_temporal_voxels: list[int] = field(default_factory=list)
    removed_connectivity: list[int] = field(default_factory=list)
    voxels: list[int] = field(default_factory=list)
    effective_min_phases: int | None = None
    note: str | None = None  # e.g. why a structure was passed through
    motion: str | None = None  # temporal matching: "ct" (motion-compensated), "no CT" (fallback), "off"
    motion_links: list[tuple[int, int, int]] = field(default_factory=list)  # (phase p, phase q, links)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "components": list(self.components),
            "removed_temporal": list(self.removed_temporal),
            "removed_connectivity": list(self.removed_connectivity),
            "voxels": list(self.voxels),
            "effective_min_phases": self.effective_min_phases,
        }
        if self.removed_temporal_voxels:
            out["removed_temporal_voxels"] = list(self.removed_temporal_voxels)
        if self.motion is not None:
            out["motion"] = self.motion
            out["motion_links"] = [list(t) for t in self.motion_links]
        if self.note:
            out["note"] = self.note
        if self.seconds:
            out["seconds"] = {k: round(v, 4) for k, v in self.seconds.items()}
        return out


def clean_phases(masks: np.ndarray, spacing: Sequence[float], temporal: TemporalParams | None,
                 params: ConnectivityParams, workers: int = 2, hu: np.ndarray | None = None) -> CleanReport:
    """Temporal filter (when ``temporal`` is given) then connectivity and hole filling, IN PLACE on ``masks``.

    ``masks`` is one structure's bool (P, Z, Y, X) stack. One labelling per phase serves both rules. ``hu``
    (the CT of the masks) lets the temporal filter follow motion (models/post/motion_match.py).
    """
    if masks.dtype != np.bool_ or masks.ndim != 4:
        raise ValueError(f"masks must be a bool (phases, z, y, x) array, got {masks.dtype} {masks.shape}")
    conn = temporal.connectivity if temporal is not None else params.connectivity
    t0 = time.perf_counter()
    lab = label_phases(masks, conn, workers)
    t1 = time.perf_counter()
    n_ph = lab.n_phases
    report = CleanReport(components=list(lab.counts), removed_temporal=[0] * n_ph,
                         removed_connectivity=[0] * n_ph, voxels=[0] * n_ph)
    if lab.empty:
        return report
    if temporal is not None:
        keep, treport = find_genuine(lab, temporal, spacing, workers, hu)
        report.removed_temporal = list(treport.removed)
        report.removed_temporal_voxels = list(treport.removed_voxels)
        report.motion = treport.motion
        report.motion_links = list(treport.motion_links)
        report.effective_min_phases = treport.effective_min_phases
    else:
        keep = lab.keep_all()
    t2 = time.perf_counter()
    vcc = voxel_cc(spacing)
    final = [select_components(lab.sizes[p], keep[p], params, vcc) for p in range(n_ph)]
    for p in range(n_ph):
        report.removed_connectivity[p] = int(keep[p][1:].sum() - final[p][1:].sum())
    max_hole = _max_hole_voxels(params, vcc)
    report.voxels = thread_map(lambda p: _render_fill(masks, lab, final[p], p, params.fill_holes, max_hole),
                               list(range(n_ph)), workers)
    report.seconds = {"box_label_count": t1 - t0, "temporal": t2 - t1,
                      "render_fill": time.perf_counter() - t2}
    return report


def _max_hole_voxels(params: ConnectivityParams, vcc: float) -> int | None:
    if params.max_hole_cc is None:
        return None
    return int(np.floor(params.max_hole_cc / vcc + 1e-9))


def _render_fill(masks: np.ndarray, lab: PhaseLabels, keep: np.ndarray, p: int, mode: FillMode,
                 max_hole: int | None) -> int:
    """Write phase ``p``'s kept components (holes filled) into ``masks[p]``; return its voxel count."""
    box = lab.boxes[p]
    if box is None:
        return 0
    labels = lab.labels[p]
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        region = np.zeros(labels.shape, dtype=bool)
    elif kept.size == lab.counts[p]:
        region = labels != 0
    elif kept.size <= 3:  # a few comparisons beat a table gather on large boxes
        region = labels == kept[0]
        for v in kept[1:]:
            region |= labels == v
    else:
        region = keep[labels]
    if mode != "none":
        sub = bounding_box(region)  # the kept components only: far-away artifacts no longer widen the box
        if sub is not None:
            fill_holes(region[sub], mode, max_hole)  # a view: filled in place
    masks[p][box] = region
    return int(np.count_nonzero(region))


def clean_mask(mask: np.ndarray, spacing: Sequence[float], params: ConnectivityParams) -> np.ndarray:
    """Connectivity rules on one (Z, Y, X) mask; returns a new array."""
    out = np.array(mask, dtype=bool, copy=True)
    labels, n = label_components(out, params.connectivity)
    if n == 0:
        return out
    keep = np.ones(n + 1, dtype=bool)
    keep = select_components(label_counts(labels, n), keep, params, voxel_cc(spacing))
    out = keep[labels]
    return fill_holes(out, params.fill_holes, _max_hole_voxels(params, voxel_cc(spacing)))

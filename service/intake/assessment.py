"""Is one group of series (a StudyInstanceUID and FrameOfReferenceUID) a valid 4D set?

:class:`SetChecker` classifies its series (:mod:`service.intake.phases`), sorts each along its slice normal
(multi-frame instances by their per-frame positions) and checks that every phase has one geometry: the same
rows/columns and orientation, the same slice positions within ``position_tol`` mm, no duplicate slices and an
even spacing. The result is an :class:`Assessment` (``problem`` None: a valid 4D set). The assembler
(:mod:`service.intake.assembler`) decides from it what state the study is in.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.intake.phases import (
    SeriesClass,
    SeriesKind,
    SiteRule,
    classify_series,
    descriptions_seen,
    order_phases,
)

if TYPE_CHECKING:
    from service.store.instance_meta import InstanceMeta


@dataclass
class Series:
    uid: str
    cls: SeriesClass
    description: str
    items: list[tuple[InstanceMeta, Path]]


@dataclass
class Slices:
    """A series' slices sorted along the normal (``files`` repeats a multi-frame file once per frame)."""

    files: list[Path]
    positions: np.ndarray  # (n, 3)
    distinct_files: list[Path]


@dataclass
class Assessment:
    """What a group currently is. ``problem`` is None for a valid 4D set."""

    problem: str | None
    phases: list[tuple[Series, Slices]] = field(default_factory=list)
    references: list[tuple[Series, Slices | None]] = field(default_factory=list)
    ignored: list[Series] = field(default_factory=list)
    uniform: bool = False  # every phase has the same slices at the same positions


def content_fingerprint(series: Sequence[Series], revisions: dict[str, int] | None = None) -> str:
    """Identity of the content: the SOP Instance UIDs, plus the revision of any instance re-sent with changed
    content (so a corrected re-send is new content; without revisions the value is what it always was)."""
    revisions = revisions or {}
    h = hashlib.sha256()
    for uid in sorted(m.sop_instance_uid for s in series for m, _ in s.items):
        h.update(uid.encode())
        rev = revisions.get(uid)
        if rev:
            h.update(f"#{rev}".encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def _short_uid(uid: str) -> str:
    """A UID shortened for a reason text (both ends: roots are shared, suffixes tell series apart)."""
    return uid if len(uid) <= 24 else f"{uid[:12]}…{uid[-10:]}"


def for_conflict(phase_series: dict[str, list[Series]]) -> str:
    """Reason naming which phases lie in which frame of reference (largest group first)."""
    parts = []
    for for_uid, series in sorted(phase_series.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        listed = ", ".join(f"{s.cls.percent:g}% (series {_short_uid(s.uid)})"
                           for s in sorted(series, key=lambda s: (s.cls.percent or 0.0, s.uid)))
        parts.append(f"FrameOfReferenceUID {_short_uid(for_uid)}: {listed}")
    return "phases disagree on the frame of reference: " + "; ".join(parts)


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def frame_positions(path: Path) -> list[tuple[float, float, float]] | None:
    """ImagePositionPatient of every frame of a multi-frame (Enhanced CT) instance."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    out = []
    for item in ds.get("PerFrameFunctionalGroupsSequence", []):
        plane = item.get("PlanePositionSequence")
        if not plane:
            return None
        pos = plane[0].get("ImagePositionPatient")
        if pos is None or len(pos) != 3:
            return None
        out.append((float(pos[0]), float(pos[1]), float(pos[2])))
    return out or None


def looks_4d(series: Sequence[Series]) -> bool:
    """A group without a recognised phase that still looks like a 4D set (held, not ignored, so that an
    unknown naming is seen): an AVG/MIP/MinIP series, or three or more other series of one slice count."""
    if any(s.cls.kind is SeriesKind.REFERENCE for s in series):
        return True
    counts: defaultdict[int, int] = defaultdict(int)
    for s in series:
        if s.cls.kind is SeriesKind.OTHER and len(s.items) >= 2:
            counts[len(s.items)] += 1
    return any(n >= 3 for n in counts.values())



class SetChecker:
    """The checks of one assembler (its expected phases, site rules and position tolerance), with a cache of
    the frame positions of multi-frame files (read once per file)."""

    def __init__(self, expected_phases: int | None, site_rules: Sequence[SiteRule] = (),
                 position_tol: float = 0.01) -> None:
        self.expected_phases = expected_phases
        self.site_rules = list(site_rules)
        self.position_tol = float(position_tol)
        self._frames_cache: dict[Path, list[tuple[float, float, float]] | None] = {}

    def classify(self, items: list[tuple[InstanceMeta, Path]]) -> list[Series]:
        by_series: dict[str, list[tuple[InstanceMeta, Path]]] = defaultdict(list)
        for meta, path in items:
            by_series[meta.series_instance_uid].append((meta, path))
        out = []
        for uid, sitems in sorted(by_series.items()):
            first = sitems[0][0]
            cls = classify_series(first, self.site_rules)
            out.append(Series(uid, cls, first.series_description, sitems))
        return out

    def slices(self, s: Series) -> tuple[Slices | None, str | None]:
        """Sort a series along its normal; (None, problem) when it cannot be sorted."""
        metas = [m for m, _ in s.items]
        orientation = metas[0].image_orientation
        if orientation is None:
            return None, f"series {s.uid} has no ImageOrientationPatient"
        normal = slice_normal(orientation)
        multiframe = any((m.number_of_frames or 1) > 1 for m in metas)
        if multiframe:
            if len(s.items) != 1:
                return None, f"series {s.uid}: {len(s.items)} multi-frame instances in one series"
            p = s.items[0][1]
            if p not in self._frames_cache:
                if len(self._frames_cache) > 4096:
                    self._frames_cache.clear()
                try:
                    self._frames_cache[p] = frame_positions(p)
                except Exception as exc:
                    return None, f"series {s.uid}: cannot read frame positions ({type(exc).__name__})"
            frames = self._frames_cache[p]
            if frames is None:
                return None, f"series {s.uid}: multi-frame instance without per-frame positions"
            pos = np.asarray(frames, dtype=float)
            order = np.argsort(pos @ normal, kind="stable")
            return Slices([p] * len(frames), pos[order], [p]), None
        if any(m.image_position is None for m in metas):
            return None, f"series {s.uid} has instances without ImagePositionPatient"
        pos = np.asarray([m.image_position for m in metas], dtype=float)
        order = np.argsort(pos @ normal, kind="stable")
        files = [s.items[i][1] for i in order]
        return Slices(files, pos[order], files), None

    def assess(self, series: list[Series]) -> Assessment:
        a = Assessment(problem=None)
        problems: list[str] = []
        phases = [s for s in series if s.cls.kind is SeriesKind.PHASE]
        a.ignored = [s for s in series if s.cls.kind is SeriesKind.OTHER]
        for s in series:
            if s.cls.kind is SeriesKind.REFERENCE:
                sl, _ = self.slices(s)
                a.references.append((s, sl))
        # breathing order and the meaning of the labels (amplitude vs phase binning): service.intake.phases
        # owns it
        phases.sort(key=lambda s: s.uid)
        order = order_phases([s.cls for s in phases], self.expected_phases,
                             [f"{s.uid} ({s.description!r})" for s in phases])
        problems.extend(order.problems)
        resolved = []
        for i, cls in order.ordered:
            phases[i].cls = cls  # percent = position in the cycle, roi_label = the ROI suffix
            resolved.append(phases[i])
        phases = resolved
        by_pct = {s.cls.percent for s in phases}
        for s in phases:
            tags = {m.nominal_phase_percent for m, _ in s.items}
            if len(tags) > 1:
                problems.append(f"series {s.uid} mixes {len(tags)} respiratory phases in (0020,9245); "
                                "one series per phase is required")
                continue
            sl, problem = self.slices(s)
            if problem:
                problems.append(problem)
            elif sl is not None:
                a.phases.append((s, sl))
        if not by_pct:
            seen = descriptions_seen(s.description for s in series)
            problems.append(f"no respiratory phase recognised in {len(series)} series that look like a 4D "
                            "set (phase naming unknown: add a site rule, setting phase_rules); descriptions "
                            f"seen: {seen}")
        elif len(by_pct) < 2:
            seen = descriptions_seen(s.description for s in series if s.cls.kind is not SeriesKind.REFERENCE)
            problems.append(f"{len(by_pct)} distinct respiratory phase(s) found; a 4D set needs at least 2; "
                            f"descriptions seen: {seen}")
        if not problems:
            problems.extend(self.geometry_problems(a.phases))
        a.uniform = not problems
        a.problem = "; ".join(problems) if problems else None
        return a

    def geometry_problems(self, phases: list[tuple[Series, Slices]]) -> list[str]:
        problems = []
        first, ref = phases[0]
        m0 = first.items[0][0]
        tol = self.position_tol
        for s, sl in phases:
            metas = [m for m, _ in s.items]
            label = f"phase {s.cls.percent:g}% (series {s.uid})"
            if {(m.rows, m.columns) for m in metas} != {(m0.rows, m0.columns)}:
                problems.append(f"{label}: rows/columns differ from phase {first.cls.percent:g}%")
                continue
            o0 = np.asarray(m0.image_orientation or (), dtype=float)
            if any(m.image_orientation is None or len(m.image_orientation) != len(o0) for m in metas) or (
                    float(np.max(np.abs(np.asarray([m.image_orientation for m in metas], dtype=float) - o0)))
                    > 1e-4):
                problems.append(f"{label}: ImageOrientationPatient differs from phase {first.cls.percent:g}%")
                continue
            along = sl.positions @ slice_normal(m0.image_orientation or (1, 0, 0, 0, 1, 0))
            if len(along) > 1 and float(np.min(np.diff(along))) < tol:
                problems.append(f"{label}: two slices at the same position")
                continue
            if len(sl.positions) != len(ref.positions):
                problems.append(f"{label}: {len(sl.positions)} slices vs {len(ref.positions)} in phase "
                                f"{first.cls.percent:g}%")
                continue
            dev = float(np.max(np.abs(sl.positions - ref.positions))) if len(ref.positions) else 0.0
            if dev > tol:
                problems.append(f"{label}: slice positions differ from phase {first.cls.percent:g}% by up to "
                                f"{dev:.3f} mm (tolerance {tol} mm)")
        if not problems and len(ref.positions) > 2:
            along = ref.positions @ slice_normal(m0.image_orientation or (1, 0, 0, 0, 1, 0))
            d = np.diff(along)
            if float(np.max(d) - np.min(d)) > max(tol, 0.01 * float(np.median(d))):
                problems.append(f"uneven slice spacing ({float(np.min(d)):.3f}..{float(np.max(d)):.3f} mm): "
                                "slices missing in every phase?")
        return problems

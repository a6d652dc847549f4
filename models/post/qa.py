"""QA numbers of one study, JSON-serialisable: volumes, centroid motion, vanished phases, suspicious jumps.

Per structure and phase: volume (cc) and centroid (mm, array axes ``z, y, x`` times spacing, relative to voxel
(0, 0, 0)). Motion amplitude is the peak-to-peak range of the centroid over the phases where the structure is
present, per patient axis: SI (z), AP (y), LR (x).

Flags for the physicist (they never change the masks):

* ``vanished_phases``: phases where the structure is empty although it is present in some other phase;
* ``jump_phases``: phases whose centroid lies more than ``jump_mm`` **and** more than ``jump_fraction``
  of the 3D peak-to-peak motion away from the midpoint of its two neighbouring phases' centroids
  (circular). Breathing is smooth, so a phase far off the line through its neighbours points to a
  phase-sorting artifact (a slice stack binned into the wrong phase) or a segmentation jump. Needs at least
  ``min_phases_for_jumps`` phases: with coarser sampling end-inhale itself looks like a jump;
* ``volume_range``: a phase volume outside the plausible range of that ROI (``volume_cc``, e.g. a 1.7 L GTVp);
* ``volume_ratio``: a ROI whose median volume reaches ``volume_ratio_max`` of another's (a heart as large as a
  lung);
* ``variation``: volume over the phases varies by more than ``volume_variation_max`` of its median
  ((max - min) / median: breathing changes a lung by ~10-30 %, a solid organ or tumour much less);
* ``envelope``: an envelope (ITV) larger than ``envelope_ratio_max`` times its structure's largest phase
  (motion far beyond the target's size, or a jumping phase widening the ITV);
* ``phases`` (:func:`cycle_qa`): the ITV is built from fewer phases than the breathing cycle has.

Each flag is ``{"kind", "structure", "text"}``; ``warnings`` lists the texts. Texts name ROIs and numbers
only, never patient data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.post.labels import bounding_box

AXES = ("SI", "AP", "LR")  # array axes z, y, x
QA_SCHEMA = 1


# Plausible per-phase volume (cc) of adult thoracic ROIs; outside: flagged for review, never removed.
DEFAULT_VOLUME_CC: dict[str, tuple[float, float]] = {
    "GTVp": (0.0, 500.0),  # a 10 cm sphere is 524 cc
    "Heart": (50.0, 1500.0),
    "Lung_L": (300.0, 6000.0),
    "Lung_R": (300.0, 6000.0),
}
# ROI -> {other ROI: largest plausible ratio of their median volumes}
DEFAULT_VOLUME_RATIO_MAX: dict[str, dict[str, float]] = {"Heart": {"Lung_L": 0.8, "Lung_R": 0.8}}


@dataclass(frozen=True)
class QAParams:
    """Thresholds of the QA flags (module docstring)."""

    jump_mm: float = 5.0
    jump_fraction: float = 0.35
    min_phases_for_jumps: int = 6
    circular: bool = True
    volume_cc: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_VOLUME_CC))
    volume_ratio_max: Mapping[str, Mapping[str, float]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_VOLUME_RATIO_MAX.items()})
    volume_variation_max: float = 0.5
    envelope_ratio_max: float = 5.0

    @classmethod
    def with_overrides(cls, volume_cc: Mapping[str, tuple[float, float] | None] | None = None,
                       volume_ratio_max: Mapping[str, Mapping[str, float]] | None = None,
                       **kw: Any) -> QAParams:
        """Defaults with a site's per-ROI entries merged over them (``None`` removes a ROI's range)."""
        ranges: dict[str, tuple[float, float]] = dict(DEFAULT_VOLUME_CC)
        for name, rng in (volume_cc or {}).items():
            if rng is None:
                ranges.pop(name, None)
            else:
                ranges[name] = (float(rng[0]), float(rng[1]))
        ratios = {k: dict(v) for k, v in DEFAULT_VOLUME_RATIO_MAX.items()}
        for name, others in (volume_ratio_max or {}).items():
            ratios.setdefault(name, {}).update({o: float(r) for o, r in others.items()})
        return cls(volume_cc=ranges, volume_ratio_max=ratios, **kw)

    def __post_init__(self) -> None:
        if self.jump_mm <= 0:
            raise ValueError(f"jump_mm must be > 0, got {self.jump_mm}")
        if not 0 <= self.jump_fraction <= 1:
            raise ValueError(f"jump_fraction must be in [0, 1], got {self.jump_fraction}")
        if self.min_phases_for_jumps < 3:
            raise ValueError(f"min_phases_for_jumps must be >= 3, got {self.min_phases_for_jumps}")
        for name, (lo, hi) in self.volume_cc.items():
            if not 0 <= lo < hi:
                raise ValueError(f"volume_cc[{name!r}] must be (low, high), 0 <= low < high: {(lo, hi)}")
        if self.volume_variation_max <= 0:
            raise ValueError(f"volume_variation_max must be > 0, got {self.volume_variation_max}")
        if self.envelope_ratio_max < 1:
            raise ValueError(f"envelope_ratio_max must be >= 1, got {self.envelope_ratio_max}")


def phase_stats(masks: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per phase of a bool (P, Z, Y, X) stack: voxel counts (P,), centroids in mm (P, 3), NaN if empty."""
    n_ph = masks.shape[0]
    counts = np.zeros(n_ph, dtype=np.int64)
    cents = np.full((n_ph, 3), np.nan)
    box = bounding_box(masks)
    if box is None:
        return counts, cents
    sp = np.asarray(spacing, dtype=float)
    offs = np.array([s.start for s in box], dtype=float)
    for p in range(n_ph):
        m = masks[p][box]
        zy = np.add.reduce(m, axis=2, dtype=np.int64)  # (Z, Y) counts: one pass over the box
        total = int(zy.sum())
        counts[p] = total
        if total == 0:
            continue
        x_prof = np.add.reduce(m, axis=(0, 1), dtype=np.int64)
        profiles = (zy.sum(axis=1), zy.sum(axis=0), x_prof)
        for axis, prof in enumerate(profiles):
            cents[p, axis] = (float(np.dot(prof, np.arange(prof.size))) / total + offs[axis]) * sp[axis]
    return counts, cents


def _jumps(cents: np.ndarray, present: np.ndarray, params: QAParams) -> list[int]:
    n_ph = cents.shape[0]
    if n_ph < params.min_phases_for_jumps or present.sum() < 3:
        return []
    valid = cents[present]
    amplitude = float(np.linalg.norm(valid.max(axis=0) - valid.min(axis=0)))
    limit = max(params.jump_mm, params.jump_fraction * amplitude)
    out = []
    for p in range(n_ph):
        prev, nxt = p - 1, p + 1
        if not params.circular and (prev < 0 or nxt >= n_ph):
            continue
        prev %= n_ph
        nxt %= n_ph
        if not (present[p] and present[prev] and present[nxt]):
            continue
        mid = (cents[prev] + cents[nxt]) / 2
        if float(np.linalg.norm(cents[p] - mid)) > limit:
            out.append(p)
    return out


def structure_qa(masks: np.ndarray, spacing: Sequence[float],
                 params: QAParams | None = None) -> dict[str, Any]:
    """QA numbers of one structure's bool (P, Z, Y, X) stack."""
    params = params or QAParams()
    counts, cents = phase_stats(masks, spacing)
    vcc = float(np.prod(np.asarray(spacing, dtype=float))) / 1000.0
    present = counts > 0
    motion: dict[str, float | None]
    if present.any():
        valid = cents[present]
        ptp = valid.max(axis=0) - valid.min(axis=0)
        motion = {a: round(float(v), 3) for a, v in zip(AXES, ptp, strict=True)}
        motion["3D"] = round(float(np.linalg.norm(ptp)), 3)
    else:
        motion = {a: None for a in (*AXES, "3D")}
    vols = counts[present] * vcc
    median = float(np.median(vols)) if vols.size else 0.0
    return {
        "volume_cc": [round(float(c) * vcc, 4) for c in counts],
        "volume_range_cc": [round(float(vols.min()), 4), round(float(vols.max()), 4)] if vols.size else None,
        "volume_median_cc": round(median, 4) if vols.size else None,
        # (max - min) / median over the phases where the structure is present
        "volume_variation": round(float(vols.max() - vols.min()) / median, 4) if median > 0 else None,
        "centroid_mm": [None if not present[p] else [round(float(v), 3) for v in cents[p]]
                        for p in range(masks.shape[0])],
        "motion_mm": motion,
        "vanished_phases": [int(p) for p in np.flatnonzero(~present)] if present.any() else [],
        "absent": not bool(present.any()),
        "jump_phases": _jumps(cents, present, params),
    }


def study_qa(masks: Mapping[str, np.ndarray], spacing: Sequence[float],
             envelopes: Mapping[str, np.ndarray] | None = None,
             cleanup: Mapping[str, Mapping[str, Any]] | None = None,
             skipped: Mapping[str, str] | None = None, params: QAParams | None = None,
             phase_percents: Sequence[float] | None = None,
             envelope_sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    """QA dict of the whole study (JSON-serialisable): per structure, per envelope, flags and warnings.

    ``envelope_sources``: envelope name -> the structure it envelops (``{"ITV": "GTVp"}``).
    """
    params = params or QAParams()
    n_ph = next(iter(masks.values())).shape[0] if masks else 0
    vcc = float(np.prod(np.asarray(spacing, dtype=float))) / 1000.0
    structures: dict[str, Any] = {}
    flags: list[dict[str, str]] = []

    def flag(kind: str, structure: str, text: str) -> None:
        flags.append({"kind": kind, "structure": structure, "text": text})

    for name, m in masks.items():
        s = structure_qa(m, spacing, params)
        if cleanup and name in cleanup:
            s["cleanup"] = dict(cleanup[name])
        structures[name] = s
        if s["absent"]:
            flag("absent", name, f"{name}: empty in every phase")
            continue
        if s["vanished_phases"]:
            gone = _phase_names(s["vanished_phases"], phase_percents)
            flag("vanished", name, f"{name}: empty in phase(s) {gone}")
        if s["jump_phases"]:
            jumps = _phase_names(s["jump_phases"], phase_percents)
            flag("jump", name, f"{name}: centroid jump in phase(s) {jumps} (possible phase-sorting artifact)")
        lo_v, hi_v = s["volume_range_cc"]
        if name in params.volume_cc:
            lo, hi = params.volume_cc[name]
            if hi_v > hi:
                flag("volume_range", name, f"{name}: {_cc(hi_v)} in a phase, above the plausible {_cc(hi)}")
            elif lo_v < lo:
                flag("volume_range", name, f"{name}: {_cc(lo_v)} in a phase, below the plausible {_cc(lo)}")
        if s["volume_variation"] is not None and s["volume_variation"] > params.volume_variation_max:
            flag("variation", name, f"{name}: volume varies {s['volume_variation']:.0%} over the phases "
                                    f"(max {params.volume_variation_max:.0%})")
    for name, others in params.volume_ratio_max.items():
        mine = structures.get(name, {}).get("volume_median_cc")
        for other, limit in others.items():
            theirs = structures.get(other, {}).get("volume_median_cc")
            if mine and theirs and mine >= limit * theirs:
                flag("volume_ratio", name, f"{name}: {_cc(mine)}, {mine / theirs:.0%} of {other} "
                                           f"(max {limit:.0%})")
    env_out: dict[str, Any] = {}
    for name, e in (envelopes or {}).items():
        entry: dict[str, Any] = {"volume_cc": round(float(np.count_nonzero(e)) * vcc, 4)}
        source = (envelope_sources or {}).get(name)
        rng = structures.get(source, {}).get("volume_range_cc") if source else None
        if source and rng:
            entry["source"] = source
            entry["largest_phase_cc"] = rng[1]
            entry["ratio_to_largest_phase"] = round(entry["volume_cc"] / rng[1], 4) if rng[1] > 0 else None
            ratio = entry["ratio_to_largest_phase"]
            if ratio is not None and ratio > params.envelope_ratio_max:
                flag("envelope", name, f"{name}: {ratio:.1f}x the largest {source} phase "
                                       f"(max {params.envelope_ratio_max:g}x)")
        env_out[name] = entry
    return {
        "schema": QA_SCHEMA,
        "n_phases": int(n_ph),
        "phase_percents": [float(p) for p in phase_percents] if phase_percents is not None else None,
        "spacing_mm": [float(s) for s in spacing],
        "structures": structures,
        "envelopes": env_out,
        "skipped": dict(skipped or {}),
        "flags": flags,
        "warnings": [f["text"] for f in flags],
    }


def cycle_qa(qa: dict[str, Any], used: int, expected: int, missing_percents: Sequence[float] = (),
             released: bool = False) -> dict[str, Any]:
    """Add phases used vs expected to a :func:`study_qa` dict (in place; returned): the ``phases`` entry and,
    when the cycle is incomplete, a ``phases`` flag first in the list."""
    complete = used >= expected and not missing_percents
    qa["phases"] = {"used": int(used), "expected": int(expected),
                    "missing_percents": [float(p) for p in missing_percents], "complete": complete,
                    "released": bool(released)}
    if not complete:
        missing = ", ".join(f"{round(float(p), 1):g}%" for p in missing_percents)
        text = f"ITV from {used} of {expected} phases" + (f" (missing {missing})" if missing else "")
        flags = qa.setdefault("flags", [])
        flags.insert(0, {"kind": "phases", "structure": "", "text": text})
        qa["warnings"] = [f["text"] for f in flags]
    return qa


def _cc(v: float) -> str:
    return f"{v:.0f} cc" if v >= 10 else f"{v:.2g} cc"


def _phase_names(phases: list[int], percents: Sequence[float] | None) -> str:
    if percents is None:
        return ", ".join(f"#{p}" for p in phases)
    return ", ".join(f"{percents[p]:g}%" for p in phases)

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
  ``min_phases_for_jumps`` phases: with coarser sampling end-inhale itself looks like a jump.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.temporal import bounding_box

AXES = ("SI", "AP", "LR")  # array axes z, y, x
QA_SCHEMA = 1


@dataclass(frozen=True)
class QAParams:
    """Thresholds of the QA flags (module docstring)."""

    jump_mm: float = 5.0
    jump_fraction: float = 0.35
    min_phases_for_jumps: int = 6
    circular: bool = True

    def __post_init__(self) -> None:
        if self.jump_mm <= 0:
            raise ValueError(f"jump_mm must be > 0, got {self.jump_mm}")
        if not 0 <= self.jump_fraction <= 1:
            raise ValueError(f"jump_fraction must be in [0, 1], got {self.jump_fraction}")
        if self.min_phases_for_jumps < 3:
            raise ValueError(f"min_phases_for_jumps must be >= 3, got {self.min_phases_for_jumps}")


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
    return {
        "volume_cc": [round(float(c) * vcc, 4) for c in counts],
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
             phase_percents: Sequence[float] | None = None) -> dict[str, Any]:
    """QA dict of the whole study (JSON-serialisable): per structure, per envelope, readable warnings."""
    params = params or QAParams()
    n_ph = next(iter(masks.values())).shape[0] if masks else 0
    vcc = float(np.prod(np.asarray(spacing, dtype=float))) / 1000.0
    structures: dict[str, Any] = {}
    warnings: list[str] = []
    for name, m in masks.items():
        s = structure_qa(m, spacing, params)
        if cleanup and name in cleanup:
            s["cleanup"] = dict(cleanup[name])
        structures[name] = s
        if s["absent"]:
            warnings.append(f"{name}: empty in every phase")
        elif s["vanished_phases"]:
            warnings.append(f"{name}: empty in phase(s) {_phase_names(s['vanished_phases'], phase_percents)}")
        if s["jump_phases"]:
            jumps = _phase_names(s["jump_phases"], phase_percents)
            warnings.append(f"{name}: centroid jump in phase(s) {jumps} (possible phase-sorting artifact)")
    env_out: dict[str, Any] = {}
    for name, e in (envelopes or {}).items():
        env_out[name] = {"volume_cc": round(float(np.count_nonzero(e)) * vcc, 4)}
    return {
        "schema": QA_SCHEMA,
        "n_phases": int(n_ph),
        "phase_percents": [float(p) for p in phase_percents] if phase_percents is not None else None,
        "spacing_mm": [float(s) for s in spacing],
        "structures": structures,
        "envelopes": env_out,
        "skipped": dict(skipped or {}),
        "warnings": warnings,
    }


def _phase_names(phases: list[int], percents: Sequence[float] | None) -> str:
    if percents is None:
        return ", ".join(f"#{p}" for p in phases)
    return ", ".join(f"{percents[p]:g}%" for p in phases)

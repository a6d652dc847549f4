"""Volume and centroid of each mask per phase, and the motion amplitude they give (SI, AP, LR)."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.evaluation.scores import ENVELOPE_PHASE, csv_number


@dataclass(frozen=True)
class ShapeRow:
    """Volume and centroid of one mask: ``source`` is ``truth`` or a variant name."""

    study: str
    source: str
    structure: str
    phase: str  # "P40" or "envelope"
    percent: float  # nan for the envelope
    volume_cc: float
    centroid_mm: tuple[float, float, float]  # (z SI, y AP, x LR) from voxel (0, 0, 0); nan when empty
    training: str = ""


def shape_rows(
    study: str,
    source: str,
    masks: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    phase_percents: Sequence[float],
    envelopes: Mapping[str, np.ndarray] | None = None,
    training: Sequence[str] | None = None,
) -> list[ShapeRow]:
    """Volume (cm3) and centroid (mm) per structure x phase of bool (P, Z, Y, X) masks, and per envelope."""
    sp = np.asarray([float(s) for s in spacing])
    voxel_cc = float(np.prod(sp)) / 1000.0
    flags = list(training or [""] * len(phase_percents))

    def one(name: str, phase: str, percent: float, m: np.ndarray, flag: str) -> ShapeRow:
        n = int(np.count_nonzero(m))
        if n:
            idx = np.argwhere(m).mean(axis=0) * sp
            c = (float(idx[0]), float(idx[1]), float(idx[2]))
        else:
            c = (math.nan, math.nan, math.nan)
        return ShapeRow(study, source, name, phase, percent, n * voxel_cc, c, flag)

    out = []
    for name, m in masks.items():
        for p, pct in enumerate(phase_percents):
            out.append(one(name, f"P{pct:g}", float(pct), np.asarray(m[p], dtype=bool), flags[p]))
    env_flag = next((f for f in flags if f), "")
    for name, e in (envelopes or {}).items():
        out.append(one(name, ENVELOPE_PHASE, math.nan, np.asarray(e, dtype=bool), env_flag))
    return out


AXES = (("SI", 0), ("AP", 1), ("LR", 2))


def motion_amplitudes(rows: Sequence[ShapeRow]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(study, source, structure) -> {"SI", "AP", "LR": peak-to-peak centroid excursion over the phases in
    mm, "phases": phases with a non-empty mask}; nan when fewer than two phases have the structure."""
    groups: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
    for r in rows:
        if r.phase == ENVELOPE_PHASE:
            continue
        g = groups.setdefault((r.study, r.source, r.structure), [])
        if r.volume_cc > 0:
            g.append(r.centroid_mm)
    out = {}
    for key, cs in groups.items():
        a = np.asarray(cs, dtype=np.float64).reshape(-1, 3)
        d: dict[str, float] = {"phases": float(len(cs))}
        for axis, i in AXES:
            d[axis] = float(a[:, i].max() - a[:, i].min()) if len(cs) >= 2 else math.nan
        out[key] = d
    return out


def write_shape_csv(rows: Sequence[ShapeRow], path: str | Path) -> Path:
    p = Path(path)
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study", "source", "structure", "phase", "volume_cc", "centroid_si_mm",
                    "centroid_ap_mm", "centroid_lr_mm", "training"])
        for r in rows:
            w.writerow([r.study, r.source, r.structure, r.phase, csv_number(r.volume_cc)]
                       + [csv_number(c) for c in r.centroid_mm] + [r.training])
    return p


def write_motion_csv(motion: Mapping[tuple[str, str, str], Mapping[str, float]], path: str | Path) -> Path:
    p = Path(path)
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study", "source", "structure", "si_mm", "ap_mm", "lr_mm", "phases_present"])
        for (study, source, structure), d in motion.items():
            w.writerow([study, source, structure] + [csv_number(d[a]) for a, _ in AXES] + [int(d["phases"])])
    return p


# -- figures ----------------------------------------------------------------------------------------------

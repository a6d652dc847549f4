"""The axial slice of each structure with the largest error area (false positives + false negatives)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.evaluation.scores import csv_number


@dataclass(frozen=True)
class ErrorSlice:
    """The axial slice of one structure with the largest error area (false positive + false negative)."""

    structure: str
    study: str
    variant: str
    phase: str
    z: int
    z_mm: float  # slice position (patient z) when known, else z * dz
    fp_px: int
    fn_px: int
    pixel_area_mm2: float
    hu: np.ndarray  # (Y, X)
    truth: np.ndarray  # (Y, X) bool
    predicted: np.ndarray  # (Y, X) bool
    pixel_spacing: tuple[float, float]  # (dy, dx) mm

    @property
    def error_px(self) -> int:
        return self.fp_px + self.fn_px

    @property
    def error_mm2(self) -> float:
        return self.error_px * self.pixel_area_mm2


def error_per_slice(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive pixels, false negative pixels) per axial slice of bool (Z, Y, X) masks."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    return (p & ~t).sum(axis=(1, 2)), (t & ~p).sum(axis=(1, 2))


def worst_error_slice(
    structure: str,
    study: str,
    variant: str,
    phase: str,
    hu: np.ndarray,
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    slice_z_mm: Sequence[float] | None = None,
) -> ErrorSlice | None:
    """The slice of (Z, Y, X) masks with the most FP + FN pixels (ties: the slice with more truth, then the
    lowest z); None when prediction and truth agree everywhere."""
    fp, fn = error_per_slice(pred, truth)
    err = fp + fn
    if not err.any():
        return None
    truth_px = np.asarray(truth, dtype=bool).sum(axis=(1, 2))
    z = int(np.lexsort((np.arange(err.size), -truth_px, -err))[0])
    dz, dy, dx = (float(s) for s in spacing)
    return ErrorSlice(
        structure,
        study,
        variant,
        phase,
        z,
        float(slice_z_mm[z]) if slice_z_mm is not None else z * dz,
        int(fp[z]),
        int(fn[z]),
        dy * dx,
        np.asarray(hu[z]),
        np.asarray(truth[z], dtype=bool),
        np.asarray(pred[z], dtype=bool),
        (dy, dx),
    )


def keep_worst(best: dict[str, ErrorSlice], candidate: ErrorSlice | None) -> None:
    """Keep, per structure, the candidate with the largest error area."""
    if candidate is None:
        return
    cur = best.get(candidate.structure)
    if cur is None or candidate.error_mm2 > cur.error_mm2:
        best[candidate.structure] = candidate


def write_worst_csv(items: Sequence[ErrorSlice], path: str | Path) -> Path:
    """The slices drawn in the worst-slice figure, with their error areas."""
    p = Path(path)
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["structure", "study", "variant", "phase", "z_index", "z_mm", "fn_mm2", "fp_mm2"])
        for it in items:
            w.writerow([it.structure, it.study, it.variant, it.phase, it.z, csv_number(it.z_mm),
                        csv_number(it.fn_px * it.pixel_area_mm2), csv_number(it.fp_px * it.pixel_area_mm2)])
    return p

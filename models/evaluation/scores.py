"""Dice, HD95 and MSD per structure x phase and for the envelopes: the metric rows, their median [IQR]
summaries and the CSV / Markdown tables.

Metric definitions are those of :mod:`models.metrics` (3D, mm, voxel-surface distances; both masks empty ->
Dice 1, HD95 0; exactly one empty -> Dice 0, HD95 inf). Quartiles are numpy's linear interpolation; ``inf``
takes part (a median of inf means more than half of the cases missed the structure entirely).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.metrics import compare

METRICS: tuple[str, ...] = ("dice", "hd95", "msd")
ENVELOPE_PHASE = "envelope"


@dataclass(frozen=True)
class MetricRow:
    study: str
    variant: str  # e.g. "zero-shot", "adapted"
    structure: str
    phase: str  # "P40" or "envelope"
    dice: float
    hd95: float
    msd: float
    truth_voxels: int
    predicted_voxels: int
    note: str = ""
    training: str = ""  # "train" / "validation" when the volume's hash is in the adapter's training.json


@dataclass(frozen=True)
class SummaryRow:
    variant: str
    structure: str
    n: int
    stats: dict[str, tuple[float, float, float]]  # metric -> (median, q1, q3)


def evaluate_study(
    study: str,
    variant: str,
    predicted: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    phase_percents: Sequence[float],
    predicted_envelopes: Mapping[str, np.ndarray] | None = None,
    truth_envelopes: Mapping[str, np.ndarray] | None = None,
    skipped: Mapping[str, str] | None = None,
) -> list[MetricRow]:
    """Rows for every structure of ``truth`` (bool (P, Z, Y, X)) and every envelope of ``truth_envelopes``.

    A structure the engine did not produce counts as an empty prediction, with the reason in ``note``.
    """
    rows: list[MetricRow] = []
    skipped = skipped or {}
    for name, gt in truth.items():
        pred = predicted.get(name)
        note = "" if pred is not None else f"not produced: {skipped.get(name, 'missing')}"
        for p in range(gt.shape[0]):
            pm = pred[p] if pred is not None else np.zeros_like(gt[p])
            rows.append(_row(study, variant, name, f"P{phase_percents[p]:g}", pm, gt[p], spacing, note))
    for name, gt in (truth_envelopes or {}).items():
        pred_env = (predicted_envelopes or {}).get(name)
        note = "" if pred_env is not None else f"not produced: {skipped.get(name, 'missing')}"
        pm = pred_env if pred_env is not None else np.zeros_like(gt)
        rows.append(_row(study, variant, name, ENVELOPE_PHASE, pm, gt, spacing, note))
    return rows


def _row(
    study: str,
    variant: str,
    name: str,
    phase: str,
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    note: str,
) -> MetricRow:
    m = compare(np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool), spacing)
    return MetricRow(
        study,
        variant,
        name,
        phase,
        m["dice"],
        m["hd95"],
        m["msd"],
        int(np.count_nonzero(gt)),
        int(np.count_nonzero(pred)),
        note,
    )


def summarise(rows: Sequence[MetricRow], include_training: bool = False) -> list[SummaryRow]:
    """Median and IQR per (variant, structure) over phases and studies (envelopes: over studies).

    Rows flagged as training data (``training`` set) are left out unless ``include_training``.
    """
    groups: dict[tuple[str, str], list[MetricRow]] = {}
    for r in rows:
        if r.training and not include_training:
            continue
        groups.setdefault((r.variant, r.structure), []).append(r)
    out = []
    for (variant, structure), rs in groups.items():
        stats = {}
        for m in METRICS:
            v = np.asarray([getattr(r, m) for r in rs], dtype=np.float64)
            q1, med, q3 = (float(x) for x in _quantiles(v))
            stats[m] = (med, q1, q3)
        out.append(SummaryRow(variant, structure, len(rs), stats))
    return out


def _quantiles(v: np.ndarray) -> tuple[float, float, float]:
    finite = np.isfinite(v)
    if finite.all():
        q = np.percentile(v, [25, 50, 75])
        return float(q[0]), float(q[1]), float(q[2])
    # inf sorts last: take order statistics with inf allowed (linear interpolation would give nan)
    s = np.sort(v)

    def at(p: float) -> float:
        x = p * (s.size - 1)
        lo, hi = int(math.floor(x)), int(math.ceil(x))
        if lo == hi or not math.isfinite(s[hi]):
            return float(s[lo]) if lo == hi else (float(s[lo]) if x - lo < 1e-12 else float("inf"))
        return float(s[lo] + (s[hi] - s[lo]) * (x - lo))

    return at(0.25), at(0.5), at(0.75)


def write_rows_csv(rows: Sequence[MetricRow], path: str | Path) -> Path:
    p = Path(path)
    with p.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(MetricRow.__dataclass_fields__))
        w.writeheader()
        for r in rows:
            w.writerow({k: csv_number(v) for k, v in asdict(r).items()})
    return p


def write_summary_csv(summary: Sequence[SummaryRow], path: str | Path) -> Path:
    p = Path(path)
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["variant", "structure", "n"] + [f"{m}_{s}" for m in METRICS for s in ("median", "q1", "q3")]
        )
        for s in summary:
            w.writerow([s.variant, s.structure, s.n] + [csv_number(x) for m in METRICS for x in s.stats[m]])
    return p


def csv_number(v: Any) -> Any:
    """A CSV cell: floats to 6 significant digits, ``inf`` spelled out."""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.6g}"
    return v


def _cell(stat: tuple[float, float, float], digits: int) -> str:
    med, q1, q3 = stat

    def f(x):
        return "inf" if math.isinf(x) else f"{x:.{digits}f}"

    return f"{f(med)} [{f(q1)}, {f(q3)}]"


def markdown_report(
    summary: Sequence[SummaryRow],
    title: str,
    context: Mapping[str, Any] | None = None,
    figures: Sequence[str] = (),
    banner: str = "",
    notes: Sequence[str] = (),
) -> str:
    """The paper-style table: one row per structure, median [IQR] of each metric per variant side by side.

    ``banner``: a warning shown first, in bold (a random-init test model); ``notes``: Markdown lines after
    the table (flagged training volumes, reference values)."""
    variants = list(dict.fromkeys(s.variant for s in summary))
    structures = list(dict.fromkeys(s.structure for s in summary))
    by = {(s.variant, s.structure): s for s in summary}
    lines = [f"# {title}", ""]
    if banner:
        lines += [f"> **WARNING: {banner}**", ""]
    for k, v in (context or {}).items():
        lines.append(f"- **{k}**: {v}")
    lines += [
        "",
        "Median [IQR] over phases (per-phase structures) or studies (envelopes). Dice; HD95 and MSD in mm "
        "(3D, voxel surfaces; `inf`: one of the two masks empty).",
        "",
    ]
    header = ["structure", "n"] + [
        f"{m.upper() if m != 'dice' else 'Dice'} {v}" for m in METRICS for v in variants
    ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for st in structures:
        n = max((by[(v, st)].n for v in variants if (v, st) in by), default=0)
        cells = [st, str(n)]
        for m in METRICS:
            for v in variants:
                s = by.get((v, st))
                cells.append(_cell(s.stats[m], 3 if m == "dice" else 2) if s else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + list(notes)
    if figures:
        lines += [""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


# -- inf values: counted and explained, never silently dropped ---------------------------------------------


def inf_reason(row: MetricRow) -> str:
    """Why a row's HD95/MSD is infinite (exactly one of the two masks is empty)."""
    if row.predicted_voxels == 0 and row.truth_voxels > 0:
        return "not produced" if row.note.startswith("not produced") else "empty prediction"
    if row.truth_voxels == 0 and row.predicted_voxels > 0:
        return "empty truth"
    return "?"


def inf_counts(rows: Sequence[MetricRow], metric: str) -> dict[tuple[str, str], dict[str, int]]:
    """(variant, structure) -> {reason: count} of the rows whose ``metric`` is infinite."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for r in rows:
        if math.isinf(getattr(r, metric)):
            d = out.setdefault((r.variant, r.structure), {})
            reason = inf_reason(r)
            d[reason] = d.get(reason, 0) + 1
    return out

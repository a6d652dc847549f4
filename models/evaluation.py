"""Evaluation report: Dice, HD95 and MSD per structure x phase and for the envelopes (ITV), zero-shot next to
adapted; median [IQR] tables (CSV + Markdown) and figures (box plots, overlays of the worst slices).

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

from models.metrics import compare, dice

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


def summarise(rows: Sequence[MetricRow]) -> list[SummaryRow]:
    """Median and IQR per (variant, structure) over phases and studies (envelopes: over studies)."""
    groups: dict[tuple[str, str], list[MetricRow]] = {}
    for r in rows:
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
            w.writerow({k: _num(v) for k, v in asdict(r).items()})
    return p


def write_summary_csv(summary: Sequence[SummaryRow], path: str | Path) -> Path:
    p = Path(path)
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["variant", "structure", "n"] + [f"{m}_{s}" for m in METRICS for s in ("median", "q1", "q3")]
        )
        for s in summary:
            w.writerow([s.variant, s.structure, s.n] + [_num(x) for m in METRICS for x in s.stats[m]])
    return p


def _num(v: Any) -> Any:
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
) -> str:
    """The paper-style table: one row per structure, median [IQR] of each metric per variant side by side."""
    variants = list(dict.fromkeys(s.variant for s in summary))
    structures = list(dict.fromkeys(s.structure for s in summary))
    by = {(s.variant, s.structure): s for s in summary}
    lines = [f"# {title}", ""]
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
    if figures:
        lines += [""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def worst_slices(hu: np.ndarray, pred: np.ndarray, truth: np.ndarray, k: int = 3) -> list[tuple[int, float]]:
    """``k`` axial slices (z, 2D Dice) with the lowest Dice among slices where either mask is present."""
    scores = []
    for z in range(truth.shape[0]):
        if truth[z].any() or pred[z].any():
            scores.append((z, dice(pred[z], truth[z])))
    scores.sort(key=lambda t: (t[1], t[0]))
    return scores[:k]


def plot_boxplots(rows: Sequence[MetricRow], path: str | Path) -> Path:
    """One panel per metric; boxes per structure, variants side by side (inf values left out, counted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r.variant for r in rows))
    structures = list(dict.fromkeys(r.structure for r in rows))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4.2))
    width = 0.8 / max(1, len(variants))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes, METRICS, strict=True):
        for vi, v in enumerate(variants):
            data, pos = [], []
            for si, s in enumerate(structures):
                vals = [getattr(r, m) for r in rows if r.variant == v and r.structure == s]
                finite = [x for x in vals if math.isfinite(x)]
                data.append(finite or [float("nan")])
                pos.append(si + (vi - (len(variants) - 1) / 2) * width)
            bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, manage_ticks=False)
            for b in bp["boxes"]:
                b.set_facecolor(colors[vi % len(colors)])
                b.set_alpha(0.6)
            ax.plot([], [], color=colors[vi % len(colors)], label=v, linewidth=6, alpha=0.6)
        ax.set_xticks(range(len(structures)), structures, rotation=30, ha="right")
        ax.set_title({"dice": "Dice", "hd95": "HD95 (mm)", "msd": "MSD (mm)"}[m])
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_overlays(
    items: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    path: str | Path,
    window: tuple[float, float] = (-1000.0, 400.0),
) -> Path:
    """A grid of (title, hu (Y, X), truth (Y, X), predicted (Y, X)): truth in green, prediction in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(items))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, hu, gt, pred) in zip(axes.ravel(), items, strict=False):
        ax.imshow(hu, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
        if gt.any():
            ax.contour(gt.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
        if pred.any():
            ax.contour(pred.astype(float), levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

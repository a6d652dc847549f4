"""The evaluation figures (matplotlib, Agg): metric box plots, worst-slice overlays on the CT, volumes,
motion, envelopes and the training curves."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluation.scores import ENVELOPE_PHASE, METRICS, MetricRow, inf_counts, inf_reason
from models.evaluation.shapes import AXES, ShapeRow
from models.evaluation.worst_slices import ErrorSlice

METRIC_TITLES = {"dice": "Dice", "hd95": "HD95 (mm)", "msd": "MSD (mm)"}
TRUTH_COLOUR = "#00c000"  # contour colours on the CT: truth green, prediction magenta (both visible on grey)
PRED_COLOUR = "#ff00ff"
FN_COLOUR = "#ffd000"
FP_COLOUR = "#00b0ff"
CT_WINDOW = (-1000.0, 400.0)  # HU: lung parenchyma through soft tissue and bone edges (W 1400 / L -300)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    out = Path(path)
    fig.savefig(out, dpi=dpi)
    _plt().close(fig)
    return out


def boxplot_figure(rows: Sequence[MetricRow], banner: str = "") -> Any:
    """One panel per metric; boxes per structure, variants side by side. Infinite values cannot be drawn:
    each box with any is annotated ``∞ ×N`` with the reasons (``empty prediction``, ``empty truth``, …) and a
    red marker at the top of the panel, and the x label says how many values the box holds."""
    plt = _plt()
    variants = list(dict.fromkeys(r.variant for r in rows))
    structures = list(dict.fromkeys(r.structure for r in rows))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.2 * len(METRICS), 4.8))
    width = 0.8 / max(1, len(variants))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes, METRICS, strict=True):
        infs = inf_counts(rows, m)
        for vi, v in enumerate(variants):
            data, pos, ann = [], [], []
            for si, s in enumerate(structures):
                vals = [getattr(r, m) for r in rows if r.variant == v and r.structure == s]
                finite = [x for x in vals if math.isfinite(x)]
                data.append(finite or [float("nan")])
                x = si + (vi - (len(variants) - 1) / 2) * width
                pos.append(x)
                reasons = infs.get((v, s))
                if reasons:
                    n = sum(reasons.values())
                    why = ", ".join(f"{c} {k}" for k, c in sorted(reasons.items()))
                    ann.append((x, f"∞ ×{n}/{len(vals)}\n({why})"))
            bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, manage_ticks=False)
            for b in bp["boxes"]:
                b.set_facecolor(colors[vi % len(colors)])
                b.set_alpha(0.6)
            ax.plot([], [], color=colors[vi % len(colors)], label=v, linewidth=6, alpha=0.6)
            for x, text in ann:
                ax.plot([x], [0.97], marker="^", color="red", transform=ax.get_xaxis_transform(),
                        clip_on=False)
                ax.text(x, 0.93, text, transform=ax.get_xaxis_transform(), ha="center", va="top",
                        fontsize=7, color="red")
        ax.set_xticks(range(len(structures)), structures, rotation=30, ha="right")
        ax.set_title(METRIC_TITLES[m])
        ax.grid(axis="y", alpha=0.3)
        if m == "dice":
            ax.set_ylim(-0.02, 1.15)
        elif any(infs.values()):
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi + 0.35 * (hi - lo))  # room for the ∞ annotations
    if any(math.isinf(getattr(r, m)) for r in rows for m in METRICS):
        axes[0].plot([], [], marker="^", color="red", linestyle="", label="∞: one mask empty (not drawn)")
    axes[0].legend(loc="lower left", fontsize=8)
    n_rows = len(rows)
    fig.suptitle(
        (banner + "\n" if banner else "") + f"{n_rows} values (structure × phase, envelopes); boxes: median, "
        "IQR, whiskers 1.5 IQR; values of training volumes excluded unless --include-training",
        fontsize=9,
        color="red" if banner else "black",
    )
    fig.tight_layout()
    return fig


def plot_boxplots(rows: Sequence[MetricRow], path: str | Path, banner: str = "") -> Path:
    return save_figure(boxplot_figure(rows, banner), path)


def _orientation(ax: Any, extent: tuple[float, float, float, float]) -> None:
    """Radiological convention of the canonical axial grid: patient right on the image's left, anterior up;
    letters at the edges and a 5 cm scale bar."""
    x0, x1, y1, y0 = extent
    kw = dict(color="yellow", fontsize=8, fontweight="bold", ha="center", va="center")
    ax.text(x0 + 0.04 * (x1 - x0), (y0 + y1) / 2, "R", **kw)
    ax.text(x1 - 0.04 * (x1 - x0), (y0 + y1) / 2, "L", **kw)
    ax.text((x0 + x1) / 2, y0 + 0.04 * (y1 - y0), "A", **kw)
    ax.text((x0 + x1) / 2, y1 - 0.04 * (y1 - y0), "P", **kw)
    bar = 50.0 if (x1 - x0) > 120 else 10.0
    bx, by = x1 - 0.06 * (x1 - x0) - bar, y1 - 0.1 * (y1 - y0)
    ax.plot([bx, bx + bar], [by, by], color="white", linewidth=3)
    ax.text(bx + bar / 2, by - 0.03 * (y1 - y0), f"{bar:g} mm", color="white", fontsize=7, ha="center",
            va="bottom")


def worst_slices_figure(items: Sequence[ErrorSlice], window: tuple[float, float] = CT_WINDOW,
                        banner: str = "") -> Any:
    """One panel per structure: its slice with the largest error area, on the CT (``window`` in HU), truth
    and prediction contours, false negative and false positive pixels filled, legend, orientation, scale."""
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = _plt()
    n = max(1, len(items))
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.8 * cols, 4.1 * nrows + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, it in zip(axes.ravel(), items, strict=False):
        dy, dx = it.pixel_spacing
        ny, nx = it.hu.shape
        extent = (0.0, nx * dx, ny * dy, 0.0)  # mm; rows (y) increase downwards = posterior
        ax.imshow(it.hu, cmap="gray", vmin=window[0], vmax=window[1], extent=extent, interpolation="nearest")
        fn = it.truth & ~it.predicted
        fp = it.predicted & ~it.truth
        for m, colour in ((fn, FN_COLOUR), (fp, FP_COLOUR)):
            if m.any():
                ax.imshow(np.ma.masked_where(~m, m.astype(float)), cmap=ListedColormap([colour]), alpha=0.55,
                          extent=extent, interpolation="nearest", vmin=0, vmax=1)
        xs = (np.arange(nx) + 0.5) * dx
        ys = (np.arange(ny) + 0.5) * dy
        for m, colour in ((it.truth, TRUTH_COLOUR), (it.predicted, PRED_COLOUR)):
            if m.any():
                ax.contour(xs, ys, m.astype(float), levels=[0.5], colors=colour, linewidths=1.2)
        _orientation(ax, extent)
        ax.set_title(
            f"{it.structure} — {it.study} {it.phase}, z = {it.z_mm:.1f} mm\n"
            f"{it.variant}: FN {it.fn_px * it.pixel_area_mm2 / 100:.1f} cm², "
            f"FP {it.fp_px * it.pixel_area_mm2 / 100:.1f} cm²",
            fontsize=8,
        )
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [
        Line2D([], [], color=TRUTH_COLOUR, label="truth"),
        Line2D([], [], color=PRED_COLOUR, label="prediction"),
        Patch(color=FN_COLOUR, alpha=0.55, label="missed (false negative)"),
        Patch(color=FP_COLOUR, alpha=0.55, label="extra (false positive)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(
        (banner + "\n" if banner else "")
        + f"Worst slice per structure (largest FN + FP area); CT window {window[0]:g} to {window[1]:g} HU",
        fontsize=9,
        color="red" if banner else "black",
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def plot_worst_slices(items: Sequence[ErrorSlice], path: str | Path, banner: str = "") -> Path:
    return save_figure(worst_slices_figure(items, banner=banner), path)


def _sources(rows: Sequence[ShapeRow]) -> list[str]:
    return ["truth"] + [s for s in dict.fromkeys(r.source for r in rows) if s != "truth"]


def volumes_figure(rows: Sequence[ShapeRow], banner: str = "") -> Any:
    """Volume per phase (cm³), one panel per structure: truth solid black, each prediction source dashed."""
    plt = _plt()
    rows = [r for r in rows if r.phase != ENVELOPE_PHASE]
    structures = list(dict.fromkeys(r.structure for r in rows))
    studies = list(dict.fromkeys(r.study for r in rows))
    sources = _sources(rows)
    n = max(1, len(structures))
    cols = min(3, n)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.4 * cols, 3.4 * math.ceil(n / cols)),
                             squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>"
    for ax, s in zip(axes.ravel(), structures, strict=False):
        for ki, study in enumerate(studies):
            for si, src in enumerate(sources):
                pts = sorted((r.percent, r.volume_cc) for r in rows
                             if r.structure == s and r.study == study and r.source == src)
                if not pts:
                    continue
                x, y = zip(*pts, strict=True)
                label = src + (f" ({study})" if len(studies) > 1 else "")
                ax.plot(x, y, linestyle="-" if src == "truth" else "--", marker=markers[ki % len(markers)],
                        color="black" if src == "truth" else colors[(si - 1) % len(colors)], label=label,
                        markersize=4)
        ax.set_title(s)
        ax.set_xlabel("respiratory phase (%)")
        ax.set_ylabel("volume (cm³)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle((banner + "\n" if banner else "") + "Volume per phase: truth vs prediction", fontsize=9,
                 color="red" if banner else "black")
    fig.tight_layout()
    return fig


def motion_figure(motion: Mapping[tuple[str, str, str], Mapping[str, float]], banner: str = "") -> Any:
    """Peak-to-peak centroid motion over the phases (mm) along SI, AP and LR: one panel per axis, bars per
    structure (median over studies, dots = single studies), truth beside each prediction source."""
    plt = _plt()
    structures = list(dict.fromkeys(k[2] for k in motion))
    sources = ["truth"] + [s for s in dict.fromkeys(k[1] for k in motion) if s != "truth"]
    studies = list(dict.fromkeys(k[0] for k in motion))
    fig, axes = plt.subplots(1, 3, figsize=(5.2 * 3, 4.2), sharey=True)
    width = 0.8 / max(1, len(sources))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (axis, _) in zip(axes, AXES, strict=True):
        for si, src in enumerate(sources):
            colour = "0.3" if src == "truth" else colors[(si - 1) % len(colors)]
            for k, s in enumerate(structures):
                vals = [motion[(st, src, s)][axis] for st in studies if (st, src, s) in motion]
                finite = [v for v in vals if math.isfinite(v)]
                x = k + (si - (len(sources) - 1) / 2) * width
                if finite:
                    ax.bar(x, float(np.median(finite)), width * 0.9, color=colour, alpha=0.75,
                           label=src if k == 0 else None)
                    if len(finite) > 1:
                        ax.plot([x] * len(finite), finite, "k.", markersize=3)
                elif vals:
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(range(len(structures)), structures, rotation=30, ha="right")
        ax.set_title({"SI": "superior–inferior", "AP": "anterior–posterior", "LR": "left–right"}[axis]
                     + f" ({axis})")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("centroid motion, peak to peak (mm)")
    axes[0].legend(fontsize=8)
    fig.suptitle((banner + "\n" if banner else "") + "Motion amplitude over the respiratory cycle "
                 "(n/a: present on fewer than 2 phases)", fontsize=9, color="red" if banner else "black")
    fig.tight_layout()
    return fig


def envelope_figure(shapes: Sequence[ShapeRow], rows: Sequence[MetricRow], banner: str = "") -> Any:
    """Envelopes (ITV): volume truth vs prediction, Dice and HD95 per study and source."""
    plt = _plt()
    env_shapes = [r for r in shapes if r.phase == ENVELOPE_PHASE]
    env_rows = [r for r in rows if r.phase == ENVELOPE_PHASE]
    labels = list(dict.fromkeys(f"{r.structure}\n{r.study}" for r in env_shapes))
    sources = _sources(env_shapes)
    variants = [s for s in sources if s != "truth"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 3, figsize=(5.0 * 3, 4.2))
    width = 0.8 / max(1, len(sources))
    for k, lab in enumerate(labels):
        structure, study = lab.split("\n", 1)
        for si, src in enumerate(sources):
            key = (structure, study, src)
            v = [r.volume_cc for r in env_shapes if (r.structure, r.study, r.source) == key]
            if v:
                x = k + (si - (len(sources) - 1) / 2) * width
                axes[0].bar(x, v[0], width * 0.9, color="0.3" if src == "truth" else colors[(si - 1) % 10],
                            label=src if k == 0 else None, alpha=0.8)
                axes[0].text(x, v[0], f"{v[0]:.1f}", ha="center", va="bottom", fontsize=7)
        for vi, var in enumerate(variants):
            mr = [r for r in env_rows if (r.structure, r.study, r.variant) == (structure, study, var)]
            if not mr:
                continue
            x = k + (vi - (len(variants) - 1) / 2) * (0.8 / max(1, len(variants)))
            w = 0.8 / max(1, len(variants)) * 0.9
            colour = colors[vi % 10]
            axes[1].bar(x, mr[0].dice, w, color=colour, alpha=0.8, label=var if k == 0 else None)
            axes[1].text(x, mr[0].dice, f"{mr[0].dice:.3f}", ha="center", va="bottom", fontsize=7)
            if math.isfinite(mr[0].hd95):
                axes[2].bar(x, mr[0].hd95, w, color=colour, alpha=0.8, label=var if k == 0 else None)
                axes[2].text(x, mr[0].hd95, f"{mr[0].hd95:.1f}", ha="center", va="bottom", fontsize=7)
            else:
                axes[2].text(x, 0, f"∞ ({inf_reason(mr[0])})", ha="center", va="bottom", fontsize=7,
                             color="red", rotation=90)
    for ax, title in zip(axes, ("envelope volume (cm³)", "envelope Dice", "envelope HD95 (mm)"), strict=True):
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[1].set_ylim(0, 1.1)
    fig.suptitle((banner + "\n" if banner else "") + "Envelope (ITV = union over phases): truth vs "
                 "prediction", fontsize=9, color="red" if banner else "black")
    fig.tight_layout()
    return fig


def training_figure(manifest: Mapping[str, Any]) -> Any:
    """Training loss and validation Dice per epoch from a ``training.json``; the base model's identity in the
    title (a random-init test model says so in red)."""
    plt = _plt()
    epochs = list(manifest.get("epochs", []))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    x = [e.get("epoch") for e in epochs]
    loss = [e.get("train_loss") for e in epochs]
    a1.plot(x, [math.nan if v is None else v for v in loss], "o-", color="C3")
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss (mean over the epoch's steps)")
    a1.grid(alpha=0.3)
    names = list(dict.fromkeys(k for e in epochs for k in (e.get("val_dice") or {})))
    before = (manifest.get("validation") or {}).get("before") or {}
    for i, name in enumerate(names):
        ys = [(e.get("val_dice") or {}).get(name) for e in epochs]
        xs, ys2 = [0, *x], [before.get(name), *ys]
        a2.plot(xs, [math.nan if v is None else v for v in ys2], "o-", color=f"C{i}", label=name,
                linewidth=2.0 if name == "mean" else 1.0)
    a2.set_xlabel("epoch (0: before training)")
    a2.set_ylabel("validation Dice")
    a2.set_ylim(0, 1)
    a2.grid(alpha=0.3)
    if names:
        a2.legend(fontsize=8)
    else:
        a2.text(0.5, 0.5, "no validation volumes", ha="center", transform=a2.transAxes)
    base = manifest.get("base_model") or {}
    random = base.get("trained") is False
    title = f"Adapter {(manifest.get('adapter') or {}).get('name', '?')} on {base.get('model', '?')}"
    if random:
        title = "RANDOM-INIT TEST MODEL — NOT A TRAINED SAM 3, numbers mean nothing clinically\n" + title
    fig.suptitle(title, fontsize=9, color="red" if random else "black")
    fig.tight_layout()
    return fig


def plot_training(manifest: Mapping[str, Any], path: str | Path) -> Path:
    return save_figure(training_figure(manifest), path)

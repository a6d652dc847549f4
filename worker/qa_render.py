"""Draw the QA report's four pages (worker/qa_report.py says what they show) with matplotlib and write them as
one PDF and a PNG per page: :func:`render`, :func:`draw_plane` for one image with its contours, scale bar and
orientation letters."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.qa_report import REVIEW, Plane, ReportData

log = logging.getLogger(__name__)

PDF_NAME = "report.pdf"
A4 = (8.27, 11.69)  # inches, portrait
WINDOW = (-1000.0, 400.0)  # HU shown: lung to soft tissue and bone

_LETTERS = {  # (left, right, top, bottom) edge of the displayed image
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}


def _edges(c: np.ndarray) -> tuple[float, float]:
    step = float(c[1] - c[0]) if c.size > 1 else 1.0
    return float(c[0]) - step / 2, float(c[-1]) + step / 2


def _scale_bar(ax: Any, width_mm: float) -> None:
    length = next((v for v in (100, 50, 20, 10, 5, 2) if v <= width_mm / 4), 1)
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    left = min(x0, x1) + 0.06 * abs(x1 - x0)
    bottom = y0 + 0.07 * (y1 - y0)  # get_ylim is (bottom, top) as displayed, inverted or not
    ax.plot([left, left + length], [bottom, bottom], color="white", lw=2.5, solid_capstyle="butt")
    ax.text(left + length / 2, bottom, f"{length:g} mm", color="white", fontsize=6, ha="center", va="bottom")


def draw_plane(ax: Any, plane: Plane, colors: Mapping[str, str], styles: Mapping[str, str] | None = None,
               title: str = "") -> None:
    """One image in patient mm with its contours, orientation letters and scale bar.

    Axial: rows are y (anterior first), so y grows downwards; coronal/sagittal: rows are z, drawn upwards
    (head up). Sagittal columns are y (anterior on the left); the others' columns are x (patient left on
    the right)."""
    u0, u1 = _edges(plane.u)
    v0, v1 = _edges(plane.v)
    head_up = plane.plane != "axial"
    extent = (u0, u1, v0, v1) if head_up else (u0, u1, v1, v0)
    ax.imshow(plane.image, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], extent=extent,
              origin="lower" if head_up else "upper", interpolation="nearest")
    for name, m in plane.contours.items():
        if m.any() and not m.all():
            ls = (styles or {}).get(name, "solid")
            ax.contour(plane.u, plane.v, m.astype(np.float32), levels=[0.5], colors=[colors.get(name, "y")],
                       linewidths=0.9, linestyles=ls)
    ax.set_xlim(u0, u1)
    ax.set_ylim((v0, v1) if head_up else (v1, v0))
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    left, right, top, bottom = _LETTERS[plane.plane]
    kw = {"color": "yellow", "fontsize": 7, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **kw)
    ax.text(0.98, 0.5, right, ha="right", va="center", **kw)
    ax.text(0.5, 0.98, top, ha="center", va="top", **kw)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **kw)
    _scale_bar(ax, abs(u1 - u0))
    ax.set_title(title or f"{plane.plane} {plane.where}", fontsize=7)


def _legend(fig: Any, names: Sequence[str], colors: Mapping[str, str], y: float,
            styles: Mapping[str, str] | None = None, extra: Sequence[tuple[str, str, str]] = ()) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors.get(n, "y"), lw=1.5, ls=(styles or {}).get(n, "solid"), label=n)
               for n in names]
    handles += [Line2D([], [], color=c, lw=1.5, ls=ls, label=lab) for lab, c, ls in extra]
    if handles:
        fig.legend(handles=handles, loc="center", bbox_to_anchor=(0.5, y), ncol=min(6, len(handles)),
                   fontsize=7, frameon=False)


def _header(fig: Any, data: ReportData, page: int, title: str) -> None:
    fig.text(0.06, 0.975, f"itvnode QA report — study {data.study_key}", fontsize=9, weight="bold", va="top")
    fig.text(0.94, 0.975, f"page {page} of 4", fontsize=8, ha="right", va="top")
    fig.text(0.06, 0.955, title, fontsize=12, va="top")
    fig.text(0.5, 0.012, REVIEW, fontsize=7, ha="center", color="#b00000")


def _fmt(v: Any, nd: int = 1) -> str:
    return "—" if v is None else f"{float(v):.{nd}f}"


def _page_summary(data: ReportData) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=A4)
    _header(fig, data, 1, "Summary")
    qa = data.qa
    ph = qa.get("phases") or {}
    lines: list[tuple[str, dict[str, Any]]] = []
    used, expected = ph.get("used", len(data.percents)), ph.get("expected", len(data.percents))
    lines.append((f"Phases used: {used} of {expected}   ("
                  + ", ".join(f"{p:g} %" for p in data.percents) + ")", {"weight": "bold"}))
    if ph.get("missing_percents"):
        lines.append(("Missing phases: " + ", ".join(f"{p:g} %" for p in ph["missing_percents"]),
                      {"color": "#b00000"}))
    if ph.get("released"):
        lines.append(("Released by an admin while held (incomplete breathing cycle)", {"color": "#b00000"}))
    for n in data.notes:
        lines.append((n, {}))
    alg = data.algorithm
    model = " ".join(str(alg.get(k, "")) for k in ("model", "model_version")).strip() or "unknown"
    lines.append((f"Model: {model}   adapter: {alg.get('adapter_version', 'none')}", {}))
    lines.append((f"End-inhale: {data.percents[data.inhale]:g} %   "
                  f"end-exhale: {data.percents[data.exhale]:g} %"
                  f"   target: {data.target or 'none'}   envelope: {data.envelope or 'none'}", {}))
    y = 0.92
    for text, kw in lines:
        fig.text(0.06, y, text, fontsize=8.5, va="top", wrap=True, **kw)
        y -= 0.022

    # structures table
    y -= 0.01
    fig.text(0.06, y, "Structures produced", fontsize=10, weight="bold", va="top")
    y -= 0.02
    rows = []
    for name, s in (qa.get("structures") or {}).items():
        mo = s.get("motion_mm") or {}
        rng = s.get("volume_range_cc") or [None, None]
        rows.append([name, _fmt(s.get("volume_median_cc")), f"{_fmt(rng[0])}–{_fmt(rng[1])}",
                     _fmt(mo.get("SI")), _fmt(mo.get("AP")), _fmt(mo.get("LR")),
                     str(len(s.get("vanished_phases") or [])) if not s.get("absent") else "all"])
    for name, e in (qa.get("envelopes") or {}).items():
        label = f"{name} (envelope of {e.get('source', '?')})"
        rows.append([label, _fmt(e.get("volume_cc")), "", "", "", "", ""])
    if rows:
        ax = fig.add_axes((0.06, y - 0.021 * (len(rows) + 1), 0.88, 0.021 * (len(rows) + 1)))
        ax.axis("off")
        t = ax.table(cellText=rows, colLabels=["ROI", "median cc", "range cc", "SI mm", "AP mm", "LR mm",
                                               "empty phases"],
                     loc="upper left", cellLoc="left", colWidths=[0.3, 0.12, 0.16, 0.1, 0.1, 0.1, 0.12])
        t.auto_set_font_size(False)
        t.set_fontsize(8)
        y -= 0.021 * (len(rows) + 1) + 0.02
    else:
        fig.text(0.08, y, "none", fontsize=8.5, va="top")
        y -= 0.03
    fig.text(0.06, y, "Motion: peak-to-peak range of the centroid over the phases (SI, AP, LR).", fontsize=7,
             va="top", style="italic")
    y -= 0.035

    skipped = {**(qa.get("skipped") or {}), **data.skipped}
    fig.text(0.06, y, "Structures skipped", fontsize=10, weight="bold", va="top")
    y -= 0.022
    for name, why in skipped.items() or [("none", "")]:
        fig.text(0.08, y, f"{name}: {why}" if why else name, fontsize=8, va="top", wrap=True)
        y -= 0.02
    y -= 0.015
    warnings = [str(w) for w in qa.get("warnings") or []]
    fig.text(0.06, y, f"QA warnings ({len(warnings)})", fontsize=10, weight="bold", va="top",
             color="#b00000" if warnings else "black")
    y -= 0.022
    for w in warnings[:25] or ["none"]:
        fig.text(0.08, y, ("• " + w) if warnings else w, fontsize=8, va="top",
                 color="#b00000" if warnings else "black", wrap=True)
        y -= 0.02
    if len(warnings) > 25:
        fig.text(0.08, y, f"… {len(warnings) - 25} more in qa.json", fontsize=8, va="top")
    fig.text(0.5, 0.05, "REVIEW BEFORE CLINICAL USE", fontsize=16, weight="bold", color="#b00000",
             ha="center")
    return fig


def _page_motion(data: ReportData) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=A4)
    _header(fig, data, 2, "Volume and motion per phase")
    structures = {k: v for k, v in (data.qa.get("structures") or {}).items() if not v.get("absent")}
    x = np.asarray(data.percents)
    n = max(1, len(structures))
    cols = 3
    rows = int(np.ceil(n / cols))
    gs = fig.add_gridspec(rows + 2, cols, left=0.09, right=0.95, top=0.9, bottom=0.06, hspace=0.75,
                          wspace=0.4, height_ratios=[1] * rows + [1.6, 1.6])
    for i, (name, s) in enumerate(structures.items()):
        ax = fig.add_subplot(gs[i // cols, i % cols])
        vol = np.asarray([np.nan if v is None else v for v in s["volume_cc"]], dtype=float)
        ax.plot(x, vol, "o-", color=data.colors.get(name, "k"), ms=3, lw=1)
        ax.set_title(f"{name} volume", fontsize=8)
        ax.set_xlabel("phase (%)", fontsize=7)
        ax.set_ylabel("cc", fontsize=7)
        ax.tick_params(labelsize=6)
        lo, hi = np.nanmin(vol), np.nanmax(vol)
        pad = max(0.05 * hi, 1e-3)
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    target = data.target
    s = structures.get(target or "")
    ax_c = fig.add_subplot(gs[rows, :])
    ax_l = fig.add_subplot(gs[rows + 1, :2])
    if s is None:
        for ax in (ax_c, ax_l):
            ax.text(0.5, 0.5, "no target structure", ha="center", va="center", transform=ax.transAxes)
            ax.axis("off")
        return fig
    cents = np.array([[np.nan] * 3 if c is None else c for c in s["centroid_mm"]], dtype=float)  # z, y, x mm
    rel = cents - np.nanmean(cents, axis=0)
    # patient directions: SI + superior (z), AP + anterior (-y), LR + left (x)
    series = {"SI (+ superior)": rel[:, 0], "AP (+ anterior)": -rel[:, 1], "LR (+ left)": rel[:, 2]}
    for (label, vals), col in zip(series.items(), ("#d62728", "#1f77b4", "#2ca02c"), strict=True):
        ax_c.plot(x, vals, "o-", ms=3, lw=1.2, color=col, label=label)
    ax_c.axhline(0, color="0.7", lw=0.5)
    ax_c.set_title(f"{target} centroid per phase, relative to its mean", fontsize=9)
    ax_c.set_xlabel("phase (%)", fontsize=8)
    ax_c.set_ylabel("mm", fontsize=8)
    ax_c.legend(fontsize=7, loc="best")
    ax_c.tick_params(labelsize=7)
    ap, si = -rel[:, 1], rel[:, 0]
    ok = ~np.isnan(ap) & ~np.isnan(si)
    order = np.flatnonzero(ok)
    loop = np.append(order, order[:1]) if order.size else order
    ax_l.plot(ap[loop], si[loop], "-", color=data.colors.get(target or "", "k"), lw=1)
    ax_l.scatter(ap[ok], si[ok], s=14, color=data.colors.get(target or "", "k"), zorder=3)
    for p in order:
        ax_l.annotate(f"{data.percents[p]:g}%", (ap[p], si[p]), fontsize=6, xytext=(3, 3),
                      textcoords="offset points")
    ax_l.set_aspect("equal", adjustable="datalim")
    ax_l.set_xlabel("AP (mm, + anterior)", fontsize=8)
    ax_l.set_ylabel("SI (mm, + superior)", fontsize=8)
    ax_l.set_title(f"{target} SI–AP loop", fontsize=9)
    ax_l.tick_params(labelsize=7)
    mo = s.get("motion_mm") or {}
    fig.text(0.7, 0.2, "\n".join([f"{target} motion (peak-to-peak)"]
                                 + [f"{a}: {_fmt(mo.get(a))} mm" for a in ("SI", "AP", "LR", "3D")]),
             fontsize=8, va="top")
    return fig


def _page_overlays(data: ReportData) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=A4)
    _header(fig, data, 3, "Contours at end-inhale and end-exhale; envelope on the reference")
    gs = fig.add_gridspec(3, 3, left=0.03, right=0.97, top=0.92, bottom=0.1, hspace=0.25, wspace=0.05)
    labels = {data.inhale: "end-inhale", data.exhale: "end-exhale"}
    for r, p in enumerate((data.inhale, data.exhale)):
        for c, plane in enumerate(data.phase_views[p]):
            ax = fig.add_subplot(gs[r, c])
            draw_plane(ax, plane, data.colors, title=f"{labels[p]} ({data.percents[p]:g} %) "
                                                     f"{plane.plane}, {plane.where}")
    phase_colors = _phase_colors(len(data.percents))
    styles = {f"P{p}": "solid" for p in range(len(data.percents))}
    colors = {**data.colors, **{f"P{p}": phase_colors[p] for p in range(len(data.percents))}}
    if data.envelope:
        styles[data.envelope] = "dashed"
    for c, plane in enumerate(data.reference_views):
        ax = fig.add_subplot(gs[2, c])
        draw_plane(ax, plane, colors, styles,
                   title=f"{data.envelope or 'envelope'} on {data.reference_kind}, {plane.plane}")
    names = [n for n in data.colors if any(n in v.contours for vs in data.phase_views.values() for v in vs)]
    _legend(fig, names, data.colors, 0.655)
    extra = [(f"{data.target} {pc:g} %", phase_colors[i], "solid") for i, pc in enumerate(data.percents)]
    _legend(fig, [data.envelope] if data.envelope else [], data.colors, 0.06, {data.envelope or "": "dashed"},
            extra)
    return fig


def _phase_colors(n: int) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["plasma"]
    return [to_hex(cmap(0.1 + 0.8 * i / max(1, n - 1))) for i in range(n)]


def _page_strip(data: ReportData) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=A4)
    _header(fig, data, 4, f"Coronal slice through {data.target or 'the target'} in every phase")
    n = len(data.strip)
    cols = 5 if n > 6 else max(1, min(n, 3))
    rows = int(np.ceil(n / cols))
    gs = fig.add_gridspec(rows, cols, left=0.03, right=0.97, top=0.9, bottom=0.12, hspace=0.15, wspace=0.05)
    flagged = _flagged_phases(data)
    styles = {data.envelope: "dashed"} if data.envelope else {}
    for p, plane in enumerate(data.strip):
        ax = fig.add_subplot(gs[p // cols, p % cols])
        title = f"{data.percents[p]:g} %"
        if data.target and not plane.contours.get(data.target, np.zeros(1, bool)).any():
            title += " (no contour here)"
        draw_plane(ax, plane, data.colors, styles, title=title)
        if p in flagged:
            ax.set_title(title + " — " + flagged[p], fontsize=7, color="#b00000")
            for sp in ax.spines.values():
                sp.set_edgecolor("#b00000")
                sp.set_linewidth(2)
    where = data.strip[0].where if data.strip else ""
    fig.text(0.5, 0.93, f"same coronal plane ({where}) in every phase", fontsize=8, ha="center")
    _legend(fig, [n for n in (data.target, data.envelope) if n], data.colors, 0.08, styles)
    return fig


def _flagged_phases(data: ReportData) -> dict[int, str]:
    s = (data.qa.get("structures") or {}).get(data.target or "") or {}
    out = {int(p): "empty" for p in s.get("vanished_phases") or []}
    out.update({int(p): "jump" for p in s.get("jump_phases") or []})
    return out


def figures(data: ReportData) -> list[Any]:
    """The four pages as matplotlib Figures (no pyplot state)."""
    return [_page_summary(data), _page_motion(data), _page_overlays(data), _page_strip(data)]


@dataclass
class ReportFiles:
    pdf: Path
    pages: list[Path]
    seconds: float


def render(data: ReportData, out_dir: Path, dpi: int = 110) -> ReportFiles:
    """``out_dir/report.pdf`` (4 A4 pages, vector) and ``out_dir/page-<n>.png`` at ``dpi``; file names carry
    no patient data. Written to temporary names and renamed, so a reader never sees half a report."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_pdf import PdfPages

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = figures(data)
    pdf = out_dir / PDF_NAME
    tmp = out_dir / f".{PDF_NAME}.tmp"
    # no creation date: the same result gives the same bytes (its Encapsulated PDF keeps its UID)
    meta = {"Title": f"itvnode QA report {data.study_key}", "Creator": "itvnode", "Subject": REVIEW,
            "CreationDate": None}
    with PdfPages(tmp, metadata=meta) as pp:
        for f in figs:
            pp.savefig(f)
    tmp.replace(pdf)
    pages = []
    for i, f in enumerate(figs, 1):
        png = out_dir / f"page-{i}.png"
        tmp_png = out_dir / f".page-{i}.png.tmp"
        f.savefig(tmp_png, dpi=dpi, format="png")
        tmp_png.replace(png)
        pages.append(png)
    secs = time.perf_counter() - t0
    log.info("study %s: QA report rendered in %.2f s (%d pages)", data.study_key, secs, len(figs))
    return ReportFiles(pdf, pages, secs)

"""Evaluation tables: structure x phase rows, envelopes, median [IQR] with inf, CSV / Markdown / PNG."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from models.evaluation import figures, scores, shapes, worst_slices


def _box(shape: tuple[int, ...], sl: tuple[slice, ...]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[sl] = True
    return m


def test_rows_summary_and_files(tmp_path: Path) -> None:
    shape = (2, 6, 10, 10)
    truth = {"Lung_L": _box(shape, np.s_[:, 1:5, 2:8, 2:8])}
    pred = {"Lung_L": truth["Lung_L"].copy()}
    pred["Lung_L"][1, 1:5, 2:8, 2:5] = False  # phase 2: half of the structure
    env_truth = {"ITV": np.asarray(truth["Lung_L"].any(axis=0))}
    rows = scores.evaluate_study(
        "s1",
        "adapted",
        pred,
        {**truth, "Heart": truth["Lung_L"]},
        (2.0, 1.0, 1.0),
        [0.0, 50.0],
        {"ITV": np.any(pred["Lung_L"], axis=0)},
        env_truth,
        {"Heart": "SAM 3 weights not configured"},
    )
    by = {(r.structure, r.phase): r for r in rows}
    assert by[("Lung_L", "P0")].dice == 1.0 and by[("Lung_L", "P0")].hd95 == 0.0
    assert by[("Lung_L", "P50")].dice == pytest.approx(2 * 72 / (144 + 72))  # 2|A&B|/(|A|+|B|)
    assert by[("ITV", "envelope")].dice == 1.0
    heart = by[("Heart", "P0")]
    assert heart.dice == 0.0 and math.isinf(heart.hd95) and "not configured" in heart.note

    summary = {(s.variant, s.structure): s for s in scores.summarise(rows)}
    med, q1, q3 = summary[("adapted", "Lung_L")].stats["dice"]
    assert (q1, med, q3) == pytest.approx(tuple(np.percentile([1.0, 2 / 3], [25, 50, 75])))
    assert summary[("adapted", "Heart")].stats["hd95"] == (math.inf, math.inf, math.inf)

    scores.write_rows_csv(rows, tmp_path / "m.csv")
    scores.write_summary_csv(list(summary.values()), tmp_path / "s.csv")
    got = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert len(got) == len(rows) and got[-1]["phase"] == "envelope"
    md = scores.markdown_report(list(summary.values()), "t", {"model": "x"}, ["b.png"])
    assert "| Lung_L | 2 |" in md and "inf [inf, inf]" in md and "![b](b.png)" in md
    assert figures.plot_boxplots(rows, tmp_path / "b.png").stat().st_size > 1000
    w = worst_slices.worst_error_slice("Lung_L", "s1", "adapted", "P50", np.zeros((6, 10, 10)),
                                       pred["Lung_L"][1], truth["Lung_L"][1], (2.0, 1.0, 1.0))
    assert w is not None
    assert figures.plot_worst_slices([w], tmp_path / "o.png").stat().st_size > 1000


def test_quantiles_with_inf() -> None:
    assert scores._quantiles(np.array([1.0, 2.0, np.inf])) == (1.5, 2.0, math.inf)
    assert scores._quantiles(np.array([np.inf, np.inf])) == (math.inf, math.inf, math.inf)


def _rows_with_one_empty_prediction() -> list[scores.MetricRow]:
    shape = (4, 6, 12, 12)
    truth = {"GTVp": _box(shape, np.s_[:, 2:4, 4:8, 4:8])}
    pred = {"GTVp": truth["GTVp"].copy()}
    pred["GTVp"][2] = False  # phase 3 of 4: nothing predicted
    return scores.evaluate_study("s", "adapted", pred, truth, (3.0, 1.0, 1.0), [0, 25, 50, 75])


def test_boxplot_annotates_infinite_values() -> None:
    """inf cannot be drawn: the figure says how many values were infinite and why."""
    rows = _rows_with_one_empty_prediction()
    assert sum(math.isinf(r.hd95) for r in rows) == 1
    fig = figures.boxplot_figure(rows)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    hd95_panel = [t.get_text() for t in fig.axes[1].texts]
    assert any("∞ ×1/4" in t and "1 empty prediction" in t for t in hd95_panel), texts
    assert not fig.axes[0].texts  # Dice is 0 there, a finite value drawn in the box
    assert "not drawn" in " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_worst_slice_is_the_largest_error_area_and_is_drawn() -> None:
    """Not a tie at Dice 0 on a speck: the panel of each structure shows its biggest FP + FN area."""
    truth = _box((8, 20, 20), np.s_[1:7, 4:16, 4:16])
    pred = truth.copy()
    pred[0, 0, 0] = True  # a speck on a slice with no truth (Dice 0 there: the old choice)
    pred[5, 4:16, 4:10] = False  # the big miss: half of slice 5
    fp, fn = worst_slices.error_per_slice(pred, truth)
    assert (fp[0], fn[5]) == (1, 72)
    hu = np.full((8, 20, 20), -800.0)
    z_mm = [10.0 + 3 * k for k in range(8)]
    w = worst_slices.worst_error_slice("Heart", "s", "adapted", "P50", hu, pred, truth, (3.0, 2.0, 1.5), z_mm)
    assert w is not None and (w.z, w.fn_px, w.fp_px, w.z_mm) == (5, 72, 0, 25.0)
    assert w.error_mm2 == 72 * 2.0 * 1.5
    fig = figures.worst_slices_figure([w])
    ax = fig.axes[0]
    assert "Heart" in ax.get_title() and "P50" in ax.get_title() and "z = 25.0 mm" in ax.get_title()
    assert "FN 2.2 cm²" in ax.get_title()  # 72 px x 3 mm² = 216 mm²
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["truth", "prediction", "missed (false negative)", "extra (false positive)"]
    assert {"R", "L", "A", "P", "10 mm"} <= {t.get_text() for t in ax.texts}  # 30 mm wide: a 1 cm bar
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_shapes_and_motion_amplitude() -> None:
    """Volumes in cm³ and peak-to-peak centroid motion in mm along the right axes."""
    m = np.zeros((3, 10, 10, 10), dtype=bool)
    for p, dz in enumerate((0, 2, 4)):
        m[p, 2 + dz : 4 + dz, 3:5, 3:5] = True  # moves 2 slices per phase: SI only
    rows = shapes.shape_rows("s", "truth", {"GTVp": m}, (2.5, 1.0, 0.5), [0, 50, 100], {"ITV": m.any(axis=0)})
    assert rows[0].volume_cc == 8 * 2.5 * 1.0 * 0.5 / 1000
    amp = shapes.motion_amplitudes(rows)[("s", "truth", "GTVp")]
    assert (amp["SI"], amp["AP"], amp["LR"]) == (4 * 2.5, 0.0, 0.0)
    assert rows[-1].phase == "envelope" and rows[-1].volume_cc == pytest.approx(24 * 1.25 / 1000)

"""Evaluation tables: structure x phase rows, envelopes, median [IQR] with inf, CSV / Markdown / PNG."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from models import evaluation as ev


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
    rows = ev.evaluate_study(
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

    summary = {(s.variant, s.structure): s for s in ev.summarise(rows)}
    med, q1, q3 = summary[("adapted", "Lung_L")].stats["dice"]
    assert (q1, med, q3) == pytest.approx(tuple(np.percentile([1.0, 2 / 3], [25, 50, 75])))
    assert summary[("adapted", "Heart")].stats["hd95"] == (math.inf, math.inf, math.inf)

    ev.write_rows_csv(rows, tmp_path / "m.csv")
    ev.write_summary_csv(list(summary.values()), tmp_path / "s.csv")
    got = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert len(got) == len(rows) and got[-1]["phase"] == "envelope"
    md = ev.markdown_report(list(summary.values()), "t", {"model": "x"}, ["b.png"])
    assert "| Lung_L | 2 |" in md and "inf [inf, inf]" in md and "![b](b.png)" in md
    assert ev.plot_boxplots(rows, tmp_path / "b.png").stat().st_size > 1000
    items = [("t", np.zeros((10, 10)), truth["Lung_L"][0, 2], pred["Lung_L"][1, 2])]
    assert ev.plot_overlays(items, tmp_path / "o.png").stat().st_size > 1000


def test_quantiles_with_inf_and_worst_slices() -> None:
    assert ev._quantiles(np.array([1.0, 2.0, np.inf])) == (1.5, 2.0, math.inf)
    assert ev._quantiles(np.array([np.inf, np.inf])) == (math.inf, math.inf, math.inf)
    truth = _box((3, 4, 4), np.s_[:, :2, :2])
    pred = truth.copy()
    pred[1] = False
    pred[2, 3, 3] = True
    worst = ev.worst_slices(np.zeros((3, 4, 4)), pred, truth, k=2)
    assert [z for z, _ in worst] == [1, 2] and worst[0][1] == 0.0

"""``itvnode evaluate --dicom TRUTH --predicted PRED``: RTSTRUCTs from any source scored against hand-computed
values on a phantom CT with anisotropic voxels (dz, dy, dx) = (2, 5, 7) mm, so that ignoring the spacing or
swapping two axes changes every distance.

Truth (our writer, one RTSTRUCT per phase) and predictions (our writer, combined layout; rt-utils, one per
phase) are boxes on the phantom's phase series:

- Lung_L: the prediction is shifted by 2 columns (+x)          -> Dice 14/16, HD95 2 * dx = 14 mm
- Heart:  enlarged by one row on each side (y)                  -> Dice 24/26, HD95 dy = 5 mm; on P50 the
          slice z=7 is missing from the prediction (the big miss the worst-slice figure must show)
- Lung_R: an empty prediction                                   -> Dice 0, HD95 inf, counted as such
- GTVp:   moves 2 slices per phase (SI amplitude 3 * 2 * dz = 12 mm); the prediction adds one far voxel
          91 mm (13 columns) beside the box -> HD95 0 (a 95th percentile ignores it), MSD = its distance to
          the box / 289 surface voxels
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
SPEC = dict(n_phases=4, shape=(16, 64, 48), pixel_spacing=(5.0, 7.0), slice_thickness=2.0)
P, Z, Y, X = 4, 16, 64, 48
DZ, DY, DX = 2.0, 5.0, 7.0


def truth_masks() -> dict[str, np.ndarray]:
    m = {k: np.zeros((P, Z, Y, X), dtype=bool) for k in ("Lung_L", "Lung_R", "Heart", "GTVp")}
    m["Lung_L"][:, 4:12, 20:40, 4:20] = True
    m["Lung_R"][:, 2:14, 10:30, 30:44] = True
    m["Heart"][:, 4:12, 44:56, 26:40] = True
    for p in range(P):
        m["GTVp"][p, 2 + 2 * p : 6 + 2 * p, 24:32, 22:28] = True
    return m


def predicted_masks() -> dict[str, np.ndarray]:
    t = truth_masks()
    pred = {k: np.zeros_like(v) for k, v in t.items()}
    pred["Lung_L"][:, 4:12, 20:40, 6:22] = True
    pred["Heart"][:, 4:12, 43:57, 26:40] = True
    pred["Heart"][2, 7] = False  # P50: one whole slice missed
    pred["GTVp"] = t["GTVp"].copy()
    pred["GTVp"][:, 4, 28, 40] = True  # 13 columns right of the box's last column (x = 27)
    return pred


def near(x: float) -> Any:
    """CSV values carry 6 significant digits."""
    return pytest.approx(x, rel=1e-5, abs=1e-9)


def _cli(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
    env.update(ITVNODE_DATA_DIR=str(tmp / "data"), ITVNODE_EXPECTED_PHASES=str(P))
    return subprocess.run([sys.executable, "-m", "itvnode.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def case(
    phantom_dicom_factory: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    from service.dicomio.rtstruct import build_rtstructs, write_rtstruct
    from service.dicomio.volume import read_series

    ps = phantom_dicom_factory("siemens", **SPEC)
    root = tmp_path_factory.mktemp("evaluate_predicted")
    truth_dir, pred_dir = root / "truth", root / "pred"
    for s in ps.phases:
        shutil.copytree(s.folder, truth_dir / s.folder.name)
    geoms = [read_series(s.files)[1] for s in ps.phases]
    assert geoms[0].spacing == (DZ, DY, DX)
    percents = [float(s.percent) for s in ps.phases if s.percent is not None]
    kw: dict[str, Any] = dict(study_key="k", identifiers={}, geometries=geoms, phase_percents=percents)
    for ds in build_rtstructs(masks=truth_masks(), envelopes={}, layout="per-series", **kw):
        write_rtstruct(ds, truth_dir / "rtstruct")
    for ds in build_rtstructs(masks=predicted_masks(), envelopes={}, layout="combined", **kw):
        write_rtstruct(ds, pred_dir)
    return {"series": ps, "truth": truth_dir, "pred": pred_dir, "root": root, "percents": percents,
            "geoms": geoms}


def _rows(report: Path) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["structure"], r["phase"]): r for r in csv.DictReader((report / "metrics.csv").open())}


def test_predicted_rtstructs_scored_against_hand_computed_values(case: dict[str, Any]) -> None:
    report = case["root"] / "report"
    r = _cli("evaluate", "--dicom", str(case["truth"]), "--predicted", str(case["pred"]), "--out",
             str(report), tmp=case["root"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(report)
    assert {k[1] for k in rows} == {"P0", "P25", "P50", "P75", "envelope"}
    for k, ph in enumerate(("P0", "P25", "P50", "P75")):
        lung = rows[("Lung_L", ph)]
        assert float(lung["dice"]) == near(14 / 16)
        assert float(lung["hd95"]) == near(2 * DX)  # 10 if x and y were swapped, 2 without spacing
        assert float(rows[("Lung_R", ph)]["dice"]) == 0.0 and math.isinf(float(rows[("Lung_R", ph)]["hd95"]))
        gtv = rows[("GTVp", ph)]
        assert float(gtv["dice"]) == near(2 * 192 / (192 + 193))
        assert float(gtv["hd95"]) == 0.0
        far = math.hypot(max(0, 2 + 2 * k - 4) * DZ, 13 * DX)  # the far voxel (z 4) to the nearest face
        assert float(gtv["msd"]) == near(far / (144 + 145))  # 144 + 145 surface voxels
    for ph in ("P0", "P25", "P75"):
        assert float(rows[("Heart", ph)]["dice"]) == near(24 / 26)
        assert float(rows[("Heart", ph)]["hd95"]) == near(DY)
    itv = rows[("ITV", "envelope")]  # union over phases of GTVp: z 2..12, plus the far voxel
    assert int(itv["truth_voxels"]) == 10 * 8 * 6 and int(itv["predicted_voxels"]) == 10 * 8 * 6 + 1

    # the physicist's numbers: volumes, motion, worst slices
    motion = {(m["source"], m["structure"]): m for m in csv.DictReader((report / "motion.csv").open())}
    assert float(motion[("truth", "GTVp")]["si_mm"]) == near(3 * 2 * DZ)
    assert float(motion[("truth", "GTVp")]["lr_mm"]) == near(0.0)
    assert float(motion[("predicted", "GTVp")]["si_mm"]) == near(3 * 2 * DZ * 192 / 193)
    vols = [v for v in csv.DictReader((report / "volumes.csv").open())
            if v["structure"] == "Heart" and v["phase"] == "P0"]
    cc = {v["source"]: float(v["volume_cc"]) for v in vols}
    assert cc["truth"] == near(8 * 12 * 14 * DZ * DY * DX / 1000)
    assert cc["predicted"] == near(8 * 14 * 14 * DZ * DY * DX / 1000)
    worst = {w["structure"]: w for w in csv.DictReader((report / "worst_slices.csv").open())}
    assert (worst["Heart"]["phase"], worst["Heart"]["z_index"]) == ("P50", "7")  # the big miss
    assert float(worst["Heart"]["fn_mm2"]) == near(12 * 14 * DY * DX)
    assert float(worst["Lung_R"]["fn_mm2"]) == near(20 * 14 * DY * DX)
    for png in ("boxplots.png", "worst_slices.png", "volumes.png", "motion.png", "itv.png"):
        assert (report / png).stat().st_size > 10_000, png
    md = (report / "report.md").read_text()
    assert "| Lung_L | 4 | 0.875 [0.875, 0.875]" in md and "RANDOM" not in md
    assert "Dice" in r.stdout and "0.968" in r.stdout  # the paper-style table and its reference, printed


def test_training_volume_flagged_and_excluded(case: dict[str, Any]) -> None:
    """A phase whose CT hash is in the adapter's training.json is flagged and left out of the summary."""
    import json

    from models.training.dataset import image_digest
    from service.dicomio.volume import read_series

    ps = case["series"]
    hu, g = read_series(ps.phases[1].files)  # P25, read as `itvnode train --dicom` reads it
    adapter = case["root"] / "adapter"
    adapter.mkdir()
    manifest = {"data": {"train": [{"name": "x/P25", "image_sha256": image_digest(hu, g.spacing)}],
                         "validation": []}}
    (adapter / "training.json").write_text(json.dumps(manifest))
    for include, n in ((False, 3), (True, 4)):
        report = case["root"] / f"report_leak_{include}"
        r = _cli("evaluate", "--dicom", str(case["truth"]), "--predicted", str(case["pred"]), "--adapter",
                 str(adapter), "--out", str(report), *(["--include-training"] if include else []),
                 tmp=case["root"])
        assert r.returncode == 0, r.stderr[-3000:]
        rows = list(csv.DictReader((report / "metrics.csv").open()))
        flagged = {(x["phase"], x["training"]) for x in rows if x["training"]}
        assert flagged == {("P25", "train"), ("envelope", "train")}
        summary = {s["structure"]: s for s in csv.DictReader((report / "summary.csv").open())}
        assert int(summary["Lung_L"]["n"]) == n
        md = (report / "report.md").read_text()
        assert "P25 (train)" in md and ("INCLUDED" in md) == include
        if not include:
            assert "ITV" not in summary  # its only envelope used a training phase


def test_rt_utils_prediction_independent_writer(case: dict[str, Any]) -> None:
    """Contours written by rt-utils (its own ROI names, mapped through --roi-map) are scored exactly as
    plastimatch, an independent reader, rasterises them.

    Found here: rt-utils 1.2.7 swaps the two PixelSpacing values on non-square pixels (5 x 7 mm): the box
    it writes is 27 rows x 11 columns instead of 20 x 16 (plastimatch agrees), so its Dice is ~0.39 —
    the evaluation reports what the file holds, not what its writer meant."""
    import nrrd
    from rt_utils import RTStructBuilder

    from models.metrics import compare

    pred_dir = case["root"] / "pred_rtutils"
    pred_dir.mkdir()
    truth = truth_masks()
    for p, s in enumerate(case["series"].phases):
        rs = RTStructBuilder.create_new(dicom_series_path=str(s.folder))
        rs.add_roi(mask=np.transpose(truth["Lung_L"][p], (1, 2, 0)), name="lung left", color=[0, 0, 255])
        rs.save(str(pred_dir / f"rt_utils_{p}.dcm"))
    roi_map = case["root"] / "roi_map.yaml"
    roi_map.write_text("'lung left': Lung_L\n")
    report = case["root"] / "report_rtutils"
    r = _cli("evaluate", "--dicom", str(case["truth"]), "--predicted", str(pred_dir), "--roi-map",
             str(roi_map), "--label", "rt-utils", "--out", str(report), tmp=case["root"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(report)
    out = case["root"] / "plastimatch"
    cmd = ["plastimatch", "convert", "--input", str(pred_dir / "rt_utils_0.dcm"), "--referenced-ct",
           str(case["series"].phases[0].folder), "--output-prefix", str(out), "--prefix-format", "nrrd"]
    pm = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert pm.returncode == 0, pm.stdout[-2000:] + pm.stderr[-2000:]
    data, header = nrrd.read(str(out / "lung left.nrrd"))
    peer = np.transpose(np.asarray(data), (2, 1, 0)).astype(bool)  # nrrd (x, y, z) -> (z, y, x)
    expected = compare(peer, truth["Lung_L"][0], (DZ, DY, DX))
    lung = rows[("Lung_L", "P0")]
    assert int(lung["predicted_voxels"]) == int(peer.sum())
    assert float(lung["dice"]) == near(expected["dice"]) and float(lung["hd95"]) == near(expected["hd95"])
    assert "no ROI mapped" in rows[("Heart", "P0")]["note"]

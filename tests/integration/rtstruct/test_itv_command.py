"""``itvnode itv`` (a subprocess) on per-phase contours written by an independent writer, read back by peers.

Input: the 10-phase phantom (24 x 128 x 128, 2 mm pixels, 8 mm tumour) with

- the TCIA 4D-Lung layout: one RTSTRUCT per phase series, written by rt-utils 1.2.7 (``RTStructBuilder``)
  with the site-style names ``GTV`` and ``Heart``;
- our combined layout (``GTVp^P40`` ..., ``ITV``), as ``itvnode segment`` writes it.

Our output is rasterised by plastimatch and checked with dciodvfy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from rtstruct_study import Study

from service.dicomio.rtstruct import roi_name
from tests.support.rtstruct_peers import dciodvfy, dice, plastimatch_masks

REPO = Path(__file__).resolve().parents[3]


def _require_peers() -> None:
    for tool in ("plastimatch", "dciodvfy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (tests/peers.sh)")


def run_itv(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "itvnode.cli", "itv", str(src), "--out", str(out), *extra],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    print(f"itvnode itv {src.name}: exit {res.returncode} in {time.perf_counter() - t0:.1f} s")
    return res


def _ct_folder(study: Study, dest: Path) -> Path:
    """The phase series and AVG/MIP of the phantom, copied (the session's phantom files are shared)."""
    for s in [*study.series.phases, *study.series.references]:
        shutil.copytree(s.folder, dest / s.folder.name)
    return dest


def _rtutils_per_phase(study: Study, dest: Path, masks: dict[str, np.ndarray]) -> None:
    """One rt-utils RTSTRUCT per phase series: ROI name -> bool (P, Z, Y, X); empty phases get no ROI."""
    from rt_utils import RTStructBuilder

    for p, s in enumerate(study.series.phases):
        rs = RTStructBuilder.create_new(dicom_series_path=str(dest / s.folder.name))
        for name, m in masks.items():
            if m[p].any():
                rs.add_roi(mask=np.transpose(m[p], (1, 2, 0)), name=name)  # rt-utils: (rows, cols, slices)
        rs.save(str(dest / f"rs_phase{p}.dcm"))


def _only(out: Path) -> Path:
    (rs,) = sorted(out.glob("RS.*.dcm"))
    return rs


@pytest.fixture(scope="module")
def tcia(study10: Study, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The TCIA layout, run once: rt-utils RTSTRUCTs of the phantom's GTVp (as ``GTV``) and Heart."""
    _require_peers()
    root = tmp_path_factory.mktemp("itv_tcia")
    src = _ct_folder(study10, root / "in")
    _rtutils_per_phase(study10, src, {"GTV": study10.gt.masks["GTVp"], "Heart": study10.gt.masks["Heart"]})
    res = run_itv(src, root / "out")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    return {"src": src, "out": root / "out", "res": res, "root": root}


def test_tcia_layout_itv_is_the_union_of_the_phase_gtvs(study10: Study, tcia: dict[str, Any]) -> None:
    """The ITV read back by plastimatch is the union of the input GTVs.

    rt-utils traces voxel centres, so the edge voxels of its contours lie exactly on the polygon and each
    rasteriser decides them its own way: plastimatch reads rt-utils' GTV one voxel further towards +x than
    our reader and drops its one-voxel end slices (both at Dice ~0.85 against the truth). Hence: exact
    against the union as our reader places the inputs, within one voxel of the union plastimatch reads.
    """
    from scipy.ndimage import binary_dilation

    from service.dicomio.rtstruct_read import rtstruct_masks

    gt, root = study10.gt, tcia["root"]
    rs = _only(tcia["out"])
    phase0 = tcia["src"] / study10.series.phases[0].folder.name
    got = plastimatch_masks(rs, phase0, root / "pl_out")
    itv = got["ITV"]
    union_pl = np.zeros(gt.itv.shape, dtype=bool)
    union_ours = np.zeros(gt.itv.shape, dtype=bool)
    rows = []
    for p, s in enumerate(study10.series.phases):
        inp = tcia["src"] / f"rs_phase{p}.dcm"
        pl = plastimatch_masks(inp, tcia["src"] / s.folder.name, root / f"pl_{p}")["GTV"]
        ours = rtstruct_masks(inp, study10.geometries[p])["GTV"]
        union_pl |= pl
        union_ours |= ours
        want = gt.masks["GTVp"][p]
        rows.append((p, int(want.sum()), int(pl.sum()), dice(want, pl), int(ours.sum()), dice(want, ours)))
    print("\nrt-utils GTV per phase: truth voxels | plastimatch voxels, Dice vs truth | ours voxels, Dice")
    for r in rows:
        print(f"  phase {r[0]}: {r[1]:4d} | {r[2]:4d} {r[3]:.4f} | {r[4]:4d} {r[5]:.4f}")
    print(f"ITV (plastimatch on our output) {int(itv.sum())} voxels; union of the inputs: ours "
          f"{int(union_ours.sum())}, plastimatch {int(union_pl.sum())}; truth {int(gt.itv.sum())}; "
          f"Dice vs truth {dice(gt.itv, itv):.4f}")
    assert np.array_equal(itv, union_ours)
    one_voxel = np.ones((3, 3, 3), dtype=bool)
    assert not (itv & ~binary_dilation(union_pl, one_voxel)).any()
    assert not (union_pl & ~binary_dilation(itv, one_voxel)).any()
    # as good as rt-utils' centre-traced contours allow against the phantom's truth
    assert dice(gt.itv, itv) >= 0.85


def test_tcia_layout_output_is_valid_and_references_the_phases(study10: Study, tcia: dict[str, Any]) -> None:
    rs = _only(tcia["out"])
    errors, _ = dciodvfy(rs)
    assert errors == []
    ds = pydicom.dcmread(rs)
    refd = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence
    assert {s.series_instance_uid for s in study10.series.phases} <= {s.SeriesInstanceUID for s in refd}
    names = [r.ROIName for r in ds.StructureSetROISequence]
    assert names == [roi_name(n, p) for n in ("Heart", "GTVp") for p in study10.gt.phase_percents] + ["ITV"]
    assert {r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence} == {"SEMIAUTOMATIC"}
    qa = json.loads((tcia["out"] / "qa.json").read_text())
    assert qa["missing"] == {} and qa["removed_temporal"] == {} and qa["warnings"] == []
    assert len(qa["rtstructs"]) == 10 and len(qa["phases"]) == 10
    assert {r["roi"]: r["structure"] for r in qa["rois"]} == {"GTV": "GTVp", "Heart": "Heart"}
    assert sorted(len(r["phases"]) for r in qa["rois"]) == [1] * 20  # each RTSTRUCT on its own phase only
    print("\n" + tcia["res"].stdout.strip().splitlines()[-1])


def test_one_phase_artifact_removed_and_missing_phase_reported(
    study10: Study, tmp_path: Path, tcia: dict[str, Any]
) -> None:
    """A blob drawn on one phase only is removed by the temporal filter and named in qa.json; a phase
    without a GTV is reported as missing, its ROI kept empty, and the rest still makes the ITV."""
    gt = study10.gt
    gtv = gt.masks["GTVp"].copy()
    gtv[3, 10:14, 30:36, 40:46] = True  # a 4 x 6 x 6 voxel blob, in phase 30 % only, far from the tumour
    assert not (gt.itv[10:14, 30:36, 40:46]).any()
    gtv[7] = False  # phase 70 %: no GTV drawn
    src = _ct_folder(study10, tmp_path / "in")
    _rtutils_per_phase(study10, src, {"GTV": gtv})
    res = run_itv(src, tmp_path / "out")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    qa = json.loads((tmp_path / "out" / "qa.json").read_text())
    assert qa["removed_temporal"] == {"GTVp": {"30": 1}}
    assert qa["missing"] == {"GTVp": [70.0]}
    assert any("temporal filter removed 1 component(s) on phase 30 %" in w for w in qa["warnings"])
    assert "WARNING: GTVp: no input contour on phase(s) 70 %" in res.stderr
    rs = _only(tmp_path / "out")
    got = plastimatch_masks(rs, src / study10.series.phases[3].folder.name, tmp_path / "pl")
    assert not got["GTVp^P30"][10:14, 30:36, 40:46].any()
    assert not got["ITV"][10:14, 30:36, 40:46].any()
    assert "GTVp^P70" not in got or not got["GTVp^P70"].any()
    expected = gt.masks["GTVp"][[p for p in range(10) if p != 7]].any(axis=0)
    assert dice(expected, got["ITV"]) >= 0.85
    ds = pydicom.dcmread(rs)
    assert "GTVp^P70" in [r.ROIName for r in ds.StructureSetROISequence]
    assert "GTVp^P70 (no input contour)" in ds.StructureSetDescription
    assert dciodvfy(rs)[0] == []


def test_combined_layout_round_trips(study10: Study, written: dict[str, list[Path]], tmp_path: Path) -> None:
    """Our own combined RTSTRUCT (GTVp^P0 .. GTVp^P90, ITV, AVG/MIP referenced) in, the same contours out."""
    _require_peers()
    gt = study10.gt
    src = _ct_folder(study10, tmp_path / "in")
    shutil.copy2(written["combined"][0], src / "combined.dcm")
    outs = []
    for run in ("a", "b"):
        res = run_itv(src, tmp_path / run)
        assert res.returncode == 0, res.stdout + res.stderr[-3000:]
        outs.append(_only(tmp_path / run))
    assert outs[0].name == outs[1].name  # deterministic UIDs: same inputs, same objects
    assert outs[0].name != written["combined"][0].name
    qa = json.loads((tmp_path / "a" / "qa.json").read_text())
    assert qa["missing"] == {} and qa["removed_temporal"] == {}
    assert set(qa["unmapped_rois"]) == {"ITV"} | {roi_name("External", p) for p in gt.phase_percents}
    phase0 = src / study10.series.phases[0].folder.name
    got = plastimatch_masks(outs[0], phase0, tmp_path / "pl")
    for name in ("Lung_L", "Lung_R", "Heart", "GTVp"):
        want = gt.masks[name][0]
        assert dice(want, got[roi_name(name, 0)]) == 1.0, name
    assert int(got["ITV"].sum()) == int(gt.itv.sum()) and dice(gt.itv, got["ITV"]) == 1.0
    from service.dicomio.rtstruct_read import rtstruct_masks

    for p, g in enumerate(study10.geometries):  # every phase, with our reader (voxel centres, exact)
        back = rtstruct_masks(outs[0], g)
        assert np.array_equal(back["GTVp"], gt.masks["GTVp"][p]), p
    assert dciodvfy(outs[0])[0] == []


def test_errors_name_what_is_wrong(study10: Study, tcia: dict[str, Any], tmp_path: Path) -> None:
    """No phases; an RTSTRUCT referencing a series not in the folder; no ROI matching roi_map."""
    only_rs = tmp_path / "only_rs"
    only_rs.mkdir()
    shutil.copy2(tcia["src"] / "rs_phase0.dcm", only_rs)
    res = run_itv(only_rs, tmp_path / "o1")
    assert res.returncode == 1 and "no respiratory-phase series found" in res.stderr

    src = tmp_path / "foreign"
    shutil.copytree(tcia["src"], src)
    ds = pydicom.dcmread(src / "rs_phase4.dcm")
    refd = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence
    refd[0].SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.999"
    ds.save_as(src / "rs_phase4.dcm")
    res = run_itv(src, tmp_path / "o2")
    assert res.returncode == 1
    assert "rs_phase4.dcm references series 1.2.826.0.1.3680043.8.498.999" in res.stderr
    assert "not in the folder" in res.stderr

    roi_map = tmp_path / "roi_map.yaml"
    roi_map.write_text("'tumou?r': GTVp\n")
    res = run_itv(tcia["src"], tmp_path / "o3", "--roi-map", str(roi_map))
    assert res.returncode == 1
    assert "no ROI name matches roi_map" in res.stderr and "ROI names seen: GTV, Heart" in res.stderr
    assert not list((tmp_path / "o3").glob("RS.*"))

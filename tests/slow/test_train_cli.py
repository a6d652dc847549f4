"""``itvnode train`` then ``itvnode evaluate`` as a site runs them (subprocesses, files only): tiny random
SAM 3 in HF format written by ``itvnode testmodel``, a phantom written by the phantom writer, an adapter +
training.json + training.png, then a report with zero-shot and adapted side by side (the phantom was trained
on: flagged, kept with --include-training, and the report says the model is random)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HEADS = "mask_embedder,presence_head,scoring,pixel_decoder,instance_projection"


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "itvnode.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_train_then_evaluate_cli(tmp_path: Path) -> None:
    from itvnode.commands.phantom import write_phantom
    from models.phantom_spec import PhantomSpec

    spec = PhantomSpec.small(
        n_phases=4, shape=(16, 64, 64), pixel_spacing=(500 / 64, 500 / 64), slice_thickness=7.5
    )
    write_phantom(tmp_path / "phantom", spec)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
    env["ITVNODE_DATA_DIR"] = str(tmp_path / "data")
    tiny = tmp_path / "tiny"
    made = _cli("testmodel", str(tiny), env=env)
    assert made.returncode == 0, made.stderr[-3000:]
    assert "RANDOM" in made.stdout and (tiny / "RANDOM_WEIGHTS_NOT_A_TRAINED_MODEL.txt").is_file()
    adapter = tmp_path / "adapter"
    patient = f"phantom-{spec.digest()[:8]}"  # split group names: <patient>/P<percent>

    train = _cli(
        "train",
        "--out",
        str(adapter),
        "--phantom",
        str(tmp_path / "phantom"),
        "--sam3-dir",
        str(tiny),
        "--structures",
        "Lung",
        "--group-by-phase",
        "--val-groups",
        f"{patient}/P25,{patient}/P75",
        "--epochs",
        "6",
        "--steps-per-epoch",
        "25",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "5",
        "--max-grad-norm",
        "0",
        "--train-modules",
        HEADS,
        "--loss",
        '{"dice": 2, "focal": 1, "hard_pixels": 0.5}',
        "--mining-every",
        "25",
        "--mining-pool",
        "32",
        "--threads",
        "1",
        "--no-progress",
        env=env,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads(train.stdout)
    assert summary["steps"] == 150
    assert summary["val_dice_after"]["Lung"] > summary["val_dice_before"]["Lung"] + 0.3
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    manifest = json.loads((adapter / "training.json").read_text())
    assert manifest["base_model"]["trained"] is False  # the tiny model says what it is
    assert "RANDOM-INIT" in train.stderr  # logged loudly
    assert (adapter / "training.png").stat().st_size > 10_000  # loss + validation Dice per epoch
    assert all(v.get("image_sha256") for v in manifest["data"]["train"])
    assert manifest["data"]["sources"][0]["kind"] == "phantom"
    assert len(manifest["data"]["validation"]) == 2 and manifest["hyperparameters"]["train_modules"]

    report = tmp_path / "report"
    ev = _cli(
        "evaluate",
        "--out",
        str(report),
        "--phantom",
        str(tmp_path / "phantom"),
        "--sam3-dir",
        str(tiny),
        "--adapter",
        str(adapter),
        "--include-training",
        "--threads",
        "1",
        env=env,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    for name in (
        "report.md",
        "metrics.csv",
        "summary.csv",
        "boxplots.png",
        "worst_slices.png",
        "report.json",
    ):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    rows = list(csv.DictReader((report / "metrics.csv").open()))
    variants = {r["variant"] for r in rows}
    assert variants == {"zero-shot", "adapted"}
    per_phase = {(r["variant"], r["structure"]) for r in rows if r["phase"] != "envelope"}
    assert {("adapted", s) for s in ("External", "Lung_L", "Lung_R", "Heart", "GTVp")} <= per_phase
    assert any(r["structure"] == "ITV" and r["phase"] == "envelope" for r in rows)
    assert len([r for r in rows if r["variant"] == "adapted" and r["structure"] == "Lung_L"]) == 4
    md = (report / "report.md").read_text()
    assert "Dice zero-shot" in md and "Dice adapted" in md and "RANDOM-INIT" in md
    assert md.startswith("# itvnode evaluation\n\n> **WARNING: RANDOM-INIT TEST MODEL")
    # every phase was a training or validation volume of this adapter: flagged, kept on request
    assert {r["training"] for r in rows if r["phase"] != "envelope"} == {"train", "validation"}
    assert "INCLUDED in the summary" in md

    def median(variant: str, structure: str) -> float:
        vals = sorted(
            float(r["dice"]) for r in rows if r["variant"] == variant and r["structure"] == structure
        )
        return vals[len(vals) // 2]

    # External is a HU threshold (same in both variants, near-perfect on the phantom); lungs come from SAM 3
    assert median("adapted", "External") > 0.9 and median("zero-shot", "External") == median(
        "adapted", "External"
    )
    assert median("adapted", "Lung_R") > median("zero-shot", "Lung_R")


def test_evaluate_dicom_4dct_with_rtstruct_truth(tmp_path: Path) -> None:
    """A DICOM 4DCT folder with per-phase RTSTRUCTs (our writer): phases found as the node finds them, truth
    rasterised on the right phase (voxel counts equal the phantom's exact ground truth)."""
    from itvnode.commands.phantom import write_phantom
    from models.phantom_spec import PhantomSpec
    from models.phantom_truth import load_ground_truth
    from models.sam3.tiny import write_tiny_model
    from service.dicomio.rtstruct import build_rtstructs, write_rtstruct
    from service.dicomio.volume import read_series

    spec = PhantomSpec.small(
        n_phases=4, shape=(12, 64, 64), pixel_spacing=(500 / 64, 500 / 64), slice_thickness=7.5
    )
    ps = write_phantom(tmp_path / "ph", spec)
    assert ps.ground_truth_dir is not None
    truth = load_ground_truth(ps.ground_truth_dir)
    geoms = [read_series(s.files)[1] for s in ps.phases]
    names = ("Lung_L", "Lung_R", "Heart", "GTVp")
    for ds in build_rtstructs(
        study_key="k",
        identifiers={},
        geometries=geoms,
        phase_percents=list(truth.phase_percents),
        masks={n: truth.masks[n] for n in names},
        envelopes={"ITV": truth.itv},
        layout="per-series",
    ):
        write_rtstruct(ds, ps.root / "rtstruct")
    tiny = write_tiny_model(tmp_path / "tiny", seed=0, image_size=56)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
    env.update(ITVNODE_DATA_DIR=str(tmp_path / "data"), ITVNODE_EXPECTED_PHASES="4")
    report = tmp_path / "report"
    ev = _cli(
        "evaluate",
        "--out",
        str(report),
        "--dicom",
        str(ps.root),
        "--sam3-dir",
        str(tiny),
        "--threads",
        "1",
        env=env,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    rows = list(csv.DictReader((report / "metrics.csv").open()))
    assert {r["variant"] for r in rows} == {"zero-shot"}
    percents = list(truth.phase_percents)
    for r in rows:
        if r["phase"] == "envelope":
            assert r["structure"] == "ITV" and int(r["truth_voxels"]) == int(truth.itv.sum())
            continue
        p = percents.index(float(r["phase"][1:]))
        assert int(r["truth_voxels"]) == int(truth.masks[r["structure"]][p].sum()), r
    assert {r["structure"] for r in rows} == {*names, "ITV"}

"""The example report in docs/training.md: `itvnode evaluate --dicom TRUTH --predicted PRED` on the phantom.

TRUTH: the phantom 4DCT with its exact ground truth written as RTSTRUCTs (our writer, one per phase).
PRED: the same contours, damaged the way real contours go wrong (our writer, combined layout): Lung_L shifted
2 columns, Heart dilated by one voxel, the GTV missing on the 50 % phase (an empty prediction: inf) and a
far false-positive blob on 75 %. No model is involved; nothing here is a model's result.

    .venv/bin/python -m bench.evaluation_example OUT [--docs docs/img/evaluate]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--docs", type=Path, help="copy the PNGs here")
    args = ap.parse_args()
    from itvnode.commands.phantom import write_phantom
    from models.phantom_spec import PhantomSpec
    from models.phantom_truth import load_ground_truth
    from service.dicomio.rtstruct import build_rtstructs, write_rtstruct
    from service.dicomio.volume import read_series

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    spec = PhantomSpec.small(n_phases=10, shape=(24, 96, 96))
    ps = write_phantom(out / "truth", spec)
    assert ps.ground_truth_dir is not None
    truth = load_ground_truth(ps.ground_truth_dir)
    geoms = [read_series(s.files)[1] for s in ps.phases]
    names = ("Lung_L", "Lung_R", "Heart", "GTVp")
    percents = list(truth.phase_percents)
    kw = dict(study_key="example", identifiers={}, geometries=geoms, phase_percents=percents)
    masks = {n: np.asarray(truth.masks[n], dtype=bool) for n in names}
    for ds in build_rtstructs(masks=masks, envelopes={"ITV": truth.itv}, layout="per-series", **kw):
        write_rtstruct(ds, ps.root / "rtstruct")
    pred = {n: m.copy() for n, m in masks.items()}
    pred["Lung_L"] = np.roll(pred["Lung_L"], 2, axis=3)
    pred["Heart"] = np.stack([ndi.binary_dilation(h) for h in pred["Heart"]])
    pred["GTVp"][5] = False  # 50 %: missed entirely
    pred["GTVp"][7, 10:13, 20:24, 60:64] = True  # 70 %: a blob far from the tumour
    env = {"ITV": pred["GTVp"].any(axis=0)}
    for ds in build_rtstructs(masks=pred, envelopes=env, layout="combined", **kw):
        write_rtstruct(ds, out / "pred")
    e = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
    e.update(ITVNODE_DATA_DIR=str(out / "data"), ITVNODE_EXPECTED_PHASES=str(spec.n_phases))
    cmd = [sys.executable, "-m", "itvnode.cli", "evaluate", "--dicom", str(ps.root), "--predicted",
           str(out / "pred"), "--label", "edited", "--out", str(out / "report")]
    r = subprocess.run(cmd, env=e)
    if r.returncode:
        return r.returncode
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        for png in sorted((out / "report").glob("*.png")):
            shutil.copy(png, args.docs / png.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

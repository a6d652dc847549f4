"""The RTSTRUCT tests' and bench/rtstruct.py's real peers (dciodvfy, plastimatch), Dice, DS value checks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) reported by dicom3tools' dciodvfy."""
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def plastimatch_masks(rs: Path, ct_dir: Path, out: Path, xor: bool = False) -> dict[str, np.ndarray]:
    """Rasterise every ROI with plastimatch onto ``ct_dir``; name -> bool (Z, Y, X)."""
    import nrrd

    cmd = [
        "plastimatch",
        "convert",
        "--input",
        str(rs),
        "--referenced-ct",
        str(ct_dir),
        "--output-prefix",
        str(out),
        "--prefix-format",
        "nrrd",
    ]
    if xor:
        cmd.append("--xor-contours")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    masks = {}
    for f in sorted(out.glob("*.nrrd")):
        data, header = nrrd.read(str(f))
        assert header["space"] in ("left-posterior-superior", "LPS"), header["space"]
        masks[f.stem] = np.transpose(np.asarray(data), (2, 1, 0)).astype(bool)  # nrrd is (x, y, z)
    return masks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def ds_values(ds: pydicom.Dataset) -> list[str]:
    """Every DS value of a dataset (recursively) as stored in the file (raw bytes, not re-formatted)."""
    out: list[str] = []
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if raw is None:
            continue
        if raw.VR == "SQ":
            for item in ds[tag].value:
                out.extend(ds_values(item))
        elif raw.VR == "DS":
            value = raw.value
            if isinstance(value, bytes):
                text = value.decode("ascii").strip(" \0")
                out.extend(text.split("\\") if text else [])
            else:
                vals = value if isinstance(value, list | pydicom.multival.MultiValue) else [value]
                out.extend(getattr(v, "original_string", None) or str(v) for v in vals if v is not None)
    return out


DS_RE = re.compile(r"^[ ]*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?[ ]*$")

"""The RTSTRUCT writer with pre-encoded contour sequences (service/dicomio/rtstruct.py) writes byte-identical
files to
the writer it replaced (rtstruct_previous.py, kept verbatim, with the previous tracer): both layouts, both
hole encodings, multi-frame references, non-ASCII names, and a contour long enough for implicit VR."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import ImplicitVRLittleEndian
from scipy import ndimage

from service.dicomio import rtstruct
from service.dicomio.geometry import Geometry
from tests.support import rtstruct_previous as previous

CT = "1.2.840.10008.5.1.4.1.1.2"


def geometries(
    n_phases: int, shape: tuple[int, int, int], frames: bool = False, tilt: float = 0.0
) -> list[Geometry]:
    z, y, x = shape
    out = []
    for p in range(n_phases):
        series = f"1.2.826.0.1.3680043.8.498.{100 + p}"
        out.append(
            Geometry(
                y,
                x,
                (0.9765625, 1.171875),
                tuple((-249.51171875 + tilt * k, -180.3, -159.05 + 2.5 * k) for k in range(z)),
                (f"{series}.1",) * z if frames else tuple(f"{series}.{k + 1}" for k in range(z)),
                (CT,) * z,
                tuple(k + 1 for k in range(z)) if frames else (None,) * z,
                series,
                "1.2.826.0.1.3680043.8.498.2",
                "1.2.826.0.1.3680043.8.498.1",
            )
        )
    return out


def blobs(rng: np.random.Generator, shape: tuple[int, ...], lo: float, hi: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.random(shape), (0, 0, 2, 2)[-len(shape) :])
    return (f > np.quantile(f, lo)) & ~(f > np.quantile(f, hi))


def both(tmp_path: Path, **kw: Any) -> list[Any]:
    args: dict[str, Any] = dict(
        study_key="0123456789abcdef",
        identifiers={"PatientName": "Ölund^Åsa", "PatientID": "EQ1"},
        now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        algorithm=rtstruct.Algorithm("SAM 3", "eq", "eq"),
        styles={"GTVp": rtstruct.RoiStyle((1, 2, 3), "GTV")},
    )
    args.update(kw)
    new = rtstruct.build_rtstructs(**args)
    styles = {k: previous.RoiStyle(v.color, v.interpreted_type) for k, v in args["styles"].items()}
    old_args = dict(args, algorithm=previous.Algorithm("SAM 3", "eq", "eq"), styles=styles)
    old = previous.build_rtstructs(**old_args)
    assert len(new) == len(old)
    for k, (a, b) in enumerate(zip(old, new, strict=True)):
        pa = previous.write_rtstruct(a, tmp_path / f"old{k}")
        pb = rtstruct.write_rtstruct(b, tmp_path / f"new{k}")
        assert pa.name == pb.name
        assert pa.read_bytes() == pb.read_bytes()
    return new


@pytest.mark.parametrize("layout", ["combined", "per-series"])
@pytest.mark.parametrize("holes", ["keyhole", "xor"])
def test_files_are_byte_identical(tmp_path: Path, layout: str, holes: str) -> None:
    rng = np.random.default_rng(5)
    shape = (12, 40, 48)
    masks = {
        "External": blobs(rng, (3, *shape), 0.2, 0.97),
        "GTVp": blobs(rng, (3, *shape), 0.6, 0.9),
        "Noise": rng.random((3, *shape)) < 0.5,
        "Empty": np.zeros((3, *shape), bool),
    }
    masks["GTVp"][1, 5, 7, 9] = True  # tiny structures are kept
    masks["GTVp"][:, 0] = False  # empty slices
    itv = masks["GTVp"].any(axis=0)
    both(tmp_path, geometries=geometries(3, shape), phase_percents=[0.0, 40.0, 70.0], masks=masks,
         envelopes={"ITV": itv}, layout=layout, holes=holes)
    # slices whose positions differ in x (a gantry tilt): texts per position
    both(tmp_path / "tilt", geometries=geometries(3, shape, tilt=0.0123), phase_percents=[0.0, 40.0, 70.0],
         masks=masks, envelopes={}, layout=layout, holes=holes)


def test_multiframe_references_and_implicit_vr_are_byte_identical(tmp_path: Path) -> None:
    shape = (8, 128, 128)
    comb = np.zeros((1, *shape), bool)
    comb[0, 6, 2:126:2, 2:126] = True  # keyholed into one contour of > 65,534 bytes: implicit VR
    comb[0, 6, 3:125:2, 2:126:4] = True
    (ds,) = both(tmp_path, geometries=geometries(1, shape, frames=True), phase_percents=[0.0],
                 masks={"Comb": comb}, envelopes={})
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    g = geometries(1, shape)[0]
    rng = np.random.default_rng(11)
    for k, iop in enumerate(
        [
            (0.6, 0.8, 0.0, 0.0, 0.0, -1.0),  # rows and columns each along one patient axis
            (0.8, 0.6, 0.0, -0.6, 0.8, 0.0),  # rotated in plane: x and y depend on both
            (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # flipped
        ]
    ):
        both(tmp_path / f"iop{k}", geometries=[dataclasses.replace(g, orientation=iop)], phase_percents=[0.0],
             masks={"GTVp": blobs(rng, (1, *shape), 0.5, 0.95)}, envelopes={})

"""Annotated data loading: DICOM CT + RTSTRUCT written by our own writer, and NIfTI image + label map."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.phantom_truth import load_ground_truth
from service.dicomio.nifti_read import parse_label_map, read_nifti_image, read_nifti_labels
from service.dicomio.rtstruct import build_rtstructs, write_rtstruct
from service.dicomio.rtstruct_read import find_rtstructs, map_name, rtstruct_masks
from service.dicomio.volume import read_series

SPEC = dict(n_phases=2, shape=(10, 64, 64), pixel_spacing=(500 / 64, 500 / 64))


@pytest.fixture(scope="module")
def combined_rtstruct(
    phantom_dicom_factory: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Any, list[Any], Path]:
    series = phantom_dicom_factory("siemens", **SPEC)
    truth = load_ground_truth(series.ground_truth_dir)
    geoms = [read_series(s.files)[1] for s in series.phases]
    names = ("Lung_L", "Lung_R", "Heart", "GTVp")
    ds = build_rtstructs(
        study_key="k",
        identifiers={},
        geometries=geoms,
        phase_percents=list(truth.phase_percents),
        masks={n: truth.masks[n] for n in names},
        envelopes={"ITV": truth.itv},
        layout="combined",
    )
    assert len(ds) == 1
    path = write_rtstruct(ds[0], tmp_path_factory.mktemp("rs"))
    return series, truth, geoms, path


def test_rtstruct_round_trip_per_phase_exact(combined_rtstruct: tuple[Any, Any, list[Any], Path]) -> None:
    """Our writer's combined 4DCT structure set: each phase's contours land on that phase only, exactly."""
    _, truth, geoms, path = combined_rtstruct
    itv_on = []
    for p, g in enumerate(geoms):
        masks = rtstruct_masks(path, g)  # GTVp^P0, GTVp^P50 ... unite to GTVp, restricted to this series
        for name in ("Lung_L", "Lung_R", "Heart", "GTVp"):
            assert np.array_equal(masks[name], truth.masks[name][p]), (name, p)
        if masks["ITV"].any():
            assert np.array_equal(masks["ITV"], truth.itv)
            itv_on.append(p)
    assert len(itv_on) == 1  # the envelope is drawn once, on the series it references
    assert not np.array_equal(truth.masks["GTVp"][0], truth.masks["GTVp"][1])  # the phases really differ


def test_rtstruct_name_map_and_finder(combined_rtstruct: tuple[Any, Any, list[Any], Path]) -> None:
    _, truth, geoms, path = combined_rtstruct
    masks = rtstruct_masks(path, geoms[1], {"lung_[lr]": "Lungs", "gtv.*": "Tumour"}, only_mapped=True)
    assert set(masks) == {"Lungs", "Tumour"}
    assert np.array_equal(masks["Lungs"], truth.masks["Lung_L"][1] | truth.masks["Lung_R"][1])
    assert map_name("GTVp^P40", {"GTVp": "GTV"}) == "GTV" and map_name("Heart", {"x": "y"}) is None
    assert find_rtstructs(path.parent) == [path]


def test_rtstruct_other_frame_of_reference_rejected(
    combined_rtstruct: tuple[Any, Any, list[Any], Path],
) -> None:
    from dataclasses import replace

    from service.dicomio.rtstruct_read import RTStructReadError

    _, _, geoms, path = combined_rtstruct
    with pytest.raises(RTStructReadError, match="frame of reference"):
        rtstruct_masks(path, replace(geoms[0], frame_of_reference_uid="1.2.3"))


def _write_nifti(path: Path, lps: np.ndarray, spacing: tuple[float, float, float], as_ras: bool) -> None:
    """Store a canonical (Z, Y, X) LPS array either RAS-ordered or LPS-ordered with a matching affine."""
    import nibabel as nib

    dz, dy, dx = spacing
    nz, ny, nx = lps.shape
    if as_ras:  # i -> Right: reverse x; j -> Anterior: reverse y
        data = np.transpose(lps, (2, 1, 0))[::-1, ::-1, :]
        affine = np.diag([dx, dy, dz, 1.0])
        affine[:3, 3] = [-(nx - 1) * dx - 10.0, -(ny - 1) * dy - 20.0, 30.0]
    else:
        data = np.transpose(lps, (2, 1, 0))
        affine = np.diag([-dx, -dy, dz, 1.0])
        affine[:3, 3] = [-10.0, -20.0, 30.0]  # RAS position of voxel 0 = LPS (10, 20, 30)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))


@pytest.mark.parametrize("as_ras", [True, False])
def test_nifti_image_and_labels_canonical(tmp_path: Path, as_ras: bool) -> None:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, size=(5, 7, 9)).astype(np.int16)
    labels = np.zeros((5, 7, 9), dtype=np.uint8)
    labels[1:3, 0:2, 6:9] = 1  # anterior (low y), patient left (high x)
    labels[2:5, 4:7, 0:3] = 2
    _write_nifti(tmp_path / "ct.nii.gz", hu, (2.5, 0.8, 0.7), as_ras)
    _write_nifti(tmp_path / "lab.nii.gz", labels, (2.5, 0.8, 0.7), as_ras)
    vol = read_nifti_image(tmp_path / "ct.nii.gz")
    assert np.array_equal(vol.hu, hu)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert vol.origin == pytest.approx((10.0, 20.0, 30.0))  # LPS position of voxel (0, 0, 0)
    masks = read_nifti_labels(tmp_path / "lab.nii.gz", parse_label_map("1=Lung_L, 2=Heart"), vol.hu.shape)
    assert np.array_equal(masks["Lung_L"], labels == 1)
    assert np.array_equal(masks["Heart"], labels == 2)


def test_parse_label_map_errors() -> None:
    assert parse_label_map("1=A,2=B,3=A") == {1: "A", 2: "B", 3: "A"}
    for bad in ("", "1", "x=A", "1="):
        with pytest.raises(ValueError):
            parse_label_map(bad)


def test_load_annotated_dicom_folder_for_training(
    combined_rtstruct: tuple[Any, Any, list[Any], Path], tmp_path: Path
) -> None:
    """A folder as a site exports it (CT series + RTSTRUCT): volumes for ``itvnode train --dicom``."""
    import argparse
    import shutil

    from itvnode.commands.train import load_volumes
    from service.settings import load_settings

    series, truth, _, rs = combined_rtstruct
    for s in series.phases:
        for f in s.files:
            dest = tmp_path / "export" / s.series_instance_uid / Path(f).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    shutil.copy(rs, tmp_path / "export" / rs.name)
    args = argparse.Namespace(
        phantom=[], dicom=[str(tmp_path / "export")], nifti=[], labels=None, roi_map=None
    )
    volumes, sources = load_volumes(args, load_settings(roi_map={"lung_l": "LeftLung"}))
    assert len(volumes) == 2 and len({v.group for v in volumes}) == 1  # two phases of one patient
    assert sources[0]["kind"] == "dicom"
    for v in volumes:
        p = [s.series_instance_uid for s in series.phases].index(v.meta["series_instance_uid"])
        assert np.array_equal(v.masks["LeftLung"], truth.masks["Lung_L"][p])
        assert np.array_equal(v.masks["GTVp"], truth.masks["GTVp"][p])
        assert v.spacing == pytest.approx(truth.spacing)


def test_load_nifti_pairs_for_training(tmp_path: Path) -> None:
    import argparse

    from itvnode.commands.train import load_volumes
    from service.settings import load_settings

    pairs = []
    for i in range(2):
        hu = np.full((4, 6, 8), -1000 + i, dtype=np.int16)
        lab = np.zeros((4, 6, 8), dtype=np.uint8)
        lab[1:3, 2:4, 1:3] = 1
        lab[1:3, 2:4, 5:7] = 2
        _write_nifti(tmp_path / f"case{i}.nii.gz", hu, (3.0, 1.0, 1.0), as_ras=True)
        _write_nifti(tmp_path / f"case{i}_seg.nii.gz", lab, (3.0, 1.0, 1.0), as_ras=True)
        pairs.append(f"{tmp_path / f'case{i}.nii.gz'}:{tmp_path / f'case{i}_seg.nii.gz'}")
    args = argparse.Namespace(phantom=[], dicom=[], nifti=pairs, labels="1=Lung_R,2=Lung_L", roi_map=None)
    volumes, sources = load_volumes(args, load_settings())
    assert [v.group for v in volumes] == ["case0", "case1"] and sources[0]["kind"] == "nifti"
    assert volumes[1].hu[0, 0, 0] == -999 and volumes[0].spacing == pytest.approx((3.0, 1.0, 1.0))
    assert volumes[0].masks["Lung_L"].sum() == 8 and volumes[0].masks["Lung_L"][1, 2, 5]
    args.labels = None
    with pytest.raises(ValueError, match="--labels"):
        load_volumes(args, load_settings())

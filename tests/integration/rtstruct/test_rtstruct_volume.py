"""DICOM -> HU volume (service/dicomio/volume.py): canonical axes, rescale, compressed syntaxes, clear
rejections."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1, JPEGLSLossless, RLELossless, generate_uid

from service.dicomio.geometry import VolumeError
from service.dicomio.volume import read_geometry, read_phases, read_series
from tests.support.ctdata import write_ct_series

STUDY, FOR = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"


def _volume(z: int = 6, y: int = 20, x: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 2000, size=(z, y, x)).astype(np.int16)


def _series(tmp_path: Path, hu: np.ndarray, **kw: Any) -> list[Path]:
    args: dict[str, Any] = dict(
        spacing=(2.5, 0.8, 1.2), origin=(-100.25, -80.5, 30.0), study_uid=STUDY, for_uid=FOR
    )
    args.update(kw)
    return write_ct_series(tmp_path, hu, **args)


def test_phantom_phases_read_back_exactly(phantom_dicom_factory: Callable[..., Any]) -> None:
    from models.phantom import make_phantom
    from models.phantom_spec import PhantomSpec

    series = phantom_dicom_factory("siemens", with_avg=True)
    phantom = make_phantom(PhantomSpec.small())
    files = [list(reversed(s.files)) for s in series.phases]  # order of the file list must not matter
    hu, geoms = read_phases(files)
    assert hu.dtype == np.int16 and hu.shape == phantom.shape
    for p in range(hu.shape[0]):
        assert np.array_equal(hu[p], phantom.phase_hu(p))
    g = geoms[0]
    assert g.spacing == pytest.approx(phantom.spacing)
    assert g.origin == pytest.approx(phantom.origin, abs=1e-3)
    assert g.frame_of_reference_uid == series.frame_of_reference_uid
    assert g.study_instance_uid == series.study_instance_uid
    assert [gg.series_instance_uid for gg in geoms] == [s.series_instance_uid for s in series.phases]
    assert list(g.slice_positions) == sorted(g.slice_positions)
    avg = read_geometry(series.references[0].files)
    assert avg.same_grid(g) and avg.series_instance_uid != g.series_instance_uid


def test_multiframe_enhanced_ct_reads_like_classic(tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom")
    hu = _volume(z=5)
    files = _series(tmp_path, hu)
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=[pydicom.dcmread(f) for f in files],
        series_instance_uid=generate_uid(),
        series_number=5,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    mf.save_as(tmp_path / "enhanced.dcm")
    a, ga = read_series(files)
    b, gb = read_series([tmp_path / "enhanced.dcm"])
    assert np.array_equal(a, b) and np.array_equal(b, hu)
    assert np.allclose(gb.positions, ga.positions)
    assert set(gb.sop_instance_uids) == {mf.SOPInstanceUID}
    assert sorted(f for f in gb.frame_numbers if f is not None) == [1, 2, 3, 4, 5]


def test_read_phases_from_a_manifest(phantom_dicom_factory: Callable[..., Any]) -> None:
    series = phantom_dicom_factory("siemens", with_avg=True)
    root = series.root
    manifest = {"phases": [{"files": [str(f.relative_to(root)) for f in s.files]} for s in series.phases]}
    hu, geoms = read_phases(manifest, data_dir=root)
    assert hu.shape[0] == len(series.phases) and len(geoms) == hu.shape[0]


def test_float_rescale_gives_float32(tmp_path: Path) -> None:
    hu = _volume()
    files = _series(tmp_path, hu.astype(np.float64) * 0.5, slope=0.5, intercept=-1024.5)
    vol, _ = read_series(files)
    assert vol.dtype == np.float32
    assert np.allclose(vol, np.rint((hu * 0.5 + 1024.5) / 0.5) * 0.5 - 1024.5)


def test_feet_first_prone_orientation_is_flipped_to_canonical(tmp_path: Path) -> None:
    hu = _volume()
    ref, gref = read_series(_series(tmp_path / "hfs", hu))
    # the same voxels stored with rows and columns reversed: IOP -1\0\0\0\-1\0, first pixel at the far corner
    dz, dy, dx = 2.5, 0.8, 1.2
    far = (-100.25 + (hu.shape[2] - 1) * dx, -80.5 + (hu.shape[1] - 1) * dy, 30.0)
    stored = hu[:, ::-1, ::-1]
    vol, g = read_series(_series(tmp_path / "ffp", stored, origin=far, orientation=(-1, 0, 0, 0, -1, 0)))
    assert np.array_equal(vol, ref)
    assert g.flip_rows and g.flip_cols
    assert np.allclose(g.positions, gref.positions)
    assert g.spacing == pytest.approx((dz, dy, dx))


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("oblique", "not axial"),
        ("sagittal", "not axial"),
        ("gap", "inconsistent slice spacing"),
        ("duplicate", "two slices"),
        ("rows", "pixels, the series has"),
        ("mixed", "one series at a time"),
        ("spacing", "PixelSpacing"),
        ("tilt", "gantry tilt"),
        ("empty", "no files"),
    ],
)
def test_rejections_name_the_reason(tmp_path: Path, case: str, match: str) -> None:
    hu = _volume()
    if case == "oblique":
        files = _series(tmp_path, hu, orientation=(0.96, 0.28, 0, -0.28, 0.96, 0))
    elif case == "sagittal":
        files = _series(tmp_path, hu, orientation=(0, 1, 0, 0, 0, -1))
    else:
        files = _series(tmp_path, hu)
    if case == "gap":
        files = files[:2] + files[3:]
    elif case == "duplicate":
        dup = tmp_path / "dup.dcm"
        ds = pydicom.dcmread(files[2])
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(dup)
        files = [*files, dup]
    elif case in ("rows", "mixed", "spacing", "tilt"):
        ds = pydicom.dcmread(files[3])
        if case == "rows":
            ds.Rows = ds.Rows - 1
            ds.PixelData = ds.PixelData[: ds.Rows * ds.Columns * 2]
        elif case == "mixed":
            ds.SeriesInstanceUID = generate_uid()
        elif case == "spacing":
            ds.PixelSpacing = [0.9, 1.2]
        else:
            ds.ImagePositionPatient = [-95.0, -80.5, float(ds.ImagePositionPatient[2])]
        ds.save_as(files[3])
    elif case == "empty":
        files = []
    with pytest.raises(VolumeError, match=match):
        read_series(files)


def test_phases_on_different_grids_are_rejected(tmp_path: Path) -> None:
    a = _series(tmp_path / "a", _volume(), series_uid=generate_uid())
    b = _series(tmp_path / "b", _volume(), series_uid=generate_uid(), origin=(-100.25, -80.5, 31.0))
    with pytest.raises(VolumeError, match="does not share the grid"):
        read_phases([a, b])


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless])
def test_compressed_series_decode(tmp_path: Path, syntax: pydicom.uid.UID) -> None:
    hu = _volume(z=3)
    files = _series(tmp_path, hu)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(syntax)
        ds.save_as(f)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    vol, _ = read_series(files)
    assert np.array_equal(vol, hu)


def test_missing_decoder_is_a_clear_error(tmp_path: Path) -> None:
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless plugin is installed here")
    files = _series(tmp_path, _volume(z=2))
    shutil.copy(files[0], tmp_path / "orig.dcm")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(f, enforce_file_format=True)
    with pytest.raises(VolumeError, match="(?s)cannot decode pixel data.*JPEG Lossless.*pylibjpeg"):
        read_series(files)

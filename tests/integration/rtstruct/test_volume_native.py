"""The fast native-pixel reader of service/dicomio/volume.py gives exactly what the pydicom reader gives.

Every case is read twice: by :func:`read_phases` (header scan + threaded raw pixel reads when the files
allow it) and by the pydicom reader it replaced (``_read_phases_pydicom``, kept for what the fast reader does
not handle); the arrays (dtype included) and geometries must be identical.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ImplicitVRLittleEndian, RLELossless, generate_uid

from service.dicomio import native_read, volume
from tests.support.ctdata import write_ct_series

STUDY, FOR = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12"


def _write(tmp_path: Path, stored: np.ndarray, edit: Callable[[Dataset, int], None] | None = None,
           **kw: Any) -> list[Path]:
    args: dict[str, Any] = dict(spacing=(2.5, 0.8, 1.2), origin=(-100.25, -80.5, 30.0), study_uid=STUDY,
                                for_uid=FOR, series_uid=generate_uid())
    args.update(kw)
    files = write_ct_series(tmp_path, stored.astype(np.float64), **args)
    if edit is not None:
        for k, f in enumerate(files):
            ds = pydicom.dcmread(f)
            edit(ds, k)
            ds.save_as(f, enforce_file_format=True)
    return files


def _both(lists: list[list[Path]], dtype: type | None = None, workers: int = 2) -> tuple[np.ndarray, Any]:
    new, g_new = volume.read_phases(lists, dtype=dtype, workers=workers)
    old, g_old = volume._read_phases_pydicom([[str(f) for f in fl] for fl in lists], dtype)
    assert new.dtype == old.dtype
    assert np.array_equal(new, old)
    assert g_new == g_old
    return new, g_new


def _native(files: list[Path]) -> bool:
    return native_read.scan_series([str(f) for f in files]) is not None


def _raw(seed: int, lo: int, hi: int, dtype: Any, shape: tuple[int, int, int] = (4, 12, 10)) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, size=shape, endpoint=True).astype(dtype)


def _set_pixels(raw: np.ndarray, signed: bool, bits_stored: int) -> Callable[[Dataset, int], None]:
    def edit(ds: Dataset, k: int) -> None:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)
        ds.PixelData = raw[k].astype("<i2" if signed else "<u2").tobytes()

    return edit


@pytest.mark.parametrize(
    ("signed", "bits_stored", "slope", "intercept", "lo", "hi"),
    [
        (False, 12, 1.0, -1024.0, 0, 4095),  # the usual CT
        (False, 16, 1.0, -1024.0, 0, 65535),  # clipped at 32767
        (True, 16, 1.0, 0.0, -32768, 32767),
        (True, 12, 1.0, 0.0, -2048, 2047),
        (False, 16, 3.0, -30000.0, 0, 65535),  # wide arithmetic, clipped both ways
        (False, 12, 2.0, -1000.0, 0, 4095),  # exact in int16 with a slope
        (False, 12, 0.5, -1024.5, 0, 4095),  # not integral: float32
    ],
)
def test_native_pixels_match_pydicom(tmp_path: Path, signed: bool, bits_stored: int, slope: float,
                                     intercept: float, lo: int, hi: int) -> None:
    raw = _raw(0, lo, hi, np.int32)
    files = _write(tmp_path, np.zeros(raw.shape), _set_pixels(raw, signed, bits_stored), slope=slope,
                   intercept=intercept)
    assert _native(files)
    hu, _ = _both([files])
    integral = float(slope).is_integer() and float(intercept).is_integer()
    assert hu.dtype == (np.int16 if integral else np.float32)
    if hu.dtype == np.int16:
        assert np.array_equal(hu[0], np.clip(raw * int(slope) + int(intercept), -32768, 32767))


def test_unused_high_bits_are_ignored(tmp_path: Path) -> None:
    raw = _raw(1, 0, 4095, np.uint16)
    dirty = raw | np.uint16(0xA000)  # overlay bits above BitsStored 12

    def edit(ds: Dataset, k: int) -> None:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.PixelData = dirty[k].astype("<u2").tobytes()

    files = _write(tmp_path, np.zeros(raw.shape), edit)
    hu, _ = _both([files])
    assert np.array_equal(hu[0], raw.astype(np.int32) - 1024)


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_forced_dtype_matches(tmp_path: Path, dtype: type) -> None:
    raw = _raw(2, 0, 4095, np.int32)
    files = _write(tmp_path, np.zeros(raw.shape), _set_pixels(raw, False, 12), slope=0.7, intercept=-1000.3)
    hu, _ = _both([files], dtype=dtype)
    assert hu.dtype == dtype


def test_flipped_orientation_and_shuffled_files(tmp_path: Path) -> None:
    raw = _raw(3, 0, 4095, np.int32)
    dy, dx = 0.8, 1.2
    far = (-100.25 + (raw.shape[2] - 1) * dx, -80.5 + (raw.shape[1] - 1) * dy, 30.0)
    files = _write(tmp_path, np.zeros(raw.shape), _set_pixels(raw, False, 12), origin=far,
                   orientation=(-1, 0, 0, 0, -1, 0))
    hu, g = _both([list(reversed(files))])
    assert g[0].flip_rows and g[0].flip_cols
    assert np.array_equal(hu[0], (raw - 1024)[:, ::-1, ::-1])


def test_implicit_vr_sequences_and_a_long_header(tmp_path: Path) -> None:
    raw = _raw(4, 0, 4095, np.int32)

    def edit(ds: Dataset, k: int) -> None:
        _set_pixels(raw, False, 12)(ds, k)
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, generate_uid()
        inner = Dataset()
        inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "x"
        item.PurposeOfReferenceCodeSequence = DicomSequence([inner])
        ds.ReferencedImageSequence = DicomSequence([item, item])
        ds.add_new(0x00091010, "LO", "PRIVATE")
        ds.add_new(0x00091011, "OB", bytes(40000))  # the header does not fit the first read
        if k % 2:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian

    files = _write(tmp_path, np.zeros(raw.shape), edit)
    ds = pydicom.dcmread(files[1])
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert _native(files)
    hu, _ = _both([files])
    assert np.array_equal(hu[0], raw - 1024)


def test_several_phases_into_one_array(tmp_path: Path) -> None:
    phases = [_raw(10 + p, 0, 4095, np.int32) for p in range(3)]
    lists = [_write(tmp_path / f"p{p}", np.zeros(r.shape), _set_pixels(r, False, 12))
             for p, r in enumerate(phases)]
    hu, geoms = _both(lists, workers=3)
    assert hu.shape == (3, *phases[0].shape)
    for p, r in enumerate(phases):
        assert np.array_equal(hu[p], r - 1024)
    assert len({g.series_instance_uid for g in geoms}) == 3


def test_a_compressed_phase_goes_through_pydicom(tmp_path: Path) -> None:
    raw = _raw(5, 0, 4095, np.int32)
    plain = _write(tmp_path / "a", np.zeros(raw.shape), _set_pixels(raw, False, 12))

    def rle(ds: Dataset, k: int) -> None:
        _set_pixels(raw, False, 12)(ds, k)
        ds.compress(RLELossless)

    packed = _write(tmp_path / "b", np.zeros(raw.shape), rle)
    assert _native(plain) and not _native(packed)
    hu, _ = _both([plain, packed])
    assert np.array_equal(hu[0], hu[1])


def test_truncated_file_is_a_volume_error(tmp_path: Path) -> None:
    raw = _raw(6, 0, 4095, np.int32)
    files = _write(tmp_path, np.zeros(raw.shape), _set_pixels(raw, False, 12))
    data = files[2].read_bytes()
    files[2].write_bytes(data[:-100])
    with pytest.raises(volume.VolumeError):
        volume.read_phases([files])

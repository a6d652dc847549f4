"""Synthetic classic CT Image Storage instances (no real patient) for tests and benches.

:func:`ct_slice` builds one instance; :func:`make_ct` (one file with random pixels, for transport tests) and
:func:`write_ct_series` (a series from a HU volume, for geometry and RTSTRUCT tests) write files with it.
Optional attributes are left out unless given, so each caller gets exactly the header it always had.
The phase-labelled 4DCT and Enhanced CT instances of the SCP tests stay in
tests/integration/scp/scp_ctdata.py,
the product phantom in service/dicomio/phantom_dicom.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_slice(
    *,
    sop_uid: str,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    index: int,
    stored: np.ndarray,
    position: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_thickness: float,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    patient: tuple[str, str] = ("Phantom^Test", "PH001"),
    slope: float = 1,
    intercept: float = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    description: str | None = None,
    manufacturer: str | None = None,
    rescale_type: str | None = None,
    position_reference_indicator: str | None = None,
) -> Dataset:
    """One CT Image Storage data set with its file meta; ``stored`` (rows, columns) int16 stored values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.PatientName, ds.PatientID = patient
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, index + 1
    if manufacturer is not None:
        ds.Manufacturer = manufacturer
    if description is not None:
        ds.SeriesDescription = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    if position_reference_indicator is not None:
        ds.PositionReferenceIndicator = position_reference_indicator
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = list(position)
    ds.SliceThickness = slice_thickness
    ds.PixelSpacing = list(pixel_spacing)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if rescale_type is not None:
        ds.RescaleType = rescale_type
    ds.KVP = 120
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.int16).tobytes()
    return ds


def make_ct(out_dir: Path, index: int, *, study_uid: str, series_uid: str,
            transfer_syntax: str = ExplicitVRLittleEndian, size: int = 64) -> Path:
    """``out_dir/ct{index:03d}.dcm``: a small but valid CT file, random pixels, a new SOP Instance UID."""
    rng = np.random.default_rng(index)
    ds = ct_slice(
        sop_uid=generate_uid(), study_uid=study_uid, series_uid=series_uid,
        for_uid=generate_uid(entropy_srcs=[study_uid, "for"]), index=index,
        stored=rng.integers(-1000, 1000, size=(size, size), dtype=np.int16),
        position=[-100.0, -100.0, float(index) * 2.5], pixel_spacing=[3.125, 3.125], slice_thickness=2.5,
        orientation=[1, 0, 0, 0, 1, 0], patient=("Phantom^Export", "PHANTOM-EXPORT"),
        transfer_syntax=transfer_syntax, manufacturer="itvnode-tests",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ct{index:03d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(
    out_dir: Path,
    hu: np.ndarray,
    *,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    study_uid: str,
    for_uid: str,
    series_uid: str | None = None,
    description: str = "CT",
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    slope: float = 1.0,
    intercept: float = -1024.0,
) -> list[Path]:
    """``out_dir/CT{k:04d}.dcm`` for ``hu`` (Z, Y, X), stored pixel order; slice k at origin z + k * dz."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    dz, dy, dx = spacing
    files = []
    for k in range(hu.shape[0]):
        ds = ct_slice(
            sop_uid=generate_uid(entropy_srcs=[series_uid, str(k)]), study_uid=study_uid,
            series_uid=series_uid, for_uid=for_uid, index=k,
            stored=np.rint((hu[k].astype(np.float64) - intercept) / slope).astype(np.int16),
            position=[origin[0], origin[1], origin[2] + k * dz], pixel_spacing=[dy, dx], slice_thickness=dz,
            orientation=[float(v) for v in orientation], slope=slope, intercept=intercept,
            description=description, rescale_type="HU", position_reference_indicator="",
        )
        path = out_dir / f"CT{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files

"""Writes small synthetic CT series for the RTSTRUCT tests (classic CT Image Storage, one file per slice)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


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
    """``hu`` (Z, Y, X) in the stored pixel order; slice k at origin z + k * dz."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    dz, dy, dx = spacing
    files = []
    for k in range(hu.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sop = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "PH001", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.SeriesDescription = description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * dz]
        ds.SliceThickness = dz
        ds.PixelSpacing = [dy, dx]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        ds.KVP = 120
        stored = np.rint((hu[k].astype(np.float64) - intercept) / slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        path = out_dir / f"CT{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files

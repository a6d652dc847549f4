"""Small synthetic CT instances for the SCP tests (classic CT in two vendor styles, Enhanced CT).

Used until/unless the product phantom is needed: these tests exercise transport and header rules, not images.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _description(vendor: str, percent: float) -> str:
    if vendor == "siemens":
        return f"RespCT  3.0  B30f  {int(percent)}% Ex"
    if vendor == "philips":
        return f"4DFBCT, Gated, {percent:.1f}%A"
    return f"4D Enhanced {int(percent)}%"


@dataclass
class Study:
    study_uid: str
    for_uid: str
    series: dict[float, str]  # percent -> series uid


def new_study(percents: list[float], seed: str) -> Study:
    return Study(
        study_uid=generate_uid(entropy_srcs=[seed, "study"]),
        for_uid=generate_uid(entropy_srcs=[seed, "for"]),
        series={p: generate_uid(entropy_srcs=[seed, "series", str(p)]) for p in percents},
    )


def classic_slice(study: Study, percent: float, index: int, *, vendor: str = "siemens", size: int = 64,
                  n_slices: int = 12) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(CT)
    sop = generate_uid(entropy_srcs=[study.study_uid, str(percent), str(index)])
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = study.series[percent]
    ds.FrameOfReferenceUID = study.for_uid
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "SYN-001"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesDescription = _description(vendor, percent)
    ds.SeriesNumber = 1 if vendor == "philips" else int(percent) + 100
    ds.InstanceNumber = index + 1
    z = -float(n_slices) * 1.5 + 3.0 * index
    ds.ImagePositionPatient = [-100.0, -100.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [3.125, 3.125]
    ds.SliceThickness = 3.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    rng = np.random.default_rng(index + int(percent) * 1000)
    ds.PixelData = rng.integers(-1000, 1000, (size, size), dtype=np.int16).tobytes()
    return ds


def enhanced_series(study: Study, percent: float, *, size: int = 64, n_frames: int = 12) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(ENHANCED_CT)
    sop = generate_uid(entropy_srcs=[study.study_uid, str(percent), "enhanced"])
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = study.series[percent]
    ds.FrameOfReferenceUID = study.for_uid
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "SYN-001"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.SeriesDescription = _description("enhanced", percent)
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n_frames
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    shared = Dataset()
    ori = Dataset()
    ori.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    meas = Dataset()
    meas.PixelSpacing = [3.125, 3.125]
    meas.SliceThickness = 3.0
    shared.PlaneOrientationSequence = Sequence([ori])
    shared.PixelMeasuresSequence = Sequence([meas])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for i in range(n_frames):
        fg = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [-100.0, -100.0, -18.0 + 3.0 * i]
        fg.PlanePositionSequence = Sequence([pos])
        resp = Dataset()
        resp.add_new(0x00209245, "FL", float(percent))  # Nominal Percentage of Respiratory Phase
        fg.TemporalPositionSequence = Sequence([resp])
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.zeros((n_frames, size, size), dtype=np.int16).tobytes()
    return ds


def write_study(study: Study, out: Path, *, vendor: str = "siemens", size: int = 64,
                n_slices: int = 12) -> list[Path]:
    """Write every phase of ``study``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for percent in study.series:
        for ds in _instances(study, percent, vendor, size, n_slices):
            path = out / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def _instances(study: Study, percent: float, vendor: str, size: int, n_slices: int) -> Iterator[Dataset]:
    if vendor == "enhanced":
        yield enhanced_series(study, percent, size=size, n_frames=n_slices)
        return
    for i in range(n_slices):
        yield classic_slice(study, percent, i, vendor=vendor, size=size, n_slices=n_slices)

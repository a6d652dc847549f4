"""Write the synthetic 4DCT (models/phantom.py) as classic CT Image Storage in a vendor's style.

This module never imports ``models``: it takes any object shaped like :class:`PhantomLike`. One template
dataset is built per series and only the per-slice attributes change, so 1,200 full-size files take seconds.

Vendor styles (what the phase detector has to cope with, see shared/DESIGN.md):

- ``siemens``: ``RespCT  3.0  B30f  50% Ex``; every phase has its own SeriesNumber.
- ``philips``: TCIA 4D-Lung ``P4^P100^S300^I00008, Gated, 50.0%A``; SeriesNumber 1 on every phase.
- ``enhanced``: neutral ``4DCT phase`` description; the percent is in (0020,9245) Nominal Percentage of
  Respiratory Phase at the top level of each classic CT image.
- ``siemens-amplitude``: Siemens amplitude binning, ``RespCT  3.0  B30f  0% In`` ... ``100% In``, ``80% Ex``
  ... ``20% Ex`` (needs a phantom made with ``PhantomSpec(sampling="amplitude")``: the labels are the
  phantom's breathing amplitudes at its sampled times).
- ``ge``: GE Advantage 4D style ``Phase 50%``; series numbers 300 + index.
- ``canon``: Canon / Toshiba Aquilion style ``4D  50%  FC13``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

log = logging.getLogger(__name__)

Vendor = Literal["siemens", "philips", "enhanced", "siemens-amplitude", "ge", "canon"]
VENDORS: tuple[str, ...] = ("siemens", "philips", "enhanced", "siemens-amplitude", "ge", "canon")
RESCALE_INTERCEPT = -1024  # stored value = HU + 1024, unsigned 12 bits in 16
PATIENT_NAME = "PHANTOM^4DCT"
STUDY_DATE, STUDY_TIME = "20260101", "120000"


class PhantomLike(Protocol):
    """What the writer needs from a phantom (``models.phantom.Phantom`` satisfies it)."""

    shape: tuple[int, int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    phase_percents: tuple[float, ...]

    def phase_hu(self, index: int) -> np.ndarray: ...


@dataclass
class SeriesInfo:
    """One written series. ``kind`` is ``phase``, ``AVG``, ``MIP`` or ``CT`` (the non-4D extra series)."""

    series_instance_uid: str
    description: str
    series_number: int
    kind: str
    percent: float | None
    frame_of_reference_uid: str
    folder: Path
    files: list[Path] = field(default_factory=list)  # slice order: z ascending (inferior to superior)

    @property
    def slices(self) -> int:
        return len(self.files)


@dataclass
class PhantomSeries:
    """Everything :func:`write_phantom_dicom` wrote."""

    root: Path
    vendor: str
    study_instance_uid: str
    frame_of_reference_uid: str
    patient_id: str
    series: list[SeriesInfo]
    positions: list[tuple[float, float, float]]  # ImagePositionPatient per slice, z ascending
    ground_truth_dir: Path | None = None  # set by ``itvnode phantom`` / the test fixtures

    @property
    def phases(self) -> list[SeriesInfo]:
        return [s for s in self.series if s.kind == "phase"]

    @property
    def references(self) -> list[SeriesInfo]:
        return [s for s in self.series if s.kind in ("AVG", "MIP")]

    @property
    def extra(self) -> list[SeriesInfo]:
        return [s for s in self.series if s.kind == "CT"]

    def by_percent(self, percent: float) -> SeriesInfo:
        for s in self.phases:
            if s.percent is not None and abs(s.percent - percent) < 1e-6:
                return s
        raise KeyError(f"no phase at {percent}%")

    def all_files(self) -> list[Path]:
        return [f for s in self.series for f in s.files]


def phase_description(vendor: str, percent: float) -> str:
    """The SeriesDescription a vendor gives the phase at ``percent`` (0 % = end-inhale)."""
    if vendor == "siemens":
        # Siemens marks the half-cycle: exhaling from 0 % (peak inhale) to 50 %, inhaling after.
        half = "Ex" if 0 < percent <= 50 else "In"
        return f"RespCT  3.0  B30f  {percent:g}% {half}"
    if vendor == "philips":
        return f"P4^P100^S300^I00008, Gated, {percent:.1f}%A"
    if vendor == "enhanced":
        return "4DCT phase"
    if vendor == "ge":
        return f"Phase {percent:g}%"
    if vendor == "canon":
        return f"4D  {percent:g}%  FC13"
    if vendor == "siemens-amplitude":
        raise ValueError("siemens-amplitude labels are amplitudes, not phase percents: see amplitude_labels")
    raise ValueError(f"unknown vendor {vendor!r}; choose one of {', '.join(VENDORS)}")


def amplitude_labels(phantom: PhantomLike) -> list[str]:
    """``0% In`` ... ``100% In``, ``80% Ex`` ...: the phantom's breathing amplitude (inhale fraction, %) at
    each sampled phase, with the half-cycle (the first P/2 + 1 phases inhale from end-exhale, the rest
    exhale)."""
    spec = getattr(phantom, "spec", None)
    inhale = getattr(phantom, "inhale", None)
    if getattr(spec, "sampling", None) != "amplitude" or inhale is None:
        raise ValueError("vendor siemens-amplitude needs a phantom sampled by amplitude (PhantomSpec("
                         "sampling='amplitude'); `itvnode phantom --vendor siemens-amplitude` does it)")
    n = len(phantom.phase_percents)
    return [f"{round(100.0 * float(a)):d}% {'In' if i <= n // 2 else 'Ex'}" for i, a in enumerate(inhale)]


_EQUIPMENT = {
    "siemens": ("SIEMENS", "SOMATOM Definition AS", "B30f", "Thorax^4DCT (Adult)"),
    "philips": ("Philips", "Brilliance Big Bore", "B", "4D Lung"),
    "enhanced": ("ITVNODE", "Synthetic Phantom", "STANDARD", "4DCT"),
    "siemens-amplitude": ("SIEMENS", "SOMATOM Confidence", "Br40", "Thorax^4DCT_Amplitude (Adult)"),
    "ge": ("GE MEDICAL SYSTEMS", "Discovery CT590 RT", "STANDARD", "4D THORAX"),
    "canon": ("TOSHIBA", "Aquilion LB", "FC13", "4D CHEST"),
}


def _uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")[:48]


def write_phantom_dicom(
    phantom: PhantomLike,
    out_dir: str | Path,
    vendor: str = "siemens",
    with_avg: bool = False,
    with_mip: bool = False,
    with_extra_ct: bool | Literal["other-for", "same-for"] = False,
    uid_seed: str | None = None,
    patient_id: str | None = None,
) -> PhantomSeries:
    """Write every phase (plus optional AVG/MIP/extra CT) under ``out_dir/<NN_description>/IMxxxx.dcm``.

    ``with_extra_ct``: a plain ``Thorax 3.0 B31f`` series; ``True``/``"other-for"`` gives it its own frame of
    reference (a separate scan), ``"same-for"`` shares the 4D frame of reference but carries no phase.
    ``uid_seed`` makes every UID deterministic (default: derived from the phantom's spec when it has one).
    """
    if vendor not in VENDORS:
        raise ValueError(f"unknown vendor {vendor!r}; choose one of {', '.join(VENDORS)}")
    if with_extra_ct not in (False, True, "other-for", "same-for"):
        raise ValueError(f"with_extra_ct must be a bool, 'other-for' or 'same-for', not {with_extra_ct!r}")
    if uid_seed is None:
        spec = getattr(phantom, "spec", None)
        digest = getattr(spec, "digest", None)
        uid_seed = f"itvnode-phantom-{digest() if callable(digest) else 'default'}"
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    n_phases, nz, ny, nx = phantom.shape
    positions = _positions(phantom)

    study_uid = _uid(uid_seed, vendor, "study")
    for_uid = _uid(uid_seed, vendor, "frame-of-reference")
    pid = patient_id or f"PHANTOM-{_uid(uid_seed).rsplit('.', 1)[-1][:8]}"
    study = _study_dataset(vendor, study_uid, pid, uid_seed)
    written = PhantomSeries(root=root, vendor=vendor, study_instance_uid=study_uid,
                            frame_of_reference_uid=for_uid, patient_id=pid, series=[], positions=positions)

    want_ref = with_avg or with_mip
    acc_sum = np.zeros((nz, ny, nx), dtype=np.float32) if with_avg else None
    acc_max = np.full((nz, ny, nx), np.iinfo(np.int16).min, dtype=np.int16) if with_mip else None
    order = 0
    amp = amplitude_labels(phantom) if vendor == "siemens-amplitude" else None
    for i, pct in enumerate(phantom.phase_percents):
        hu = phantom.phase_hu(i)
        number = 1 if vendor == "philips" else (300 + i if vendor == "ge" else 10 + i)
        desc = f"RespCT  3.0  Br40  {amp[i]}" if amp is not None else phase_description(vendor, pct)
        label = _safe(desc) if vendor != "enhanced" else f"4DCT_phase_{pct:05.1f}"
        info = SeriesInfo(
            series_instance_uid=_uid(uid_seed, vendor, "series", "phase", i), description=desc,
            series_number=number, kind="phase", percent=pct, frame_of_reference_uid=for_uid,
            folder=root / f"{order:02d}_{label}")
        order += 1
        _write_series(study, info, hu, phantom, positions, vendor, percent=pct, image_type=None)
        written.series.append(info)
        if acc_sum is not None:
            acc_sum += hu
        if acc_max is not None:
            np.maximum(acc_max, hu, out=acc_max)
        log.info("phantom phase %.1f%% written (%d slices) to %s", pct, nz, info.folder.name)
    if want_ref:
        refs: list[tuple[str, np.ndarray]] = []
        if acc_sum is not None:
            refs.append(("AVG", np.rint(acc_sum / n_phases).astype(np.int16)))
        if acc_max is not None:
            refs.append(("MIP", acc_max))
        for kind, vol in refs:
            info = SeriesInfo(
                series_instance_uid=_uid(uid_seed, vendor, "series", kind), description=kind,
                series_number=1 if vendor == "philips" else (8 if kind == "AVG" else 9), kind=kind,
                percent=None,
                frame_of_reference_uid=for_uid, folder=root / f"{order:02d}_{kind}")
            order += 1
            _write_series(study, info, vol, phantom, positions, vendor, percent=None,
                          image_type=["DERIVED", "SECONDARY", "AVERAGE" if kind == "AVG" else "MIP"])
            written.series.append(info)
    if with_extra_ct:
        same = with_extra_ct == "same-for"
        info = SeriesInfo(
            series_instance_uid=_uid(uid_seed, vendor, "series", "extra-ct"), description="Thorax 3.0 B31f",
            series_number=2, kind="CT", percent=None,
            frame_of_reference_uid=for_uid if same else _uid(uid_seed, vendor, "frame-of-reference", "extra"),
            folder=root / f"{order:02d}_Thorax_3.0_B31f")
        order += 1
        # a free-breathing look-alike: the phase closest to 50 % (end-exhale)
        mid = int(np.argmin([abs(p - 50.0) for p in phantom.phase_percents]))
        _write_series(study, info, phantom.phase_hu(mid), phantom, positions, vendor, percent=None,
                      image_type=None, kernel="B31f", acquisition=2)
        written.series.append(info)
    return written


def _positions(phantom: PhantomLike) -> list[tuple[float, float, float]]:
    dz = phantom.spacing[0]
    ox, oy, oz = phantom.origin
    return [(ox, oy, oz + k * dz) for k in range(phantom.shape[1])]


def _study_dataset(vendor: str, study_uid: str, patient_id: str, uid_seed: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic phantom: no patient data"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "PHANTOM"
    ds.AccessionNumber = ""
    ds.StudyDescription = "Synthetic 4DCT phantom"
    manufacturer, model, _, protocol = _EQUIPMENT[vendor]
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.InstitutionName = "itvnode synthetic"
    ds.StationName = "PHANTOM"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "itvnode-phantom"
    ds.ProtocolName = protocol
    return ds


def _write_series(
    study: Dataset,
    info: SeriesInfo,
    hu: np.ndarray,
    phantom: PhantomLike,
    positions: Sequence[tuple[float, float, float]],
    vendor: str,
    percent: float | None,
    image_type: list[str] | None,
    kernel: str | None = None,
    acquisition: int = 1,
) -> None:
    """Template once, then per slice: UID, numbers, position, pixels."""
    nz, ny, nx = hu.shape
    dz, dy, dx = phantom.spacing
    info.folder.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.update(study)
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = image_type or ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.SeriesInstanceUID = info.series_instance_uid
    ds.SeriesNumber = info.series_number
    ds.SeriesDescription = info.description
    ds.SeriesDate = STUDY_DATE
    ds.SeriesTime = STUDY_TIME
    ds.ContentDate = STUDY_DATE
    ds.ContentTime = STUDY_TIME
    ds.AcquisitionDate = STUDY_DATE
    ds.AcquisitionTime = STUDY_TIME
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = acquisition
    ds.KVP = "120"
    ds.SliceThickness = _ds(dz)
    ds.SpacingBetweenSlices = _ds(dz)
    ds.ConvolutionKernel = kernel or _EQUIPMENT[vendor][2]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [_ds(dy), _ds(dx)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ny
    ds.Columns = nx
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1600"
    ds.WindowCenterWidthExplanation = "LUNG"
    if info.kind == "AVG" or info.kind == "MIP":
        what = "Average" if info.kind == "AVG" else "Maximum"
        ds.DerivationDescription = f"{what} of all respiratory phases"
    if percent is not None:
        ds.ImageComments = f"{percent:g}% respiratory phase"
        if vendor == "enhanced":
            ds.NominalPercentageOfRespiratoryPhase = float(percent)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ITVNODE_PHANTOM"
    ds.file_meta = meta

    stored = hu.astype(np.int32) - RESCALE_INTERCEPT
    if stored.min() < 0 or stored.max() > 4095:
        raise ValueError("HU outside -1024..3071 cannot be stored in 12 bits")
    stored16 = stored.astype("<u2")
    del stored
    for k in range(nz):
        sop = _uid(info.series_instance_uid, k)
        ds.SOPInstanceUID = sop
        meta.MediaStorageSOPInstanceUID = sop
        # Siemens and Philips number from the head down; 'enhanced' from the feet up
        ds.InstanceNumber = (nz - k) if vendor in ("siemens", "philips", "siemens-amplitude") else k + 1
        x, y, z = positions[k]
        ds.ImagePositionPatient = [_ds(x), _ds(y), _ds(z)]
        ds.SliceLocation = _ds(z)
        ds.PixelData = stored16[k].tobytes()
        path = info.folder / f"IM{k + 1:04d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        info.files.append(path)

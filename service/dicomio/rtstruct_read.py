"""RTSTRUCT -> boolean masks on a CT grid, for annotated data (``itvnode train`` / ``itvnode evaluate``).

Rasterisation samples voxel centres: a voxel is inside when its centre lies inside the slice's contours by
the even-odd rule (the contours of one ROI on one slice are XOR-ed: holes drawn as inner contours and the
keyhole encoding both come out right, DICOM PS3.3 C.8.8.6.3). Our writer traces voxel edges
(service/dicomio/contours.py), so its masks come back exactly.

A contour is placed on the slice it references (ContourImageSequence) when that SOP instance belongs to the
grid; a contour referencing only instances of other series (another phase of a combined 4DCT structure set)
is skipped; a contour without references goes to the slice at its z (within 30 % of the slice spacing).

ROI names map to structure names: the base name before a ``^`` qualifier (``GTVp^P40`` -> ``GTVp``) is looked
up in ``name_map`` (keys are regular expressions matched in full, case-insensitively, against the full ROI
name first, then the base name); unmapped ROIs keep their base name, or are dropped with ``only_mapped``.
ROIs mapping to one structure are united.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from skimage.measure import points_in_poly

from service.dicomio.geometry import Geometry
from service.dicomio.rtstruct import parse_roi_name, phase_label

log = logging.getLogger(__name__)

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


class RTStructReadError(ValueError):
    """The file is not a usable RTSTRUCT for this grid; the message says why."""


@dataclass
class Contour:
    points: np.ndarray  # (N, 3) patient mm
    referenced_sops: tuple[str, ...]


@dataclass
class RoiData:
    number: int
    name: str
    contours: list[Contour] = field(default_factory=list)


@dataclass
class StructureSet:
    frame_of_reference_uid: str
    rois: list[RoiData]
    referenced_series: tuple[str, ...]
    sop_instance_uid: str = ""


def read_structure_set(path: str | Path) -> StructureSet:
    """Parse ROIs and their CLOSED_PLANAR / POINT contours (other geometric types are skipped)."""
    try:
        ds = pydicom.dcmread(str(path))
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise RTStructReadError(f"{path}: not a readable DICOM file: {exc}") from exc
    if (
        str(getattr(ds, "SOPClassUID", "")) != RTSTRUCT_SOP_CLASS
        and getattr(ds, "Modality", "") != "RTSTRUCT"
    ):
        raise RTStructReadError(f"{path}: not an RT Structure Set (SOP class {ds.get('SOPClassUID', '?')})")
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    rois: dict[int, RoiData] = {n: RoiData(n, name) for n, name in names.items()}
    for rc in ds.get("ROIContourSequence", []):
        num = int(rc.ReferencedROINumber)
        roi = rois.setdefault(num, RoiData(num, f"ROI{num}"))
        for c in rc.get("ContourSequence", []):
            if str(c.get("ContourGeometricType", "CLOSED_PLANAR")) not in ("CLOSED_PLANAR", "POINT"):
                continue
            pts = np.asarray([float(v) for v in c.ContourData], dtype=np.float64).reshape(-1, 3)
            refs = tuple(str(i.ReferencedSOPInstanceUID) for i in c.get("ContourImageSequence", []))
            roi.contours.append(Contour(pts, refs))
    for_uid = ""
    series: list[str] = []
    for f in ds.get("ReferencedFrameOfReferenceSequence", []):
        for_uid = for_uid or str(f.FrameOfReferenceUID)
        for st in f.get("RTReferencedStudySequence", []):
            series += [str(s.SeriesInstanceUID) for s in st.get("RTReferencedSeriesSequence", [])]
    return StructureSet(
        for_uid or str(ds.get("FrameOfReferenceUID", "")),
        list(rois.values()),
        tuple(series),
        str(ds.get("SOPInstanceUID", "")),
    )


def map_name(roi_name: str, name_map: Mapping[str, str] | None) -> str | None:
    """Structure name of an ROI (module docstring); None when ``name_map`` has no match for it."""
    base = roi_name.split("^", 1)[0].strip()
    for candidate in (roi_name.strip(), base):
        for pattern, target in (name_map or {}).items():
            if re.fullmatch(pattern, candidate, flags=re.IGNORECASE):
                return target
    return None


def rasterise(contours: list[Contour], geometry: Geometry) -> tuple[np.ndarray, int]:
    """bool (Z, Y, X) of the contours on ``geometry``; returns ``(mask, contours placed)``."""
    nz, ny, nx = geometry.shape
    dy, dx = geometry.pixel_spacing
    z_pos = np.asarray(geometry.slice_positions)
    tol = 0.3 * geometry.slice_spacing if nz > 1 else 0.5
    sop_index = {uid: k for k, uid in enumerate(geometry.sop_instance_uids)}
    mask = np.zeros((nz, ny, nx), dtype=bool)
    placed = 0
    for c in contours:
        if c.points.shape[0] < 3:
            continue
        k: int | None = None
        if c.referenced_sops:
            ks = [sop_index[u] for u in c.referenced_sops if u in sop_index]
            if not ks:
                continue  # another series of the frame of reference (e.g. another phase)
            k = ks[0]
        else:
            z = float(np.mean(c.points[:, 2]))
            near = int(np.argmin(np.abs(z_pos - z)))
            if abs(z_pos[near] - z) > tol:
                continue
            k = near
        x0, y0, _ = geometry.positions[k]
        cols = (c.points[:, 0] - x0) / dx
        rows = (c.points[:, 1] - y0) / dy
        r0, r1 = max(0, int(np.floor(rows.min()))), min(ny - 1, int(np.ceil(rows.max())))
        c0, c1 = max(0, int(np.floor(cols.min()))), min(nx - 1, int(np.ceil(cols.max())))
        if r0 > r1 or c0 > c1:
            continue
        rr, cc = np.mgrid[r0 : r1 + 1, c0 : c1 + 1]
        inside = points_in_poly(
            np.column_stack([rr.ravel(), cc.ravel()]).astype(np.float64), np.column_stack([rows, cols])
        )
        mask[k, r0 : r1 + 1, c0 : c1 + 1] ^= inside.reshape(rr.shape)
        placed += 1
    return mask, placed


def rtstruct_masks(
    path: str | Path, geometry: Geometry, name_map: Mapping[str, str] | None = None, only_mapped: bool = False
) -> dict[str, np.ndarray]:
    """Structure name -> bool (Z, Y, X) on ``geometry`` (module docstring for names and placement).

    Structures whose contours all belong to other series come back empty; an RTSTRUCT of another frame of
    reference raises :class:`RTStructReadError`.
    """
    ss = read_structure_set(path)
    if (
        ss.frame_of_reference_uid
        and geometry.frame_of_reference_uid
        and ss.frame_of_reference_uid != geometry.frame_of_reference_uid
    ):
        raise RTStructReadError(
            f"{path}: frame of reference {ss.frame_of_reference_uid} is not the CT's "
            f"{geometry.frame_of_reference_uid}"
        )
    out: dict[str, np.ndarray] = {}
    for roi in ss.rois:
        name = map_name(roi.name, name_map)
        if name is None:
            if only_mapped:
                continue
            name = roi.name.split("^", 1)[0].strip()
        mask, placed = rasterise(roi.contours, geometry)
        log.debug(
            "ROI %r -> %s: %d of %d contours on series %s",
            roi.name,
            name,
            placed,
            len(roi.contours),
            geometry.series_instance_uid,
        )
        out[name] = out[name] | mask if name in out else mask
    return out


_SPLIT_TAGS = ["SOPClassUID", "Modality", "SeriesInstanceUID"]


def split_rtstructs(files: Sequence[Path]) -> tuple[list[Path], list[Path], set[str]]:
    """``(RTSTRUCT files, other files, SeriesInstanceUIDs of the other DICOM files)`` (headers only)."""
    found: list[Path] = []
    others: list[Path] = []
    series: set[str] = set()
    for p in files:
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True, specific_tags=_SPLIT_TAGS)
        except (OSError, pydicom.errors.InvalidDicomError):
            others.append(p)
            continue
        if str(ds.get("SOPClassUID", "")) == RTSTRUCT_SOP_CLASS or ds.get("Modality", "") == "RTSTRUCT":
            found.append(p)
        else:
            others.append(p)
            if ds.get("SeriesInstanceUID"):
                series.add(str(ds.SeriesInstanceUID))
    return found, others, series


def find_rtstructs(folder: str | Path) -> list[Path]:
    """RTSTRUCT files under ``folder`` (headers only)."""
    return split_rtstructs([p for p in sorted(Path(folder).rglob("*")) if p.is_file()])[0]


@dataclass
class PhaseContours:
    """Contours of several RTSTRUCTs placed on the phases of one 4DCT (:func:`read_phase_contours`)."""

    masks: dict[str, np.ndarray]  # structure -> bool (P, Z, Y, X)
    missing: dict[str, list[float]]  # structure -> phase percents without any of its contours
    rois: list[dict[str, Any]]  # per ROI used: file, ROI name, structure, phase percents it was placed on
    unmapped: list[str]  # ROI names that no roi_map pattern (or no wanted structure) matched
    ignored: list[dict[str, str]]  # RTSTRUCTs not used and why (another frame of reference, no phase series)
    files: list[Path]  # the RTSTRUCTs used


def read_phase_contours(
    rtstructs: Sequence[Path],
    geometries: Sequence[Geometry],
    phase_percents: Sequence[float],
    name_map: Mapping[str, str],
    *,
    folder_series: Collection[str] = (),
    structures: Collection[str] | None = None,
    only_mapped: bool = True,
) -> PhaseContours:
    """Per-phase masks of the mapped ROIs of ``rtstructs`` on the phases ``geometries`` of one 4DCT.

    Both layouts: one RTSTRUCT per phase series (TCIA 4D-Lung: its ROIs go to the phase(s) it references) or
    one referencing every phase with per-phase ROI names (``GTVp^P40`` goes to the 40 % phase only). Within
    those phases each contour lands on the slice it references (:func:`rasterise`). Only ROIs whose name
    ``name_map`` maps (:func:`map_name`), to one of ``structures`` when given, are used
    (``only_mapped=False``: unmapped ROIs keep their base name, as for annotated data); ROIs mapping to one
    structure are united per phase.

    Raises :class:`RTStructReadError` when an RTSTRUCT of this frame of reference references a series that is
    neither a phase nor in ``folder_series``, and when no ROI maps to a structure (the message lists the
    names seen). RTSTRUCTs of another frame of reference, or referencing only non-phase series of the folder
    (an AVG), are listed in ``ignored``.
    """
    if not geometries or len(geometries) != len(phase_percents):
        raise ValueError("one geometry per phase percent is needed")
    for_uid = geometries[0].frame_of_reference_uid
    phase_of = {g.series_instance_uid: p for p, g in enumerate(geometries)}
    shape = (len(geometries), *geometries[0].shape)
    masks: dict[str, np.ndarray] = {}
    rois: list[dict[str, Any]] = []
    unmapped: list[str] = []
    ignored: list[dict[str, str]] = []
    used: list[Path] = []
    seen: list[str] = []
    for path in rtstructs:
        ss = read_structure_set(path)
        name = Path(path).name
        if ss.frame_of_reference_uid and for_uid and ss.frame_of_reference_uid != for_uid:
            why = f"frame of reference {ss.frame_of_reference_uid} is not the 4DCT's"
            ignored.append({"file": name, "why": why})
            continue
        absent = [s for s in ss.referenced_series if s not in phase_of and s not in folder_series]
        if absent:
            raise RTStructReadError(
                f"{name} references series {', '.join(absent)}, which is not in the folder (phase series: "
                + ", ".join(f"{phase_label(phase_percents[p])} {s}" for s, p in phase_of.items())
                + ")"
            )
        candidates = sorted({phase_of[s] for s in ss.referenced_series if s in phase_of})
        if ss.referenced_series and not candidates:
            ignored.append({"file": name, "why": "references no phase series (only "
                            + ", ".join(ss.referenced_series) + ")"})
            continue
        candidates = candidates or list(range(len(geometries)))
        used.append(Path(path))
        for roi in ss.rois:
            seen.append(roi.name)
            base, percent = parse_roi_name(roi.name)
            target = map_name(roi.name, name_map)
            if target is None and not only_mapped:
                target = base.split("^", 1)[0].strip()
            if target is None or (structures is not None and target not in structures):
                unmapped.append(roi.name)
                continue
            phases = candidates
            if percent is not None:
                phases = [p for p in candidates if abs(phase_percents[p] - percent) < 1e-6]
            placed_on: list[float] = []
            for p in phases:
                mask, placed = rasterise(roi.contours, geometries[p])
                if placed:
                    arr = masks.setdefault(target, np.zeros(shape, dtype=bool))
                    arr[p] |= mask
                    placed_on.append(float(phase_percents[p]))
            masks.setdefault(target, np.zeros(shape, dtype=bool))
            rois.append({"file": name, "roi": roi.name, "structure": target, "phases": placed_on})
            log.debug("%s: ROI %r -> %s on phases %s", name, roi.name, target, placed_on)
    if not masks:
        wanted = f" to one of {sorted(structures)}" if structures is not None else ""
        raise RTStructReadError(
            f"no ROI name matches roi_map{wanted}; ROI names seen: "
            + (", ".join(sorted(set(seen))) or "none")
            + f" (in {len(rtstructs) - len(ignored)} of {len(rtstructs)} RTSTRUCT(s)); patterns: "
            + ", ".join(f"{k} -> {v}" for k, v in name_map.items())
        )
    missing = {k: [float(phase_percents[p]) for p in range(len(v)) if not v[p].any()]
               for k, v in masks.items()}
    missing = {k: v for k, v in missing.items() if v}
    return PhaseContours(masks, missing, rois, sorted(set(unmapped)), ignored, used)


@dataclass
class AnnotatedSeries:
    """One CT series with the masks its RTSTRUCT(s) draw on it (numbers only past this point)."""

    hu: np.ndarray  # (Z, Y, X) canonical axes
    spacing: tuple[float, float, float]
    masks: dict[str, np.ndarray]
    patient_key: str  # sha256 of PatientID, 12 hex: groups series by patient without carrying the ID
    series_instance_uid: str
    series_description: str
    rtstructs: list[str]


def _patient_key(patient_id: str) -> str:
    import hashlib

    return hashlib.sha256(patient_id.encode()).hexdigest()[:12]


def load_annotated_series(
    folder: str | Path, name_map: Mapping[str, str] | None = None, only_mapped: bool = False
) -> list[AnnotatedSeries]:
    """Every CT series under ``folder`` that an RTSTRUCT in ``folder`` draws on, with its masks."""
    from service.dicomio.volume import read_geometry, read_series

    ct: dict[str, list[Path]] = {}
    info: dict[str, tuple[str, str, str]] = {}  # series -> (frame of reference, patient id, description)
    rts: list[tuple[Path, str]] = []
    for p in sorted(Path(folder).rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError):
            continue
        modality = str(ds.get("Modality", ""))
        if modality == "RTSTRUCT" or str(ds.get("SOPClassUID", "")) == RTSTRUCT_SOP_CLASS:
            for_uid = ""
            for f in ds.get("ReferencedFrameOfReferenceSequence", []):
                for_uid = for_uid or str(f.FrameOfReferenceUID)
            rts.append((p, for_uid))
        elif modality == "CT" and ds.get("Rows"):
            uid = str(ds.SeriesInstanceUID)
            ct.setdefault(uid, []).append(p)
            info.setdefault(
                uid,
                (
                    str(ds.get("FrameOfReferenceUID", "")),
                    str(ds.get("PatientID", "")),
                    str(ds.get("SeriesDescription", "")),
                ),
            )
    out: list[AnnotatedSeries] = []
    for uid, files in ct.items():
        for_uid, pid, desc = info[uid]
        mine = [r for r, f in rts if not f or f == for_uid]
        if not mine:
            continue
        geom = read_geometry(files)
        masks: dict[str, np.ndarray] = {}
        used = []
        for r in mine:
            got = rtstruct_masks(r, geom, name_map, only_mapped)
            if not any(m.any() for m in got.values()):
                continue
            used.append(str(r))
            for k, m in got.items():
                masks[k] = masks[k] | m if k in masks else m
        if not used:
            continue
        hu, geom = read_series(files)
        out.append(AnnotatedSeries(hu, geom.spacing, masks, _patient_key(pid), uid, desc, used))
        log.info("annotated series %s (%s): %d slices, structures %s", uid, desc, hu.shape[0], sorted(masks))
    return out

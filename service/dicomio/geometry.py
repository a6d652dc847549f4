"""The canonical grid of a CT series, planned from its headers: :class:`Geometry` and :func:`plan_series`.

Canonical axes: x index towards patient Left, y index towards Posterior, z index with ImagePositionPatient z.
Axial series whose rows or columns run the other way (feet-first, prone: ImageOrientationPatient with -1) are
flipped into those axes; the :class:`Geometry` then describes the canonical grid and records the flips so a
writer that must follow the stored pixel order (DICOM SEG) can undo them. Oblique, sagittal, coronal and
gantry-tilted series, gaps, duplicate slices and mixed series are rejected with :class:`VolumeError`.
Headers are pydicom Datasets or anything read like one (the fast reader's scanned headers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_ORIENT_TOL = 1e-3  # direction cosines
_POS_TOL = 0.01  # mm, in-plane offsets between slices and phases


class VolumeError(ValueError):
    """The series cannot be read into a canonical volume; the message says why."""


@dataclass(frozen=True)
class Geometry:
    """Canonical grid of one series: slice k, row j, column i is at ``positions[k] + (i*dx, j*dy, 0)``."""

    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (row spacing dy, column spacing dx) in mm, as DICOM PixelSpacing
    positions: tuple[tuple[float, float, float], ...]  # position of each slice's first (canonical) voxel
    sop_instance_uids: tuple[str, ...]
    sop_class_uids: tuple[str, ...]
    frame_numbers: tuple[int | None, ...]  # 1-based frame in a multi-frame instance, else None
    series_instance_uid: str
    frame_of_reference_uid: str
    study_instance_uid: str
    series_description: str = ""
    modality: str = "CT"
    orientation: tuple[float, ...] = AXIAL  # canonical; the stored one is this with the flips below
    flip_rows: bool = False  # stored row order runs Posterior -> Anterior
    flip_cols: bool = False  # stored column order runs Left -> Right

    @property
    def origin(self) -> tuple[float, float, float]:
        """Patient position (x, y, z) in mm of voxel (0, 0, 0)."""
        return self.positions[0]

    @property
    def slice_positions(self) -> tuple[float, ...]:
        """z of each slice (mm), increasing."""
        return tuple(p[2] for p in self.positions)

    @property
    def slice_spacing(self) -> float:
        z = self.slice_positions
        return float(np.median(np.diff(z))) if len(z) > 1 else 0.0

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(dz, dy, dx) in mm, the order models/ expects."""
        return (self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.positions), self.rows, self.columns)

    def same_grid(self, other: Geometry, tol: float = _POS_TOL) -> bool:
        """True when both series sample the same voxels (same frame of reference and positions)."""
        return (
            self.frame_of_reference_uid == other.frame_of_reference_uid
            and (self.rows, self.columns) == (other.rows, other.columns)
            and np.allclose(self.pixel_spacing, other.pixel_spacing, atol=1e-4)
            and len(self.positions) == len(other.positions)
            and bool(np.allclose(self.positions, other.positions, atol=tol))
        )



@dataclass(frozen=True)
class SliceRef:
    """Where one canonical slice comes from: its instance (and frame) and its rescale."""

    position: tuple[float, float, float]  # stored ImagePositionPatient
    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None
    file_index: int
    slope: float
    intercept: float


def _f(values: Any, n: int, what: str, where: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise VolumeError(f"{where}: {what} is missing or not numeric") from None
    if len(out) != n:
        raise VolumeError(f"{where}: {what} has {len(out)} values, expected {n}")
    return out


def _check_orientation(iop: tuple[float, ...], where: str) -> tuple[bool, bool]:
    """Return (flip_rows, flip_cols) for an axial orientation, else raise."""
    a = np.asarray(iop)
    for fc in (False, True):
        for fr in (False, True):
            ref = np.array([-1.0 if fc else 1.0, 0, 0, 0, -1.0 if fr else 1.0, 0])
            if np.abs(a - ref).max() <= _ORIENT_TOL:
                return fr, fc
    raise VolumeError(
        f"{where}: ImageOrientationPatient {list(iop)} is not axial; only axial series "
        "(rows along patient x, columns along patient y, possibly reversed) are supported"
    )

def _rescale(ds: Any) -> tuple[float, float]:
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return slope, intercept


def _frames_of(
    ds: Any, file_index: int, where: str
) -> tuple[list[SliceRef], tuple[float, ...], tuple[float, float]]:
    """Slices of one instance with its orientation and pixel spacing."""
    sop_uid, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if n_frames != 1:
            raise VolumeError(f"{where}: multi-frame instance without functional groups is not supported")
        iop = _f(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where)
        ps = _f(ds.get("PixelSpacing"), 2, "PixelSpacing", where)
        ipp = _f(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", where)
        slope, intercept = _rescale(ds)
        return (
            [SliceRef((ipp[0], ipp[1], ipp[2]), sop_uid, sop_class, None, file_index, slope, intercept)],
            iop,
            (ps[0], ps[1]),
        )

    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else Dataset()

    def group(item: Dataset, name: str) -> Dataset | None:
        for src in (item, shared_item):
            seq = src.get(name)
            if seq:
                return seq[0]
        return None

    slices: list[SliceRef] = []
    iops: set[tuple[float, ...]] = set()
    spacings: set[tuple[float, float]] = set()
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        fw = f"{where} frame {k + 1}"
        pos, ori, meas = (
            group(item, n)
            for n in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence")
        )
        if pos is None or ori is None or meas is None:
            raise VolumeError(f"{fw}: plane position, orientation or pixel measures missing")
        ipp = _f(pos.get("ImagePositionPatient"), 3, "ImagePositionPatient", fw)
        iops.add(_f(ori.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", fw))
        sp = _f(meas.get("PixelSpacing"), 2, "PixelSpacing", fw)
        spacings.add((sp[0], sp[1]))
        pvt = group(item, "PixelValueTransformationSequence")
        slope, intercept = _rescale(pvt if pvt is not None else ds)
        slices.append(
            SliceRef((ipp[0], ipp[1], ipp[2]), sop_uid, sop_class, k + 1, file_index, slope, intercept)
        )
    if len(iops) != 1 or len(spacings) != 1:
        raise VolumeError(f"{where}: frames differ in orientation or pixel spacing")
    return slices, iops.pop(), spacings.pop()


def plan_series(datasets: Sequence[Any], names: Sequence[str]) -> tuple[Geometry, list[SliceRef]]:
    """Check a series' headers and return its canonical geometry and the slices in canonical order."""
    if not datasets:
        raise VolumeError("empty series: no files")
    first = datasets[0]
    series_uid = str(first.get("SeriesInstanceUID", ""))
    for_uid = str(first.get("FrameOfReferenceUID", ""))
    study_uid = str(first.get("StudyInstanceUID", ""))
    rows, cols = int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0)
    if not series_uid or not for_uid:
        raise VolumeError(f"{names[0]}: SeriesInstanceUID or FrameOfReferenceUID missing")
    slices: list[SliceRef] = []
    orientation: tuple[float, ...] | None = None
    spacing: tuple[float, float] | None = None
    for i, (ds, where) in enumerate(zip(datasets, names, strict=True)):
        if str(ds.get("SeriesInstanceUID", "")) != series_uid:
            raise VolumeError(
                f"{where}: belongs to series {ds.get('SeriesInstanceUID')}, not {series_uid}; "
                "one series at a time"
            )
        if str(ds.get("FrameOfReferenceUID", "")) != for_uid:
            raise VolumeError(f"{where}: FrameOfReferenceUID differs within series {series_uid}")
        if (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) != (rows, cols):
            raise VolumeError(
                f"{where}: {ds.get('Rows')}x{ds.get('Columns')} pixels, the series has {rows}x{cols}"
            )
        sl, iop, ps = _frames_of(ds, i, where)
        if orientation is None:
            orientation, spacing = iop, ps
        elif np.abs(np.subtract(iop, orientation)).max() > _ORIENT_TOL:
            raise VolumeError(f"{where}: ImageOrientationPatient differs within the series")
        elif spacing is None or np.abs(np.subtract(ps, spacing)).max() > 1e-4:
            raise VolumeError(
                f"{where}: PixelSpacing {list(ps)} differs from {list(spacing or ())} in the series"
            )
        slices.extend(sl)
    assert orientation is not None and spacing is not None
    flip_rows, flip_cols = _check_orientation(orientation, names[0])
    if rows < 1 or cols < 1 or min(spacing) <= 0:
        raise VolumeError(f"{names[0]}: invalid Rows/Columns/PixelSpacing")

    slices.sort(key=lambda s: s.position[2])
    pos = np.array([s.position for s in slices])
    if np.abs(pos[:, :2] - pos[0, :2]).max() > _POS_TOL:
        raise VolumeError(
            f"series {series_uid}: slice origins move in x/y along the stack (gantry tilt or "
            "shifted slices); not supported"
        )
    if len(slices) > 1:
        dz = np.diff(pos[:, 2])
        if dz.min() < _POS_TOL:
            k = int(np.argmin(dz))
            raise VolumeError(
                f"series {series_uid}: two slices at z={pos[k, 2]:.3f} mm (duplicate instance?)"
            )
        med = float(np.median(dz))
        bad = np.abs(dz - med) > max(_POS_TOL, 0.01 * med)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise VolumeError(
                f"series {series_uid}: inconsistent slice spacing, {dz[k]:.3f} mm between "
                f"z={pos[k, 2]:.3f} and z={pos[k + 1, 2]:.3f} where the series has {med:.3f} mm "
                "(missing slice?)"
            )
    dy, dx = spacing
    # Canonical first voxel: undo reversed rows/columns.
    shift = np.array(
        [(cols - 1) * dx * (-1.0 if flip_cols else 0.0), (rows - 1) * dy * (-1.0 if flip_rows else 0.0), 0.0]
    )
    canon = [tuple(float(v) for v in p + shift) for p in pos]
    geom = Geometry(
        rows=rows,
        columns=cols,
        pixel_spacing=(float(dy), float(dx)),
        positions=tuple((c[0], c[1], c[2]) for c in canon),
        sop_instance_uids=tuple(s.sop_instance_uid for s in slices),
        sop_class_uids=tuple(s.sop_class_uid for s in slices),
        frame_numbers=tuple(s.frame_number for s in slices),
        series_instance_uid=series_uid,
        frame_of_reference_uid=for_uid,
        study_instance_uid=study_uid,
        series_description=str(first.get("SeriesDescription", "")),
        modality=str(first.get("Modality", "")),
        flip_rows=flip_rows,
        flip_cols=flip_cols,
    )
    return geom, slices


"""DICOM CT series -> HU volume (Z, Y, X) in the canonical axes of docs/internal-api.md, plus its geometry.

Canonical axes: x index towards patient Left, y index towards Posterior, z index with ImagePositionPatient z.
Axial series whose rows or columns run the other way (feet-first, prone: ImageOrientationPatient with -1) are
flipped into those axes; the :class:`Geometry` then describes the canonical grid and records the flips so a
writer that must follow the stored pixel order (DICOM SEG) can undo them. Oblique, sagittal, coronal and
gantry-tilted series, gaps, duplicate slices and mixed series are rejected with :class:`VolumeError`.
Classic CT (one file per slice) and Enhanced CT (one multi-frame file) are read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

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
class _Slice:
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


def _pixel_array(ds: Dataset, where: str) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except AttributeError:
        raise VolumeError(f"{where}: no Pixel Data") from None
    except (RuntimeError, NotImplementedError, ValueError, ImportError) as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        raise VolumeError(
            f"{where}: cannot decode pixel data in transfer syntax {name} ({ts}): {exc}. Install a pydicom "
            "pixel data plugin for it (pylibjpeg + pylibjpeg-libjpeg / -openjpeg / -rle, pyjpegls, or "
            "python-gdcm), or have the sender use Explicit VR Little Endian"
        ) from exc


def _rescale(ds: Dataset) -> tuple[float, float]:
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return slope, intercept


def _frames_of(
    ds: Dataset, file_index: int, where: str
) -> tuple[list[_Slice], tuple[float, ...], tuple[float, float]]:
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
            [_Slice((ipp[0], ipp[1], ipp[2]), sop_uid, sop_class, None, file_index, slope, intercept)],
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

    slices: list[_Slice] = []
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
            _Slice((ipp[0], ipp[1], ipp[2]), sop_uid, sop_class, k + 1, file_index, slope, intercept)
        )
    if len(iops) != 1 or len(spacings) != 1:
        raise VolumeError(f"{where}: frames differ in orientation or pixel spacing")
    return slices, iops.pop(), spacings.pop()


def _plan(datasets: Sequence[Dataset], names: Sequence[str]) -> tuple[Geometry, list[_Slice]]:
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
    slices: list[_Slice] = []
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


def read_geometry(files: Sequence[str | Path]) -> Geometry:
    """Geometry of a series from its headers only (no pixel decoding)."""
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return _plan(datasets, [str(f) for f in files])[0]


def read_series(files: Sequence[str | Path], dtype: type | None = None) -> tuple[np.ndarray, Geometry]:
    """Read one series into HU (Z, Y, X) in canonical axes.

    ``dtype=None`` gives int16 when every slope/intercept maps stored values to integers in range (normal
    CT), else float32; pass ``np.float32`` or ``np.int16`` to force one (int16 rounds).
    """
    names = [str(f) for f in files]
    datasets = []
    for f in names:
        try:
            datasets.append(pydicom.dcmread(f))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise VolumeError(f"{f}: not a readable DICOM file: {exc}") from exc
    geom, slices = _plan(datasets, names)
    integral = all(float(s.slope).is_integer() and float(s.intercept).is_integer() for s in slices)
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.int16 if integral else np.float32)
    hu = np.empty(geom.shape, dtype=out_dtype)
    cache: dict[int, np.ndarray] = {}
    for k, s in enumerate(slices):
        if s.file_index not in cache:
            cache.clear()  # keep one decoded instance at a time
            arr = _pixel_array(datasets[s.file_index], names[s.file_index])
            cache[s.file_index] = arr
        arr = cache[s.file_index]
        frame = arr[s.frame_number - 1] if s.frame_number is not None and arr.ndim == 3 else arr
        if frame.shape != (geom.rows, geom.columns):
            raise VolumeError(
                f"{names[s.file_index]}: pixel data shape {frame.shape} is not a single-channel "
                f"{geom.rows}x{geom.columns} image"
            )
        v = (
            frame.astype(np.float64) * s.slope + s.intercept
            if (s.slope, s.intercept) != (1.0, 0.0)
            else frame
        )
        if out_dtype == np.int16:
            v = np.clip(np.rint(v), -32768, 32767)
        if geom.flip_rows:
            v = v[::-1, :]
        if geom.flip_cols:
            v = v[:, ::-1]
        hu[k] = v
    log.debug("read series %s: %s voxels, spacing %s", geom.series_instance_uid, geom.shape, geom.spacing)
    return hu, geom


def _file_lists(source: Any, data_dir: str | Path | None) -> list[list[Path]]:
    phases = getattr(source, "phases", None)
    if phases is None and isinstance(source, dict):
        phases = source.get("phases")
    if phases is None:
        return [[Path(f) for f in files] for files in source]
    base = Path(data_dir) if data_dir is not None else Path()
    lists = []
    for ph in phases:
        files = ph.files if hasattr(ph, "files") else ph["files"]
        lists.append([base / f for f in files])
    return lists


def read_phases(
    source: Sequence[Sequence[str | Path]] | Any,
    data_dir: str | Path | None = None,
    dtype: type | None = None,
) -> tuple[np.ndarray, list[Geometry]]:
    """Read every phase into one (P, Z, Y, X) array and check that all phases share one grid.

    ``source`` is a list of file lists (one per phase, in phase order) or a study manifest, whose relative
    file paths are resolved against ``data_dir``.
    """
    lists = _file_lists(source, data_dir)
    if not lists:
        raise VolumeError("no phases to read")
    hu0, g0 = read_series(lists[0], dtype=dtype)
    out = np.empty((len(lists), *hu0.shape), dtype=hu0.dtype)
    out[0] = hu0
    del hu0
    geoms = [g0]
    for p, files in enumerate(lists[1:], start=1):
        hu, g = read_series(files, dtype=out.dtype.type)
        if not g.same_grid(g0):
            raise VolumeError(
                f"phase {p} (series {g.series_instance_uid}) does not share the grid of phase 0 (series "
                f"{g0.series_instance_uid}): {g.shape} vs {g0.shape} voxels, or different positions or "
                "frame of reference"
            )
        out[p] = hu
        geoms.append(g)
    return out, geoms

"""DICOM CT series -> HU volume (Z, Y, X) in the canonical axes of docs/internal-api.md, plus its geometry.

The grid and its checks are service/dicomio/geometry.py; native 16-bit classic CT is read by the fast reader
of service/dicomio/native_read.py, several files at a time; everything else (compressed, multi-frame, ...) is
decoded by pydicom here. Classic CT (one file per slice) and Enhanced CT (one multi-frame file) are read.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from service.dicomio.geometry import Geometry, SliceRef, VolumeError, plan_series
from service.dicomio.native_read import read_native, scan_series, store_hu

log = logging.getLogger(__name__)


def read_geometry(files: Sequence[str | Path]) -> Geometry:
    """Geometry of a series from its headers only (no pixel decoding)."""
    names = [str(f) for f in files]
    heads = scan_series(names)
    if heads is not None:
        return plan_series(heads, names)[0]
    return _plan_pydicom(names)[0]


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


def _out_dtype(slices: Sequence[SliceRef], dtype: type | None) -> np.dtype[Any]:
    integral = all(float(s.slope).is_integer() and float(s.intercept).is_integer() for s in slices)
    return np.dtype(dtype) if dtype is not None else np.dtype(np.int16 if integral else np.float32)


def default_workers() -> int:
    """Threads reading pixel data: the usable cores, at least 2, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 2
    return max(2, min(8, n))


def _run_parallel(jobs: Sequence[Callable[[], None]], workers: int | None) -> None:
    n = workers or default_workers()
    if n <= 1 or len(jobs) < 2:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="volume-read") as ex:
        for fut in [ex.submit(job) for job in jobs]:
            fut.result()  # the first error, after every job ended


def read_series(
    files: Sequence[str | Path], dtype: type | None = None, *, workers: int | None = None
) -> tuple[np.ndarray, Geometry]:
    """Read one series into HU (Z, Y, X) in canonical axes.

    ``dtype=None`` gives int16 when every slope/intercept maps stored values to integers in range (normal
    CT), else float32; pass ``np.float32`` or ``np.int16`` to force one (int16 rounds).
    """
    hu, geoms = read_phases([files], dtype=dtype, workers=workers)
    return hu[0], geoms[0]


def _read_series_pydicom(names: Sequence[str], dtype: type | None, out: np.ndarray | None = None
                         ) -> tuple[np.ndarray, Geometry]:
    """Any series pydicom can decode (compressed, multi-frame, ...); into ``out`` when given."""
    datasets = []
    for f in names:
        try:
            datasets.append(pydicom.dcmread(f))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise VolumeError(f"{f}: not a readable DICOM file: {exc}") from exc
    geom, slices = plan_series(datasets, names)
    out_dtype = _out_dtype(slices, dtype)
    hu = out if out is not None and out.shape == geom.shape else np.empty(geom.shape, dtype=out_dtype)
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
        if geom.flip_rows:
            frame = frame[::-1, :]
        if geom.flip_cols:
            frame = frame[:, ::-1]
        store_hu(frame, s.slope, s.intercept, hu[k])
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
    *,
    workers: int | None = None,
) -> tuple[np.ndarray, list[Geometry]]:
    """Read every phase into one preallocated (P, Z, Y, X) array and check that all phases share one grid.

    ``source`` is a list of file lists (one per phase, in phase order) or a study manifest, whose relative
    file paths are resolved against ``data_dir``. The output dtype follows phase 0 (see :func:`read_series`).
    Native 16-bit classic CT is read by ``workers`` threads (default :func:`default_workers`) without
    pydicom; other series are decoded by pydicom. :class:`PhaseReader` reads the same one phase at a time.
    """
    reader = PhaseReader(source, data_dir, dtype, workers=workers)
    for p in range(reader.n_phases):
        reader.read(p)
    log.debug("read %d phase(s) of %s voxels, spacing %s", reader.n_phases, reader.geoms[0].shape,
              reader.geoms[0].spacing)
    return reader.hu, reader.geoms


class PhaseReader:
    """The phases of a study read one at a time into their slot of one preallocated (P, Z, Y, X) array.

    Building it scans every header, checks that all phases share one grid (:class:`VolumeError` otherwise)
    and allocates :attr:`hu`; :meth:`read` then fills one phase, so that a caller can work on phase k while
    phase k+1 is read. Arguments as :func:`read_phases`.
    """

    def __init__(self, source: Sequence[Sequence[str | Path]] | Any, data_dir: str | Path | None = None,
                 dtype: type | None = None, *, workers: int | None = None) -> None:
        self.lists = [[str(f) for f in files] for files in _file_lists(source, data_dir)]
        if not self.lists:
            raise VolumeError("no phases to read")
        self.workers = workers
        heads = [scan_series(names) for names in self.lists]
        self.native = all(h is not None for h in heads)
        self._plans: list[tuple[Geometry, list[SliceRef]]] = []
        self._heads = heads
        if self.native:
            self._plans = [plan_series(h, names) for h, names in zip(heads, self.lists, strict=True)
                           if h is not None]
            self.geoms = [plan[0] for plan in self._plans]
            out_dtype = _out_dtype(self._plans[0][1], dtype)
        else:  # headers by pydicom; the first phase sets the dtype for all (as the native reader does)
            self.geoms = []
            out_dtype = np.dtype(np.float32)
            for p, names in enumerate(self.lists):
                geom, slices = _plan_pydicom(names)
                self.geoms.append(geom)
                if p == 0:
                    out_dtype = _out_dtype(slices, dtype)
        g0 = self.geoms[0]
        for p, g in enumerate(self.geoms[1:], start=1):
            _check_same_grid(p, g, g0)
        self.hu = np.empty((len(self.lists), *g0.shape), dtype=out_dtype)

    @property
    def n_phases(self) -> int:
        return len(self.lists)

    def read(self, p: int) -> np.ndarray:
        """Read phase ``p`` into ``hu[p]`` and return that view."""
        names = self.lists[p]
        if not self.native:
            _read_series_pydicom(names, self.hu.dtype.type, out=self.hu[p])
            return self.hu[p]
        geom, slices = self._plans[p]
        hdrs = self._heads[p]
        assert hdrs is not None
        out = self.hu[p]

        def read_slices(ks: range) -> None:
            for k in ks:
                s = slices[k]
                read_native(names[s.file_index], hdrs[s.file_index], s, geom, out[k])

        # one job per thread, each a contiguous run of slices: no future per slice
        n = min(self.workers or default_workers(), len(slices))
        runs = [range(len(slices) * i // n, len(slices) * (i + 1) // n) for i in range(n)]
        _run_parallel([functools.partial(read_slices, ks) for ks in runs], self.workers)
        return out


def _plan_pydicom(names: Sequence[str]) -> tuple[Geometry, list[SliceRef]]:
    datasets = []
    for f in names:
        try:
            datasets.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise VolumeError(f"{f}: not a readable DICOM file: {exc}") from exc
    geom, slices = plan_series(datasets, names)
    return geom, list(slices)


def _check_same_grid(p: int, g: Geometry, g0: Geometry) -> None:
    if not g.same_grid(g0):
        raise VolumeError(
            f"phase {p} (series {g.series_instance_uid}) does not share the grid of phase 0 (series "
            f"{g0.series_instance_uid}): {g.shape} vs {g0.shape} voxels, or different positions or "
            "frame of reference"
        )


def _read_phases_pydicom(
    lists: Sequence[Sequence[str]], dtype: type | None
) -> tuple[np.ndarray, list[Geometry]]:
    hu0, g0 = _read_series_pydicom(lists[0], dtype)
    out = np.empty((len(lists), *hu0.shape), dtype=hu0.dtype)
    out[0] = hu0
    del hu0
    geoms = [g0]
    for p, names in enumerate(lists[1:], start=1):
        g = read_geometry(names)
        _check_same_grid(p, g, g0)
        _read_series_pydicom(names, out.dtype.type, out=out[p])
        geoms.append(g)
    return out, geoms

"""The manifest's content from an :class:`~service.intake.assessment.Assessment`: phases, references,
geometry and the identifiers the RTSTRUCT needs (read from one file's header), with file paths relative to
``data_dir`` (the manifest contract; absolute when the spool lies elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from service.intake.assessment import Assessment, Series, Slices, slice_normal
from service.store.manifest import (
    IDENTIFIER_KEYS,
    Cycle,
    Geometry,
    IgnoredSeries,
    Manifest,
    PhaseEntry,
    ReferenceEntry,
)


class ManifestContent:
    """Fills manifests of studies under ``data_dir`` (paths computed relative to it, fast path cached)."""

    def __init__(self, data_dir: Path) -> None:
        self._cwd = os.getcwd()
        self._data_abs = os.path.abspath(data_dir)
        self._data_prefix = self._data_abs.rstrip(os.sep) + os.sep

    def rel(self, p: Path) -> str:
        """Path relative to data_dir (the manifest contract); absolute when the spool lies elsewhere."""
        s = os.fspath(p)
        if not os.path.isabs(s):
            s = os.path.join(self._cwd, s)
        if s.startswith(self._data_prefix) and "/." not in s and "//" not in s:  # fast path, already normal
            return s[len(self._data_prefix):]
        absolute = os.path.abspath(s)
        rel = os.path.relpath(absolute, self._data_abs)
        return absolute if rel.startswith("..") else Path(rel).as_posix()

    def build(self, m: Manifest | None, study_uid: str, for_uid: str, key: str, a: Assessment, fp: str,
              cycle: Cycle | None) -> Manifest:
        """Fill phases, references, geometry and identifiers from the current assessment."""
        if m is None:
            m = Manifest(study_key=key, study_instance_uid=study_uid, frame_of_reference_uid=for_uid)
        m.fingerprint = fp
        m.phases = [
            PhaseEntry(percent=float(s.cls.percent or 0.0), label=s.cls.roi_label, series_instance_uid=s.uid,
                       series_description=s.description, slices=len(sl.positions),
                       files=[self.rel(f) for f in sl.distinct_files])
            for s, sl in a.phases
        ]
        m.references = [
            ReferenceEntry(kind=s.cls.reference or "AVG",  # type: ignore[arg-type]
                           series_instance_uid=s.uid, series_description=s.description,
                           files=[self.rel(f) for f in _ref_files(s, sl)])
            for s, sl in a.references
        ]
        if a.phases:
            s0, sl0 = a.phases[0]
            meta0, path0 = s0.items[0]
            header = _read_header(sl0.distinct_files[0] if sl0.distinct_files else path0)
            spacing = header.get("pixel_spacing") or [0.0, 0.0]
            along = sl0.positions @ slice_normal(meta0.image_orientation or (1, 0, 0, 0, 1, 0))
            m.geometry = Geometry(
                rows=int(meta0.rows or 0), columns=int(meta0.columns or 0),
                pixel_spacing=[float(v) for v in spacing],
                image_orientation=[float(v) for v in (meta0.image_orientation or ())],
                positions=[[float(v) for v in p] for p in sl0.positions],
                slice_spacing=float(np.median(np.diff(along))) if len(along) > 1 else 0.0,
            )
            m.identifiers = header.get("identifiers") or {}
        m.cycle = cycle
        m.ignored_series = [
            IgnoredSeries(series_instance_uid=s.uid, series_description=s.description,
                          why=s.cls.note or "not a respiratory phase") for s in a.ignored]
        return m



def _ref_files(s: Series, sl: Slices | None) -> list[Path]:
    return sl.distinct_files if sl is not None else [p for _, p in s.items]


def _read_header(path: Path) -> dict[str, Any]:
    """PixelSpacing and the identifiers the RTSTRUCT needs, from one file (pixels not read)."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    spacing = ds.get("PixelSpacing")
    if spacing is None:
        for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            seq = ds.get(groups)
            if seq and seq[0].get("PixelMeasuresSequence"):
                spacing = seq[0].PixelMeasuresSequence[0].get("PixelSpacing")
                if spacing is not None:
                    break
    identifiers = {k: ("" if ds.get(k) is None else str(ds.get(k))) for k in IDENTIFIER_KEYS}
    return {"pixel_spacing": [float(v) for v in spacing] if spacing is not None else None,
            "identifiers": identifiers}

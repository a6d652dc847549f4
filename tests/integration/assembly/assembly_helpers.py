"""Helpers for the assembly tests (imported by name: conftest modules are ambiguous without packages)."""

from __future__ import annotations

import base64
import json
import random
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import generate_uid

from service.intake.assembler import Assembler
from service.intake.queue import embedded_broker_path
from service.store.header_scan import meta_from_bytes
from service.store.manifest import Manifest, load_manifest, manifest_path
from service.store.spool import Spool

SMALL = {"n_phases": 4, "shape": (12, 64, 64), "pixel_spacing": (500 / 64, 500 / 64)}


def ingest(spool: Spool, files: Iterable[Path]) -> None:
    """What the SCP does per C-STORE: parse + validate the header, then store durably and index."""
    for f in files:
        raw = Path(f).read_bytes()
        spool.store(meta_from_bytes(raw), raw)


def shuffled(files: Iterable[Path], seed: int = 0) -> list[Path]:
    out = list(files)
    random.Random(seed).shuffle(out)
    return out


def all_files(series: Any) -> list[Path]:
    return [f for s in series.series for f in s.files]


def make_assembler(spool: Spool, data_dir: Path, enqueue: Callable[[str], str] | None,
                   **kw: Any) -> Assembler:
    kw.setdefault("quiet_period", 30.0)
    kw.setdefault("expected_phases", 4)
    return Assembler(spool, data_dir, enqueue, **kw)


def manifest(data_dir: Path, key: str) -> Manifest:
    return load_manifest(manifest_path(data_dir, key))


def broker_messages(data_dir: Path) -> list[dict[str, Any]]:
    """Every message in the embedded broker: task name, args, queue, visible (not yet delivered)."""
    path = embedded_broker_path(data_dir)
    if not path.exists():
        return []
    con = sqlite3.connect(path)
    try:
        rows = con.execute(
            "SELECT q.name, m.payload, m.visible FROM kombu_message m "
            "JOIN kombu_queue q ON q.id = m.queue_id ORDER BY m.id").fetchall()
    finally:
        con.close()
    out = []
    for queue, payload, visible in rows:
        msg = json.loads(payload)
        assert msg["content-type"] == "application/json", "only JSON may reach the broker"
        body = msg["body"]
        if msg["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body).decode()
        args, kwargs, _embed = json.loads(body)
        out.append({"queue": queue, "task": msg["headers"]["task"], "id": msg["headers"]["id"], "args": args,
                    "kwargs": kwargs, "visible": bool(visible)})
    return out


def rewrite_series(files: list[Path], out_dir: Path, *, dz: float = 0.0, new_series: bool = False,
                   description: str | None = None) -> list[Path]:
    """Copies of ``files`` with z shifted by ``dz`` and/or new Series/SOP UIDs (a second series)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid() if new_series else None
    out = []
    for f in files:
        ds = dcmread(f)
        if dz:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, round(z + dz, 4)]
        if series_uid:
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if description is not None:
            ds.SeriesDescription = description
        p = out_dir / f.name
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out



def to_enhanced_ct(files: list[Path], out: Path, percent: float, *, reverse: bool = True) -> Path:
    """One multi-frame Enhanced CT instance holding a classic phase series (frames stored feet-last when
    ``reverse``), with the percent in (0020,9245) of each frame's Frame Content item."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian

    dss = [dcmread(f) for f in files]
    if reverse:
        dss = dss[::-1]
    first = dss[0]
    ds = Dataset()
    for kw in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
               "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
               "ReferringPhysicianName", "StudyDescription", "FrameOfReferenceUID",
               "PositionReferenceIndicator", "Modality", "Rows", "Columns", "SamplesPerPixel",
               "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        if kw in first:
            setattr(ds, kw, first[kw].value)
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "4DCT enhanced"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.NumberOfFrames = len(dss)
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = first.PixelSpacing
    pm.SliceThickness = first.SliceThickness
    po = Dataset()
    po.ImageOrientationPatient = first.ImageOrientationPatient
    pvt = Dataset()
    pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = first.RescaleIntercept, first.RescaleSlope, "HU"
    shared.PixelMeasuresSequence = [pm]
    shared.PlaneOrientationSequence = [po]
    shared.PixelValueTransformationSequence = [pvt]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for d in dss:
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = d.ImagePositionPatient
        fc = Dataset()
        fc.NominalPercentageOfRespiratoryPhase = float(percent)
        item.PlanePositionSequence = [pp]
        item.FrameContentSequence = [fc]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = b"".join(d.PixelData for d in dss)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out

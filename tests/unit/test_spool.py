"""Spool: durable idempotent storage, index queries, header rules and the exception -> status table."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode_file_meta

from service.net import dimse_status as st
from service.store.header_scan import _fast_header, meta_from_bytes, meta_via_pydicom
from service.store.ingest_errors import (
    ConflictingDuplicate,
    IngestError,
    InvalidGeometry,
    InvalidIdentifier,
    MissingAttribute,
    MissingGeometry,
    ModalityMismatch,
    PixelDataLengthMismatch,
    SOPClassMismatch,
    SOPInstanceMismatch,
    SpoolFull,
    SpoolUnavailable,
    UndecodableDataset,
)
from service.store.instance_meta import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, InstanceMeta
from service.store.spool import Spool

STUDY = "1.2.826.0.1.3680043.8.498.1"
FOR = "1.2.826.0.1.3680043.8.498.2"


def ct(series: str = "1.2.826.0.1.3680043.8.498.10", z: float = 0.0, sop: str | None = None,
       ts: str = ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = FOR
    ds.PatientName = "Phantom^Unit"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesDescription = "RespCT  3.0  B30f  50% Ex"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 7
    ds.ImagePositionPatient = [-10.0, -10.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00\x01" * 16
    return ds


def encode(ds: Dataset) -> bytes:
    """What ``event.encoded_dataset()`` gives: preamble, file meta, then the data set as sent."""
    meta = Dataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CT_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3")
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, meta.TransferSyntaxUID.is_implicit_VR
    write_dataset(fp, ds)
    return b"\0" * 128 + b"DICM" + encode_file_meta(meta) + fp.getvalue()  # type: ignore[arg-type]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool")
    yield s
    s.close()


def store(spool: Spool, ds: Dataset) -> Path:
    raw = encode(ds)
    return spool.store(meta_from_bytes(raw), raw)


def test_store_is_durable_layout_and_indexed(spool: Spool) -> None:
    ds = ct()
    raw = encode(ds)
    meta = meta_from_bytes(raw)
    path = spool.store(meta, raw)
    assert path == spool.root / STUDY / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert path.read_bytes() == raw
    assert spool.study_uids() == [STUDY]
    [(got, got_path)] = spool.instances(STUDY)
    assert got == meta and got_path == path
    assert got.image_position == (-10.0, -10.0, 0.0) and got.series_number == 3
    assert got.transfer_syntax_uid == ExplicitVRLittleEndian
    assert (spool.root / "index.sqlite").exists()


def test_resend_is_idempotent_and_last_received_moves(spool: Spool) -> None:
    ds = ct()
    first = store(spool, ds)
    t1 = spool.last_received(STUDY)
    time.sleep(0.01)
    second = store(spool, ds)
    assert first == second and spool.count() == 1
    assert spool.last_received(STUDY) is not None and spool.last_received(STUDY) > t1  # type: ignore[operator]
    assert spool.last_received("1.2.3.4") is None


def test_same_instance_in_another_series_refused_first_copy_kept(spool: Spool) -> None:
    ds = ct(series="1.2.826.0.1.3680043.8.498.10")
    old = store(spool, ds)
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.11"
    with pytest.raises(ConflictingDuplicate) as exc:
        store(spool, ds)
    assert st.status_for(exc.value) == st.CONFLICTING_DUPLICATE == 0xC005
    assert old.read_bytes() == encode(ct(series="1.2.826.0.1.3680043.8.498.10", sop=str(ds.SOPInstanceUID)))
    assert spool.count() == 1 and not (spool.root / STUDY / "1.2.826.0.1.3680043.8.498.11").exists()


def test_another_study_reusing_sop_uids_is_kept_apart(spool: Spool) -> None:
    """Issue 9 item 3: a second study with the same SOP Instance UIDs never deletes the first one's files."""
    first = [ct(z=float(i)) for i in range(3)]
    paths_a = [store(spool, ds) for ds in first]
    other = "1.2.826.0.1.3680043.8.498.99"
    paths_b = []
    for ds in first:
        ds.StudyInstanceUID = other
        paths_b.append(store(spool, ds))
    assert all(p.is_file() for p in paths_a + paths_b) and not set(paths_a) & set(paths_b)
    assert len(spool.instances(STUDY)) == 3 and len(spool.instances(other)) == 3
    assert spool.revisions(STUDY) == {} and spool.revisions(other) == {}
    spool.remove_study(other)
    assert all(p.is_file() for p in paths_a) and len(spool.instances(STUDY)) == 3


def test_changed_resend_replaces_and_bumps_revision(spool: Spool) -> None:
    ds = ct()
    path = store(spool, ds)
    mtime = path.stat().st_mtime_ns
    assert store(spool, ds) == path and path.stat().st_mtime_ns == mtime  # identical: not rewritten
    assert spool.revisions(STUDY) == {}
    ds.PixelData = b"\x02\x03" * 16  # corrected content, same SOP Instance UID
    assert store(spool, ds) == path and path.read_bytes() == encode(ds)
    assert spool.revisions(STUDY) == {str(ds.SOPInstanceUID): 1} and spool.count() == 1
    assert store(spool, ds) == path and spool.revisions(STUDY) == {str(ds.SOPInstanceUID): 1}


def test_index_of_the_first_layout_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    root = tmp_path / "old"
    root.mkdir()
    con = sqlite3.connect(root / "index.sqlite")
    con.executescript("""
        CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, study_instance_uid TEXT NOT NULL,
            series_instance_uid TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
            received_at REAL NOT NULL, meta TEXT NOT NULL);
        CREATE INDEX instances_study ON instances (study_instance_uid, received_at);""")
    raw = encode(ct())
    meta = meta_from_bytes(raw)
    con.execute("INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
                (meta.sop_instance_uid, STUDY, meta.series_instance_uid, "a/b/c.dcm", len(raw), 12.5,
                 meta.to_json()))
    con.commit()
    con.close()
    s = Spool(root)
    try:
        assert [m for m, _ in s.instances(STUDY)] == [meta] and s.last_received(STUDY) == 12.5
        other = meta.__class__(**{**meta.__dict__, "study_instance_uid": "1.2.3"})
        s._index(other, root / "x.dcm", 1)  # a second study, same SOP Instance UID: its own row
        assert s.count() == 2
    finally:
        s.close()


def test_reopen_sees_index(tmp_path: Path) -> None:
    s = Spool(tmp_path / "sp")
    store(s, ct())
    s.close()
    again = Spool(tmp_path / "sp")
    assert again.count() == 1
    again.close()


def test_concurrent_stores(spool: Spool) -> None:
    datasets = [ct(z=float(i)) for i in range(40)]
    errors: list[BaseException] = []

    def worker(chunk: list[Dataset]) -> None:
        try:
            for ds in chunk:
                store(spool, ds)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(datasets[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and spool.count() == 40


def test_watermark_refuses_before_writing(spool: Spool) -> None:
    spool.min_free_bytes = spool.free_bytes() + 10**6
    with pytest.raises(SpoolFull):
        store(spool, ct())
    assert spool.count() == 0
    assert not [p for p in spool.root.rglob("*") if p.is_file() and p.name != "index.sqlite"
                and not p.name.startswith("index.sqlite")]


def test_disk_full_mid_write_leaves_nothing(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(SpoolFull):
        store(spool, ct())
    monkeypatch.setattr(os, "write", real_write)
    assert spool.count() == 0
    assert not list(spool.root.glob("*/*/*"))


def test_directory_removed_behind_our_back_is_recreated(spool: Spool) -> None:
    first = store(spool, ct())
    shutil.rmtree(first.parent.parent)
    again = store(spool, ct())
    assert again.exists()


def test_unwritable_spool_is_out_of_resources(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object, **kwargs: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(SpoolUnavailable) as info:
        store(spool, ct())
    assert st.status_for(info.value) == st.OUT_OF_RESOURCES
    assert "EACCES" in st.error_comment(info.value)


def test_stale_part_files_removed_on_open(tmp_path: Path) -> None:
    d = tmp_path / "sp" / STUDY / "1.2.3"
    d.mkdir(parents=True)
    stale, fresh = d / ".1.2.3.4.1.part", d / ".1.2.3.5.1.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    Spool(tmp_path / "sp").close()
    assert not stale.exists() and fresh.exists()


def test_remove_study(spool: Spool) -> None:
    store(spool, ct())
    assert spool.remove_study(STUDY) == 1
    assert spool.study_uids() == [] and not (spool.root / STUDY).exists()


def test_meta_json_roundtrip() -> None:
    meta = meta_from_bytes(encode(ct()))
    assert InstanceMeta.from_json(meta.to_json()) == meta


def test_implicit_vr_is_parsed() -> None:
    meta = meta_from_bytes(encode(ct(ts=ImplicitVRLittleEndian)))
    assert meta.transfer_syntax_uid == ImplicitVRLittleEndian and meta.modality == "CT"


def enhanced(percent: float | None = 40.0) -> Dataset:
    ds = ct()
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(ds, kw)
    ds.NumberOfFrames = 2
    ds.PixelData = b"\x00\x01" * 32  # two 4x4 frames of 16 bits
    shared, ori, meas = Dataset(), Dataset(), Dataset()
    ori.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    meas.PixelSpacing = [0.9, 0.9]
    shared.PlaneOrientationSequence = Sequence([ori])
    shared.PixelMeasuresSequence = Sequence([meas])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for z in (0.0, 2.0):
        fg, pos, tmp = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, z]
        fg.PlanePositionSequence = Sequence([pos])
        if percent is not None:
            tmp.add_new(0x00209245, "FL", percent)
            fg.TemporalPositionSequence = Sequence([tmp])
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    return ds


def test_enhanced_ct_geometry_and_phase() -> None:
    meta = meta_from_bytes(encode(enhanced()))
    assert meta.nominal_phase_percent == 40.0
    assert meta.image_position == (0.0, 0.0, 0.0) and meta.number_of_frames == 2
    assert meta_from_bytes(encode(enhanced(None))).nominal_phase_percent is None


def _mutated(**changes: object) -> Dataset:
    ds = ct()
    for kw, value in changes.items():
        if value is None:
            delattr(ds, kw)
        else:
            setattr(ds, kw, value)
    return ds


@pytest.mark.parametrize(
    ("ds", "kwargs", "exc", "status"),
    [
        (_mutated(SOPInstanceUID=None), {}, MissingAttribute, st.MISSING_ATTRIBUTE),
        (_mutated(StudyInstanceUID=None), {}, MissingAttribute, st.MISSING_ATTRIBUTE),
        (_mutated(StudyInstanceUID="1.2.x"), {}, InvalidIdentifier, st.INVALID_IDENTIFIER),
        (_mutated(FrameOfReferenceUID=None), {}, MissingGeometry, st.MISSING_GEOMETRY),
        (_mutated(ImagePositionPatient=[1.0, 2.0]), {}, MissingGeometry, st.MISSING_GEOMETRY),
        (_mutated(Modality="MR"), {}, ModalityMismatch, st.SOP_CLASS_MISMATCH),
        (ct(), {"negotiated_sop_class": ENHANCED_CT_IMAGE_STORAGE}, SOPClassMismatch, st.SOP_CLASS_MISMATCH),
        (ct(), {"affected_sop_instance": "1.2.3.4"}, SOPInstanceMismatch, st.SOP_INSTANCE_MISMATCH),
        (_mutated(PixelData=None), {}, UndecodableDataset, st.UNDECODABLE),
        # issue 9 item 6: UID rules (PS3.5 9.1) and Pixel Data length
        (_mutated(SeriesInstanceUID="1.02.3.4"), {}, InvalidIdentifier, st.INVALID_IDENTIFIER),
        (_mutated(SeriesInstanceUID="1..3.4"), {}, InvalidIdentifier, st.INVALID_IDENTIFIER),
        (_mutated(SeriesInstanceUID="1.2.3."), {}, InvalidIdentifier, st.INVALID_IDENTIFIER),
        (_mutated(FrameOfReferenceUID="1." + "2" * 63), {}, InvalidIdentifier, st.INVALID_IDENTIFIER),
        (_mutated(SOPClassUID="1.2.840.10008.5.1.4.1.1.02"), {}, InvalidIdentifier, st.INVALID_IDENTIFIER),
        (_mutated(PixelData=b"\x00\x01" * 8), {}, PixelDataLengthMismatch, st.PIXEL_DATA_LENGTH),
        (_mutated(BitsAllocated=0), {}, MissingAttribute, st.MISSING_ATTRIBUTE),
        (_mutated(Rows=None), {}, MissingAttribute, st.MISSING_ATTRIBUTE),
        # issue 9 item 5: non-finite or unusable geometry
        (_mutated(ImagePositionPatient=["NaN", 0, 0]), {}, InvalidGeometry, st.INVALID_GEOMETRY),
        (_mutated(ImagePositionPatient=[0, "inf", 0]), {}, InvalidGeometry, st.INVALID_GEOMETRY),
        (_mutated(ImageOrientationPatient=[1, 0, 0, 0, "NaN", 0]), {}, InvalidGeometry, st.INVALID_GEOMETRY),
        (_mutated(ImageOrientationPatient=[1, 0, 0, 1, 0, 0]), {}, InvalidGeometry, st.INVALID_GEOMETRY),
        (_mutated(ImageOrientationPatient=[0, 0, 0, 0, 1, 0]), {}, InvalidGeometry, st.INVALID_GEOMETRY),
        (_mutated(PixelSpacing=["nan", 1]), {}, InvalidGeometry, st.INVALID_GEOMETRY),
        (_mutated(PixelSpacing=[0, 1]), {}, InvalidGeometry, st.INVALID_GEOMETRY),
    ],
)
@pytest.mark.parametrize("parse", [meta_from_bytes, meta_via_pydicom], ids=["fast", "pydicom"])
def test_header_rules(ds: Dataset, kwargs: dict[str, str], exc: type[Exception], status: int,
                      parse: Callable[..., InstanceMeta]) -> None:
    with pytest.raises(exc) as info:
        parse(encode(ds), **kwargs)
    assert st.status_for(info.value) == status
    assert 0 < len(st.error_comment(info.value)) <= 64


def test_uid_refusal_says_which_rule() -> None:
    for uid, why in (("1.02.3", "leading zero"), ("1..3", "empty component"), ("1.2a", "not digits"),
                     ("1." + "2" * 63, "over 64")):
        with pytest.raises(InvalidIdentifier, match=why):
            meta_from_bytes(encode(_mutated(StudyInstanceUID=uid)))
    meta_from_bytes(encode(_mutated(StudyInstanceUID="1.0.20.3")))  # a component "0" is fine


def test_pixel_length_counts_frames_samples_and_bits() -> None:
    ds = enhanced()
    ds.PixelData = b"\x00\x01" * 16  # one frame of two
    with pytest.raises(PixelDataLengthMismatch):
        meta_from_bytes(encode(ds))
    ds = _mutated(BitsAllocated=8, PixelData=b"\x00" * 16)
    assert meta_from_bytes(encode(ds)).rows == 4
    ds = _mutated(SamplesPerPixel=3, BitsAllocated=8, PixelData=b"\x00" * 45)  # 48 needed (46 after padding)
    with pytest.raises(PixelDataLengthMismatch):
        meta_from_bytes(encode(ds))


def test_non_finite_per_frame_position_refused() -> None:
    ds = enhanced()
    ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient = [0, 0, "NaN"]
    with pytest.raises(InvalidGeometry, match="per-frame"):
        meta_from_bytes(encode(ds))


def test_truncated_is_undecodable() -> None:
    raw = encode(ct())
    for cut in (len(raw) - 3, len(raw) - 40, 300):
        with pytest.raises(UndecodableDataset):
            meta_from_bytes(raw[:cut])


def test_unknown_value_representation_is_undecodable_not_internal() -> None:
    """A corrupt VR makes pydicom raise NotImplementedError when the value is read (found by the SCP fuzz
    test, where it was answered 0xC000 "internal error"); it is the sender's data, not our defect."""
    raw = encode(ct())
    at = raw.index(b"\x08\x00\x18\x00UI")  # SOP Instance UID
    bad = raw[:at + 4] + b"ZZ" + raw[at + 6:]
    with pytest.raises(UndecodableDataset) as info:
        meta_from_bytes(bad)
    assert st.status_for(info.value) == st.UNDECODABLE


def test_status_table_fallbacks() -> None:
    assert st.status_for(RuntimeError("x")) == st.CANNOT_UNDERSTAND
    assert st.error_comment(RuntimeError("Doe^John")) == "internal error: RuntimeError"
    assert st.status_for(SpoolFull("x")) == st.OUT_OF_RESOURCES
    assert st.status_for(MemoryError()) == st.OUT_OF_RESOURCES


# ---------------------------------------------------------------------------------------- fast header scan


def _slow(raw: bytes, **kwargs: str) -> InstanceMeta:
    return meta_via_pydicom(raw, **kwargs)


def _outcome(fn: Callable[[], InstanceMeta]) -> InstanceMeta | type[Exception]:
    try:
        return fn()
    except IngestError as exc:
        return type(exc)


def _with_sequences(ds: Dataset) -> Dataset:
    """Undefined-length sequences (nested, with an undefined-length item) before the fields we read."""
    inner = Dataset()
    inner.CodeValue = "T-D3000"
    item = Dataset()
    item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds.add_new(0x00291010, "OB", b"\x01\x02" * 50)  # private bytes after the sequence
    return ds


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("variant", ["plain", "sequences", "utf8", "latin1", "empty fields"])
def test_fast_header_matches_pydicom(ts: str, variant: str) -> None:
    ds = ct(ts=ts)
    if variant == "sequences":
        _with_sequences(ds)
    elif variant == "utf8":
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SeriesDescription = "Thorax 4D Atemlage 50% – é"
        ds.ImageComments = "Kommentar mit \\ Backslash"
    elif variant == "latin1":
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ProtocolName = "Poumon 4D évaluation"
    elif variant == "empty fields":
        ds.SeriesNumber = None
        ds.ImageType = None
        ds.SeriesDescription = ""
    raw = encode(ds)
    assert _fast_header(raw) is not None, "fast scan gave up on an ordinary header"
    assert meta_from_bytes(raw) == _slow(raw)


@pytest.mark.parametrize(
    "change",
    [
        {"SpecificCharacterSet": "ISO 2022 IR 87"},  # other character sets: pydicom decodes
        {"SeriesDescription": ["two", "values"]},  # multi-valued LO
        {"SOPClassUID": ENHANCED_CT_IMAGE_STORAGE},  # multi-frame classes: pydicom
    ],
)
def test_fast_header_defers_to_pydicom(change: dict[str, object]) -> None:
    ds = ct()
    for kw, value in change.items():
        setattr(ds, kw, value)
    raw = encode(ds)
    assert _fast_header(raw) is None
    assert _outcome(lambda: meta_from_bytes(raw)) == _outcome(lambda: _slow(raw))


def test_fast_header_same_refusals() -> None:
    cases = [_mutated(SOPInstanceUID=None), _mutated(StudyInstanceUID=None),
             _mutated(StudyInstanceUID="1.2.x"), _mutated(FrameOfReferenceUID=None),
             _mutated(ImagePositionPatient=[1.0, 2.0]), _mutated(Modality="MR"),
             _mutated(PixelData=None), _mutated(InstanceNumber="7.5")]
    for ds in cases:
        case = encode(ds)
        assert _outcome(partial(meta_from_bytes, case)) == _outcome(partial(_slow, case))
    raw = encode(ct())
    bad_spacing = raw.replace(b"1.0\\1.0 ", b"abc\\1.0 ")  # an unparsable DS pydicom would not let us set
    assert bad_spacing != raw
    assert _outcome(lambda: meta_from_bytes(bad_spacing)) == _outcome(lambda: _slow(bad_spacing))
    for cut in (len(raw) - 5, len(raw) // 2, 200):
        assert _fast_header(raw[:cut]) is None
    kwargs = {"affected_sop_instance": "1.2.3.4"}
    assert _outcome(lambda: meta_from_bytes(raw, **kwargs)) == _outcome(lambda: _slow(raw, **kwargs))


def test_fast_header_on_product_phantom(phantom_dicom_factory: Callable[..., Any]) -> None:
    for vendor in ("siemens", "philips", "enhanced"):
        written = phantom_dicom_factory(vendor)
        for path in written.all_files()[::7]:
            raw = path.read_bytes()
            assert _fast_header(raw) is not None, vendor
            assert meta_from_bytes(raw) == _slow(raw), vendor

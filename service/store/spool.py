"""Durable spool of received instances plus a SQLite (WAL) index of their header fields.

Files live at ``<root>/<study_uid>/<series_uid>/<sop_uid>.dcm`` exactly as received (file meta header +
the data set bytes the peer sent, no transcoding, no pixel decoding). :meth:`Spool.store` returns only once
the file and its directory entry are on disk (temp file in the same directory, fsync, atomic rename, fsync
of the directory) and the index row is committed; a C-STORE is acknowledged only after that.

The files are the durable truth; the index is derived from them. It runs WAL with ``synchronous=NORMAL``
(committed rows survive a process crash; a power cut may roll back the last few) and :meth:`Spool.reconcile`
re-indexes any durable file the index lacks — ``itvnode serve`` calls it at start-up. A third fsync per
instance (the WAL) would cost ~25 % of ingest throughput for no durability gain.

Header checks live here too (:func:`parse_header`, :func:`instance_meta`) so that the SCP and any
re-indexing share one definition of what an acceptable CT instance is. Each refusal is an exception whose
DIMSE status is looked up in :mod:`service.net.dimse_status`.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
import shutil
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from service.dicomio.dicom_scan import LONG_VRS, UNDEFINED, Unsupported, element, skip_sequence
from service.store.durable import DIR_MODE, fsync_dir, private_dir, write_atomic

LOG = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
CT_STORAGE_CLASSES: tuple[str, ...] = (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
)
MULTIFRAME_CLASSES = frozenset({ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE})

# PS3.5 9.1: components of digits, no leading zero (except "0" itself), no empty component, <= 64 chars.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Path safety only (spool directories, files written before the stricter rule): digits and dots.
_PATH_SAFE_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TMP_SUFFIX = ".part"
_STALE_TMP_SECONDS = 3600.0
_NOMINAL_RESP_PHASE = 0x00209245  # Nominal Percentage of Respiratory Phase (not 0020,9241: that is cardiac)


INDEX_NAME = "index.sqlite"  # the spool's instance index, inside the spool directory


def read_revisions(spool_dir: Path, study_uid: str) -> dict[str, int]:
    """:meth:`Spool.revisions` from another process, read-only (a worker deriving output UIDs): SOP Instance
    UID -> revision of instances re-sent with changed content. Empty when there is no index."""
    index = Path(spool_dir) / INDEX_NAME
    if not index.exists():
        return {}
    con = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5.0)
    try:
        rows = con.execute("SELECT sop_instance_uid, revision FROM instances WHERE study_instance_uid = ? "
                           "AND revision > 0", (study_uid,)).fetchall()
    finally:
        con.close()
    return {r[0]: int(r[1]) for r in rows}


class IngestError(Exception):
    """An instance the node refuses; ``str(exc)`` is a short reason without patient data."""


class UndecodableDataset(IngestError):
    pass


class MissingAttribute(IngestError):
    pass


class MissingGeometry(MissingAttribute):
    pass


class InvalidIdentifier(IngestError):
    pass


class InvalidGeometry(IngestError):
    """Image plane values present but unusable: not finite, non-positive spacing, degenerate orientation."""


class PixelDataLengthMismatch(IngestError):
    """Native Pixel Data shorter than Rows x Columns x samples x frames x BitsAllocated say it must be."""


class ConflictingDuplicate(IngestError):
    """The SOP Instance UID is already stored in this study under another series."""


class SOPClassMismatch(IngestError):
    pass


class SOPInstanceMismatch(IngestError):
    pass


class ModalityMismatch(IngestError):
    pass


class SpoolFull(IngestError):
    """Free space is below the watermark (or the disk filled up mid-write); nothing was kept."""


class SpoolUnavailable(IngestError):
    """The spool could not be written (permissions, read-only or failing disk); nothing was kept."""


@dataclass(frozen=True)
class InstanceMeta:
    """Header fields the SCP extracts without decoding pixels."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    modality: str
    series_description: str
    protocol_name: str
    image_comments: str
    image_type: tuple[str, ...]
    series_number: int | None
    instance_number: int | None
    image_position: tuple[float, float, float] | None
    image_orientation: tuple[float, ...] | None
    nominal_phase_percent: float | None  # (0020,9245) when present
    rows: int | None
    columns: int | None
    number_of_frames: int | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> InstanceMeta:
        d = json.loads(text)
        for key in ("image_type", "image_position", "image_orientation"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


# --------------------------------------------------------------------------------------------- header parsing


def parse_header(encoded: bytes) -> Dataset:
    """Decode everything but the pixel data of a Part 10 byte string (``event.encoded_dataset()``).

    pydicom stops silently at a truncated element, so completeness is checked separately: the header must
    end at a Pixel Data element whose value fits in what was received.
    """
    return _parse_header(encoded)[0]


def _parse_header(encoded: bytes) -> tuple[Dataset, int | None]:
    """:func:`parse_header` plus the native Pixel Data length (None: encapsulated, or not known)."""
    fp = BytesIO(encoded)
    try:
        ds = dcmread(fp, stop_before_pixels=True)
        ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
        if ts == DeflatedExplicitVRLittleEndian:
            pixels = dcmread(BytesIO(encoded)).get("PixelData")
            if pixels is None:
                raise UndecodableDataset("PixelData missing (data set empty or truncated)")
            length: int | None = len(pixels)
        else:
            length = _check_pixel_element(encoded, fp.tell(), implicit=ts.is_implicit_VR,
                                          little=ts.is_little_endian)
        if ts.is_compressed:
            length = None
    except IngestError:
        raise
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, AttributeError,
            NotImplementedError, struct.error, zlib.error) as exc:
        raise UndecodableDataset(f"cannot decode data set: {type(exc).__name__}") from None
    return ds, length




def _check_pixel_element(encoded: bytes, pos: int, *, implicit: bool, little: bool) -> int | None:
    """Check that Pixel Data starts at ``pos`` and is complete; its value length (None: encapsulated)."""
    end = "<" if little else ">"
    if pos + 8 > len(encoded):
        raise UndecodableDataset("PixelData missing (data set empty or truncated)")
    group, elem = struct.unpack(end + "HH", encoded[pos:pos + 4])
    if (group, elem) != (0x7FE0, 0x0010):
        raise UndecodableDataset(f"data set corrupt or truncated before PixelData ({group:04X},{elem:04X})")
    if implicit:
        (length,), start = struct.unpack(end + "L", encoded[pos + 4:pos + 8]), pos + 8
    elif encoded[pos + 4:pos + 6] in LONG_VRS:
        if pos + 12 > len(encoded):
            raise UndecodableDataset("PixelData truncated")
        (length,), start = struct.unpack(end + "L", encoded[pos + 8:pos + 12]), pos + 12
    else:
        (length,), start = struct.unpack(end + "H", encoded[pos + 6:pos + 8]), pos + 8
    if length == 0xFFFFFFFF:  # encapsulated: fragments end with a Sequence Delimitation Item
        if encoded.rfind(struct.pack(end + "HHL", 0xFFFE, 0xE0DD, 0), start) < 0:
            raise UndecodableDataset("encapsulated PixelData truncated (no sequence delimiter)")
        return None
    if start + length > len(encoded):
        raise UndecodableDataset(f"PixelData truncated ({len(encoded) - start} of {length} bytes)")
    return int(length)


# The validation below reads either a pydicom Dataset or the plain dict of :func:`_fast_header`: both answer
# ``.get(keyword)`` with pydicom-like values (str, int, float, list of them).
Header = Dataset | dict[str, Any]


def _text(ds: Header, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _int(ds: Header, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        items = [float(v) for v in (value if isinstance(value, Iterable) and not isinstance(value, str)
                                    else [value])]
    except (TypeError, ValueError):
        return None
    return tuple(items) if len(items) == n else None


def _uid(ds: Header, keyword: str, *, required: bool = True) -> str | None:
    value = _text(ds, keyword)
    if not value:
        if required:
            raise MissingAttribute(f"{keyword} missing")
        return None
    if len(value) > 64 or not _UID_RE.match(value):
        raise InvalidIdentifier(f"{keyword} is not a valid UID ({_uid_fault(value)})")
    return value


def _uid_fault(value: str) -> str:
    """Which PS3.5 9.1 rule ``value`` breaks (only called for an invalid UID); short: the comment has 64."""
    if len(value) > 64:
        return "over 64 chars"
    if not _PATH_SAFE_RE.match(value):
        return "empty component" if re.fullmatch(r"[0-9.]*", value) else "not digits and dots"
    return "leading zero"


def _geometry_fault(position: tuple[float, ...], orientation: tuple[float, ...],
                    spacing: tuple[float, ...]) -> str | None:
    """Why finite-looking image plane values cannot describe a slice, or None (a few float operations)."""
    for name, values in (("ImagePositionPatient", position), ("ImageOrientationPatient", orientation),
                         ("PixelSpacing", spacing)):
        if not all(math.isfinite(v) for v in values):
            return f"{name} not finite"
    if spacing[0] <= 0.0 or spacing[1] <= 0.0:
        return "PixelSpacing not positive"
    r, c = orientation[:3], orientation[3:]
    rr, cc = r[0] * r[0] + r[1] * r[1] + r[2] * r[2], c[0] * c[0] + c[1] * c[1] + c[2] * c[2]
    dot = r[0] * c[0] + r[1] * c[1] + r[2] * c[2]
    if not (0.81 < rr < 1.21 and 0.81 < cc < 1.21) or abs(dot) > 0.1:
        return "ImageOrientationPatient not two orthogonal unit vectors"
    return None


def _check_pixel_length(ds: Header, pixel_length: int | None, frames: int | None) -> None:
    """Refuse native Pixel Data shorter than the Image Pixel attributes require (pure arithmetic)."""
    rows, columns, bits = _int(ds, "Rows"), _int(ds, "Columns"), _int(ds, "BitsAllocated")
    if not rows or not columns or not bits:
        raise MissingAttribute("Rows, Columns or BitsAllocated missing or zero")
    if pixel_length is None:
        return
    samples = _int(ds, "SamplesPerPixel") or 1
    expected = (rows * columns * max(samples, 1) * max(frames or 1, 1) * bits + 7) // 8
    if pixel_length < expected:
        raise PixelDataLengthMismatch(f"PixelData {pixel_length} bytes, image needs {expected}")


def _first_item(ds: Header, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    if not seq:
        return None
    try:
        return seq[0]  # type: ignore[no-any-return]
    except (IndexError, TypeError):
        return None


def _functional_group(ds: Header, macro: str) -> Dataset | None:
    """First item of ``macro`` from the per-frame groups of frame 1, else from the shared groups."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        group = _first_item(ds, groups)
        if group is not None:
            item = _first_item(group, macro)
            if item is not None:
                return item
    return None


def _frames_fault(ds: Header) -> str | None:
    """Every frame's ImagePositionPatient of a multi-frame instance must be finite (read by the assembler)."""
    for item in ds.get("PerFrameFunctionalGroupsSequence") or ():
        plane = _first_item(item, "PlanePositionSequence")
        position = _floats(plane.get("ImagePositionPatient") if plane is not None else None, 3)
        if position is not None and not all(math.isfinite(v) for v in position):
            return "per-frame ImagePositionPatient not finite"
    return None


def _find_phase_percent(ds: Header) -> float | None:
    top_value = ds.get("NominalPercentageOfRespiratoryPhase")
    if top_value is not None:
        top = _floats(top_value, 1)
        return top[0] if top else None
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        group = _first_item(ds, groups)
        if group is None:
            continue
        for elem in group:
            if elem.VR != "SQ":
                continue
            for item in elem.value:
                if _NOMINAL_RESP_PHASE in item:
                    found = _floats(item[_NOMINAL_RESP_PHASE].value, 1)
                    if found:
                        return found[0]
    return None


def instance_meta(ds: Header, transfer_syntax_uid: str, *, negotiated_sop_class: str | None = None,
                  affected_sop_instance: str | None = None, pixel_length: int | None = None) -> InstanceMeta:
    """Validate a CT header and extract the index fields; raise an :class:`IngestError` subclass on refusal.

    ``negotiated_sop_class`` / ``affected_sop_instance`` come from the C-STORE request; the data set
    must agree with them. ``pixel_length``: the native Pixel Data value length, checked against the image
    attributes (None: encapsulated or unknown, not checked).
    """
    sop_class = _uid(ds, "SOPClassUID")
    assert sop_class is not None
    if negotiated_sop_class is not None and sop_class != negotiated_sop_class:
        raise SOPClassMismatch("SOPClassUID differs from the negotiated SOP class")
    sop_instance = _uid(ds, "SOPInstanceUID")
    assert sop_instance is not None
    if affected_sop_instance is not None and sop_instance != affected_sop_instance.strip():
        raise SOPInstanceMismatch("SOPInstanceUID differs from Affected SOP Instance UID")
    study = _uid(ds, "StudyInstanceUID")
    series = _uid(ds, "SeriesInstanceUID")
    assert study is not None and series is not None
    modality = _text(ds, "Modality")
    if sop_class in CT_STORAGE_CLASSES and modality != "CT":
        raise ModalityMismatch(f"Modality {modality[:8] or '(empty)'!r} in a CT storage SOP class")
    for_uid = _uid(ds, "FrameOfReferenceUID", required=False)

    multiframe = sop_class in MULTIFRAME_CLASSES
    if multiframe:
        plane_pos = _functional_group(ds, "PlanePositionSequence")
        plane_ori = _functional_group(ds, "PlaneOrientationSequence")
        measures = _functional_group(ds, "PixelMeasuresSequence")
        position = _floats(plane_pos.get("ImagePositionPatient") if plane_pos else None, 3)
        orientation = _floats(plane_ori.get("ImageOrientationPatient") if plane_ori else None, 6)
        spacing = _floats(measures.get("PixelSpacing") if measures else None, 2)
    else:
        position = _floats(ds.get("ImagePositionPatient"), 3)
        orientation = _floats(ds.get("ImageOrientationPatient"), 6)
        spacing = _floats(ds.get("PixelSpacing"), 2)
    missing = [name for name, value in (("FrameOfReferenceUID", for_uid), ("ImagePositionPatient", position),
                                        ("ImageOrientationPatient", orientation), ("PixelSpacing", spacing))
               if value is None]
    if missing:
        raise MissingGeometry("missing or invalid " + ", ".join(missing))
    assert position is not None and orientation is not None and spacing is not None
    fault = _geometry_fault(position, orientation, spacing)
    if fault is None and multiframe:
        fault = _frames_fault(ds)
    if fault:
        raise InvalidGeometry(fault)
    _check_pixel_length(ds, pixel_length, _int(ds, "NumberOfFrames"))

    image_type = ds.get("ImageType")
    if not image_type:
        image_type_t: tuple[str, ...] = ()
    elif isinstance(image_type, str):
        image_type_t = (image_type,)
    else:
        image_type_t = tuple(str(v) for v in image_type)
    return InstanceMeta(
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax_uid,
        study_instance_uid=study,
        series_instance_uid=series,
        frame_of_reference_uid=for_uid,
        modality=modality,
        series_description=_text(ds, "SeriesDescription"),
        protocol_name=_text(ds, "ProtocolName"),
        image_comments=_text(ds, "ImageComments"),
        image_type=image_type_t,
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        image_position=position,  # type: ignore[arg-type]
        image_orientation=orientation,
        nominal_phase_percent=_find_phase_percent(ds),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        number_of_frames=_int(ds, "NumberOfFrames"),
    )


# (tag, keyword, VR) of every element instance_meta reads from a classic CT header.
_FAST_TAGS: dict[int, tuple[str, bytes]] = {
    0x00080005: ("SpecificCharacterSet", b"CS"),
    0x00080008: ("ImageType", b"CS"),
    0x00080016: ("SOPClassUID", b"UI"),
    0x00080018: ("SOPInstanceUID", b"UI"),
    0x00080060: ("Modality", b"CS"),
    0x0008103E: ("SeriesDescription", b"LO"),
    0x00181030: ("ProtocolName", b"LO"),
    0x0020000D: ("StudyInstanceUID", b"UI"),
    0x0020000E: ("SeriesInstanceUID", b"UI"),
    0x00200011: ("SeriesNumber", b"IS"),
    0x00200013: ("InstanceNumber", b"IS"),
    0x00200032: ("ImagePositionPatient", b"DS"),
    0x00200037: ("ImageOrientationPatient", b"DS"),
    0x00200052: ("FrameOfReferenceUID", b"UI"),
    0x00204000: ("ImageComments", b"LT"),
    0x00209245: ("NominalPercentageOfRespiratoryPhase", b"FL"),
    0x00280002: ("SamplesPerPixel", b"US"),
    0x00280008: ("NumberOfFrames", b"IS"),
    0x00280010: ("Rows", b"US"),
    0x00280011: ("Columns", b"US"),
    0x00280030: ("PixelSpacing", b"DS"),
    0x00280100: ("BitsAllocated", b"US"),
}
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"


#: anything the fast scanner does not handle exactly: pydicom takes over
_NotFast = Unsupported


def _fast_value(vr: bytes, raw: bytes, encoding: str) -> Any:
    if vr == b"US":
        if len(raw) != 2:
            raise _NotFast
        return struct.unpack("<H", raw)[0]
    if vr == b"FL":
        if len(raw) != 4:
            raise _NotFast
        return struct.unpack("<f", raw)[0]
    text = raw.decode(encoding).rstrip(" \0")
    if vr == b"UI":
        return text
    if vr == b"LT":
        return text.rstrip()
    if vr == b"DS":
        return [float(v) for v in text.split("\\")] if text.strip() else ""
    if vr == b"IS":
        return int(text) if text.strip() else ""
    values = [v.strip() for v in text.split("\\")]
    if len(values) == 1:
        return values[0]
    if vr != b"CS":  # multi-valued LO: leave pydicom's representation to pydicom
        raise _NotFast
    return values


def _fast_header(encoded: bytes) -> tuple[dict[str, Any], str, int | None] | None:
    """Header fields of a classic CT instance in Explicit/Implicit VR Little Endian, or None.

    Scans element headers with ``struct`` instead of building a pydicom Dataset (the largest per-instance
    CPU cost of ingest), checks that Pixel Data is complete like :func:`parse_header`, and gives up (None)
    on anything unusual: other transfer syntaxes or SOP classes, unexpected VRs, character sets other
    than ASCII / Latin-1 / UTF-8, out-of-order tags, malformed values.
    """
    try:
        if encoded[128:132] != b"DICM":
            return None
        tag, _, meta_len, hdr = element(encoded, 132, True)
        if tag != 0x00020000:
            return None
        pos, meta_end = 132 + hdr + 4, 132 + hdr + 4 + struct.unpack_from("<L", encoded, 132 + hdr)[0]
        ts = ""
        while pos < meta_end:
            tag, _, length, hdr = element(encoded, pos, True)
            if tag == 0x00020010:
                ts = encoded[pos + hdr:pos + hdr + length].decode("ascii").rstrip(" \0")
            pos += hdr + length
        if ts not in (_EXPLICIT_LE, _IMPLICIT_LE) or pos != meta_end:
            return None
        explicit = ts == _EXPLICIT_LE
        raw: dict[int, tuple[bytes, bytes]] = {}
        last, end = -1, len(encoded)
        while True:
            if pos + 8 > end:
                return None  # no Pixel Data: pydicom reports it
            tag, vr, length, hdr = element(encoded, pos, explicit)
            if tag == 0x7FE00010:
                break
            if tag <= last or tag >> 16 in (0x0002, 0xFFFE):
                return None
            last = tag
            if length == UNDEFINED:
                if tag in _FAST_TAGS:
                    return None
                pos = skip_sequence(encoded, pos + hdr, explicit)
            else:
                if tag in _FAST_TAGS:
                    want = _FAST_TAGS[tag][1]
                    if explicit and vr != want:
                        return None
                    raw[tag] = (want, encoded[pos + hdr:pos + hdr + length])
                pos += hdr + length
            if pos > end:
                return None
        pixel_length = _check_pixel_element(encoded, pos, implicit=not explicit, little=True)
        charset = raw.pop(0x00080005, (b"", b""))[1].decode("ascii").strip(" \0")
        if charset not in ("", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192"):
            return None
        encoding = "utf-8" if charset == "ISO_IR 192" else "latin-1"
        values = {_FAST_TAGS[t][0]: _fast_value(vr, v, encoding) for t, (vr, v) in raw.items()}
    except (_NotFast, IngestError, struct.error, ValueError, UnicodeDecodeError, IndexError):
        return None
    if values.get("SOPClassUID") != CT_IMAGE_STORAGE:
        return None
    return values, ts, pixel_length


def meta_from_bytes(encoded: bytes, **kwargs: Any) -> InstanceMeta:
    """Parse and validate a Part 10 byte string (see :func:`instance_meta` for ``kwargs``).

    Classic CT in little-endian VR goes through :func:`_fast_header` (a ~20x cheaper scan); anything it
    does not handle exactly is parsed by pydicom, which also produces every refusal reason.
    """
    fast = _fast_header(encoded)
    if fast is not None:
        return instance_meta(fast[0], fast[1], pixel_length=fast[2], **kwargs)
    return meta_via_pydicom(encoded, **kwargs)


def meta_via_pydicom(encoded: bytes, **kwargs: Any) -> InstanceMeta:
    """:func:`meta_from_bytes` without the fast scan (any SOP class, transfer syntax or character set)."""
    ds, pixel_length = _parse_header(encoded)
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    try:
        return instance_meta(ds, ts, pixel_length=pixel_length, **kwargs)
    except IngestError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
            NotImplementedError) as exc:
        # a malformed value pydicom only notices when the element is accessed (NotImplementedError: a
        # corrupt VR, "Unknown Value Representation", found by the SCP fuzz test)
        raise UndecodableDataset(f"cannot decode header value: {type(exc).__name__}") from None


# --------------------------------------------------------------------------------------------- the spool


# Instances are keyed by study: another study reusing a SOP Instance UID is kept apart (its own directory and
# row) and never touches the first study's file. ``revision`` counts re-sends of changed content (0: as first
# received); the assembler's fingerprint includes it, so a corrected instance re-opens a finished study.
_COLUMNS = ("study_instance_uid, sop_instance_uid, series_instance_uid, path, size, received_at, meta, "
            "revision")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    study_instance_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    meta TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (study_instance_uid, sop_instance_uid)
);
"""
_INDEXES = "CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid, received_at);"


class Spool:
    """Local-directory spool; every method is thread-safe (one SQLite connection behind a lock).

    ``min_free_bytes``: :meth:`store` refuses with :class:`SpoolFull` when the file would leave less than this
    free on the spool's file system. ``fsync=False`` is for tests and benchmarks only.
    """

    def __init__(self, root: Path, *, min_free_bytes: int = 0, fsync: bool = True,
                 max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        self.max_bytes = max_bytes
        #: called with the bytes a store needs when it would leave less than ``min_free_bytes`` free (the
        #: retention watermark purge, service.ops.retention); the check is repeated after it returns
        self.on_low_space: Callable[[int], object] | None = None
        self._low_space_lock = threading.Lock()
        self._used: int | None = None  # bytes of indexed instances (cached; refreshed when space is short)
        private_dir(self.root)
        self._lock = threading.RLock()
        self._known_dirs: set[Path] = set()
        self._db = sqlite3.connect(self.root / INDEX_NAME, check_same_thread=False, timeout=30.0,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'NORMAL' if fsync else 'OFF'}")
        self._migrate()
        self._db.executescript(_SCHEMA)
        self._db.executescript(_INDEXES)
        self._remove_stale_parts()

    def _migrate(self) -> None:
        """Index of the first layout (keyed by SOP Instance UID alone): re-key by study, keep every row."""
        cols = [r[1] for r in self._db.execute("PRAGMA table_info(instances)").fetchall()]
        if not cols or "revision" in cols:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("ALTER TABLE instances RENAME TO instances_v1")
                self._db.execute(_SCHEMA)
                self._db.execute(
                    f"INSERT INTO instances ({_COLUMNS}) SELECT study_instance_uid, sop_instance_uid, "
                    "series_instance_uid, path, size, received_at, meta, 0 FROM instances_v1")
                self._db.execute("DROP TABLE instances_v1")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        LOG.info("spool index migrated: instances keyed by (study, SOP Instance UID)")

    # -- writing

    def store(self, meta: InstanceMeta, encoded: bytes) -> Path:
        """Write ``encoded`` durably then index it. Returns the file path.

        Per study and SOP Instance UID: an identical re-send changes nothing but the received time (no
        write); changed content in the same series replaces the file and bumps the instance's revision (a
        corrected re-send); the same SOP Instance UID in another series of the study is refused with
        :class:`ConflictingDuplicate`. Another study with the same SOP Instance UID is simply another file.
        """
        for uid in (meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid):
            if not _PATH_SAFE_RE.match(uid) or len(uid) > 64:
                raise InvalidIdentifier("UID not usable as a spool path")
        series_dir = self.root / meta.study_instance_uid / meta.series_instance_uid
        final = series_dir / f"{meta.sop_instance_uid}.dcm"
        with self._lock:
            row = self._db.execute(
                "SELECT series_instance_uid, path, revision FROM instances WHERE study_instance_uid = ? "
                "AND sop_instance_uid = ?", (meta.study_instance_uid, meta.sop_instance_uid)).fetchone()
        if row is not None:
            if row[0] != meta.series_instance_uid:
                raise ConflictingDuplicate("SOP Instance UID already stored in another series")
            if self._same_bytes(self.root / row[1], encoded):
                with self._lock:
                    cur = self._db.execute(
                        "UPDATE instances SET received_at = ? WHERE study_instance_uid = ? AND "
                        "sop_instance_uid = ?", (time.time(), meta.study_instance_uid, meta.sop_instance_uid))
                if cur.rowcount == 1 and (self.root / row[1]).is_file():
                    return self.root / row[1]
                row = None  # purged meanwhile (service.ops.retention): store it as new
        revision = 0
        if row is not None:
            revision = int(row[2]) + 1
            LOG.warning("study %s: instance %s re-sent with changed content; replacing it (revision %d)",
                        meta.study_instance_uid, meta.sop_instance_uid, revision)
        if self.free_bytes() - len(encoded) < self.min_free_bytes:
            self._make_room(len(encoded))
        tmp = series_dir / f".{meta.sop_instance_uid}.{threading.get_ident()}{_TMP_SUFFIX}"
        for attempt in (1, 2):
            try:
                self._ensure_dir(series_dir)
                self._write_durably(tmp, final, encoded)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise SpoolUnavailable("spool directory vanished during the write") from None
                self._known_dirs.discard(series_dir)  # removed behind our back (e.g. a purge): recreate
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SpoolFull("spool file system is full") from None
                name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                raise SpoolUnavailable(f"spool write failed: {name}") from None
        self._index(meta, final, len(encoded), revision=revision)
        return final

    @staticmethod
    def _same_bytes(path: Path, encoded: bytes) -> bool:
        """Whether the stored file holds exactly ``encoded`` (read only when a SOP Instance UID recurs)."""
        try:
            if path.stat().st_size != len(encoded):
                return False
            return path.read_bytes() == encoded
        except OSError:
            return False

    def _write_durably(self, tmp: Path, final: Path, encoded: bytes) -> None:
        write_atomic(final, encoded, tmp=tmp, fsync=self.fsync)

    def _ensure_dir(self, series_dir: Path) -> None:
        if series_dir in self._known_dirs:
            return
        with self._lock:
            created = []
            for d in (series_dir.parent, series_dir):
                if not d.is_dir():
                    d.mkdir(DIR_MODE, exist_ok=True)
                    created.append(d)
            if self.fsync:
                for d in created:
                    fsync_dir(d.parent)
            self._known_dirs.add(series_dir)

    def _make_room(self, needed: int) -> None:
        """Below the watermark: let retention purge finished work (one store at a time), then check again;
        :class:`SpoolFull` (0xA700) only when that did not free enough."""
        with self._low_space_lock:
            self._used = None
            if self.on_low_space is not None and self.free_bytes() - needed < self.min_free_bytes:
                try:
                    self.on_low_space(needed)
                except Exception:
                    LOG.exception("retention purge for space failed")
                self._used = None
            if self.free_bytes() - needed < self.min_free_bytes:
                raise SpoolFull("spool below its free-space watermark")

    def _index(self, meta: InstanceMeta, path: Path, size: int, received_at: float | None = None,
               revision: int = 0) -> None:
        """Upsert the row of (study, SOP Instance UID). Never deletes a file: other rows own other paths."""
        rel = path.relative_to(self.root).as_posix()
        with self._lock:
            self._db.execute(
                f"INSERT INTO instances ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (study_instance_uid, sop_instance_uid) DO UPDATE SET "
                "series_instance_uid = excluded.series_instance_uid, path = excluded.path, "
                "size = excluded.size, received_at = excluded.received_at, meta = excluded.meta, "
                "revision = MAX(instances.revision, excluded.revision)",
                (meta.study_instance_uid, meta.sop_instance_uid, meta.series_instance_uid, rel, size,
                 time.time() if received_at is None else received_at, meta.to_json(), revision),
            )
            if self._used is not None:
                self._used += size

    def remove_instances(self, study_uid: str, *, received_before: float,
                         frame_of_reference_uid: str | None = None) -> tuple[int, int]:
        """Delete the study's instances received before ``received_before`` (epoch; only of one frame of
        reference when given): index rows first, in one transaction, then their files. Returns (instances,
        bytes). Instances received later (a new arrival or an identical re-send during the purge) stay, and
        a file rewritten after ``received_before`` is never unlinked."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT sop_instance_uid, path, size, meta FROM instances WHERE study_instance_uid = ? "
                    "AND received_at <= ?", (study_uid, received_before)).fetchall()
                if frame_of_reference_uid is not None:
                    rows = [r for r in rows
                            if InstanceMeta.from_json(r[3]).frame_of_reference_uid == frame_of_reference_uid]
                self._db.executemany(
                    "DELETE FROM instances WHERE study_instance_uid = ? AND sop_instance_uid = ? AND "
                    "received_at <= ?", [(study_uid, r[0], received_before) for r in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._used = None
        freed = 0
        dirs: set[Path] = set()
        for _sop, rel, size, _meta in rows:
            path = self.root / rel
            try:
                if path.stat().st_mtime <= received_before + 1.0:
                    path.unlink()
                    freed += int(size)
            except FileNotFoundError:
                pass
            dirs.add(path.parent)
        for d in sorted(dirs | {d.parent for d in dirs}, key=lambda p: len(p.parts), reverse=True):
            if d != self.root and d.is_relative_to(self.root):
                try:
                    d.rmdir()  # only when empty
                    self._known_dirs.discard(d)
                except OSError:
                    pass
        return len(rows), freed

    def used_bytes(self) -> int:
        """Bytes of the indexed instances."""
        with self._lock:
            if self._used is None:
                row = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM instances").fetchone()
                self._used = int(row[0])
            return self._used

    def remove_study(self, study_uid: str) -> int:
        """Delete a study's files and index rows (after export); returns the number of instances removed."""
        with self._lock:
            rows = self._db.execute("SELECT path FROM instances WHERE study_instance_uid = ?",
                                    (study_uid,)).fetchall()
            self._db.execute("DELETE FROM instances WHERE study_instance_uid = ?", (study_uid,))
            self._known_dirs = {d for d in self._known_dirs if d.parent.name != study_uid}
        if _PATH_SAFE_RE.match(study_uid):
            shutil.rmtree(self.root / study_uid, ignore_errors=True)
        return len(rows)

    # -- reading

    def study_uids(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT study_instance_uid FROM instances ORDER BY study_instance_uid").fetchall()
        return [r[0] for r in rows]

    def instances(self, study_uid: str) -> list[tuple[InstanceMeta, Path]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT meta, path FROM instances WHERE study_instance_uid = ? ORDER BY series_instance_uid, "
                "received_at", (study_uid,)).fetchall()
        return [(InstanceMeta.from_json(m), self.root / p) for m, p in rows]

    def revisions(self, study_uid: str) -> dict[str, int]:
        """SOP Instance UID -> revision of the study's instances re-sent with changed content (> 0)."""
        with self._lock:
            rows = self._db.execute("SELECT sop_instance_uid, revision FROM instances WHERE "
                                    "study_instance_uid = ? AND revision > 0", (study_uid,)).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def last_received(self, study_uid: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MAX(received_at) FROM instances WHERE study_instance_uid = ?",
                                   (study_uid,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def free_bytes(self) -> int:
        """Free space for new instances: the file system's, or what ``max_bytes`` leaves if that is less."""
        free = shutil.disk_usage(self.root).free
        if self.max_bytes is not None:
            free = min(free, self.max_bytes - self.used_bytes())
        return free

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- recovery

    def reconcile(self) -> tuple[int, int]:
        """Make the index match the files: index durable files it lacks, drop rows whose file is gone.

        Returns ``(indexed, dropped)``. Files that fail today's header rules are left alone and logged.
        """
        with self._lock:
            rows = dict(self._db.execute("SELECT path, sop_instance_uid FROM instances").fetchall())
        on_disk = {p.relative_to(self.root).as_posix(): p for p in self.root.glob("*/*/*.dcm")}
        indexed = dropped = 0
        for rel, path in on_disk.items():
            if rel in rows:
                continue
            try:
                raw = path.read_bytes()
                meta = meta_from_bytes(raw)
            except (OSError, IngestError) as exc:
                LOG.warning("spool file %s not indexed: %s", rel, exc)
                continue
            if path != self.root / meta.study_instance_uid / meta.series_instance_uid / \
                    f"{meta.sop_instance_uid}.dcm":
                LOG.warning("spool file %s does not match its header UIDs; not indexed", rel)
                continue
            self._index(meta, path, len(raw), received_at=path.stat().st_mtime)
            indexed += 1
        gone = [rel for rel in rows if rel not in on_disk]
        if gone:
            with self._lock:
                self._db.executemany("DELETE FROM instances WHERE path = ?", [(g,) for g in gone])
            dropped = len(gone)
        if indexed or dropped:
            LOG.warning("spool index reconciled: %d file(s) re-indexed, %d missing file(s) dropped", indexed,
                        dropped)
        return indexed, dropped

    def _remove_stale_parts(self) -> None:
        """Drop temp files left by a crash mid-write (old enough not to belong to a live writer)."""
        cutoff = time.time() - _STALE_TMP_SECONDS
        for part in self.root.glob(f"*/*/.*{_TMP_SUFFIX}"):
            try:
                if part.stat().st_mtime < cutoff:
                    part.unlink()
            except OSError:
                pass

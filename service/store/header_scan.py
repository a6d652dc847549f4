"""Reading an instance's header from the bytes a peer sent: completeness of Pixel Data, the fast
``struct`` scan of classic CT headers, pydicom for everything else, then :func:`instance_meta`'s checks."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from io import BytesIO
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from service.dicomio.dicom_scan import LONG_VRS, UNDEFINED, Unsupported, element, skip_sequence
from service.store.ingest_errors import IngestError, UndecodableDataset
from service.store.instance_meta import CT_IMAGE_STORAGE, InstanceMeta, instance_meta


def _parse_header(encoded: bytes) -> tuple[Dataset, int | None]:
    """Everything but the pixel data of a Part 10 byte string (``event.encoded_dataset()``), and the native
    Pixel Data length (None: encapsulated, or not known). pydicom stops silently at a truncated element, so
    completeness is checked separately: the header must end at a Pixel Data element whose value fits in what
    was received."""
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




def _check_pixel_element(encoded: bytes, pos: int, *, implicit: bool, little: bool,
                          total: int | None = None) -> int | None:
    """Check that Pixel Data starts at ``pos`` and is complete; its value length (None: encapsulated).

    ``total``: the length of the whole byte string when ``encoded`` is only its beginning (the rest was
    streamed to disk); an encapsulated Pixel Data cannot be checked from a prefix (:class:`_NotFast`)."""
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
        if total is not None and total > len(encoded):
            raise Unsupported
        if encoded.rfind(struct.pack(end + "HHL", 0xFFFE, 0xE0DD, 0), start) < 0:
            raise UndecodableDataset("encapsulated PixelData truncated (no sequence delimiter)")
        return None
    have = len(encoded) if total is None else total
    if start + length > have:
        raise UndecodableDataset(f"PixelData truncated ({have - start} of {length} bytes)")
    return int(length)



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


def _fast_header(encoded: bytes, total: int | None = None) -> tuple[dict[str, Any], str, int | None] | None:
    """Header fields of a classic CT instance in Explicit/Implicit VR Little Endian, or None.

    Scans element headers with ``struct`` instead of building a pydicom Dataset (the largest per-instance
    CPU cost of ingest), checks that Pixel Data is complete like :func:`_parse_header`, and gives up (None)
    on anything unusual: other transfer syntaxes or SOP classes, unexpected VRs, character sets other
    than ASCII / Latin-1 / UTF-8, out-of-order tags, malformed values. ``total``: see
    :func:`_check_pixel_element` (the header must then lie within ``encoded``).
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
        pixel_length = _check_pixel_element(encoded, pos, implicit=not explicit, little=True, total=total)
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


def meta_from_prefix(prefix: bytes, total: int, read_all: Callable[[], bytes], **kwargs: Any) -> InstanceMeta:
    """:func:`meta_from_bytes` for an instance streamed to disk: the fast scan on its first bytes
    (``prefix``, of ``total``), else ``read_all()`` and :func:`meta_from_bytes` on the whole."""
    fast = _fast_header(prefix, total=total)
    if fast is not None:
        return instance_meta(fast[0], fast[1], pixel_length=fast[2], **kwargs)
    return meta_from_bytes(prefix if len(prefix) >= total else read_all(), **kwargs)


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

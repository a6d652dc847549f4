"""The fast reader of native 16-bit classic CT: header scan and raw pixel reads, without pydicom.

Classic single-frame CT in Explicit/Implicit VR Little Endian with 16-bit native pixels (what scanners and
the spool hold in practice) is read without pydicom: a ``struct`` walk over the element headers decodes
only the attributes below and finds the Pixel Data offset, then the pixels are read straight from the file
into the preallocated output slice (file reads and numpy arithmetic release the GIL, so
service/dicomio/volume.py runs several at a time). Anything else (other transfer syntaxes, multi-frame,
8/32-bit or colour pixels, odd character sets, malformed headers): :func:`scan_series` says None and
volume.py reads the series with pydicom.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.dicomio.dicom_scan import LONG_VRS, UNDEFINED, Unsupported, element, skip_sequence
from service.dicomio.geometry import Geometry, SliceRef, VolumeError

_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_PIXEL_DATA = 0x7FE00010
_HEADER_CHUNK = 16384
_TAG_VR_LENGTH = struct.Struct("<HH2sH").unpack_from  # explicit VR element header: group, element, VR, length
_U32 = struct.Struct("<L").unpack_from
# tag -> (keyword, VR) of every attribute plan_series and the pixel decoder read
_SCAN_TAGS: dict[int, tuple[str, bytes]] = {
    0x00080005: ("SpecificCharacterSet", b"CS"),
    0x00080016: ("SOPClassUID", b"UI"),
    0x00080018: ("SOPInstanceUID", b"UI"),
    0x00080060: ("Modality", b"CS"),
    0x0008103E: ("SeriesDescription", b"LO"),
    0x0020000D: ("StudyInstanceUID", b"UI"),
    0x0020000E: ("SeriesInstanceUID", b"UI"),
    0x00200032: ("ImagePositionPatient", b"DS"),
    0x00200037: ("ImageOrientationPatient", b"DS"),
    0x00200052: ("FrameOfReferenceUID", b"UI"),
    0x00280002: ("SamplesPerPixel", b"US"),
    0x00280004: ("PhotometricInterpretation", b"CS"),
    0x00280008: ("NumberOfFrames", b"IS"),
    0x00280010: ("Rows", b"US"),
    0x00280011: ("Columns", b"US"),
    0x00280030: ("PixelSpacing", b"DS"),
    0x00280100: ("BitsAllocated", b"US"),
    0x00280101: ("BitsStored", b"US"),
    0x00280103: ("PixelRepresentation", b"US"),
    0x00281052: ("RescaleIntercept", b"DS"),
    0x00281053: ("RescaleSlope", b"DS"),
    0x52009230: ("PerFrameFunctionalGroupsSequence", b"SQ"),
}
_MULTI_VALUED = frozenset({"ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"})


#: the file is not one the fast reader handles exactly: pydicom reads it
_NotNative = Unsupported


class ScannedHeader(dict[str, Any]):
    """The scanned attributes of one file, readable like a pydicom Dataset by ``plan_series``."""

    pixel_offset: int = 0
    signed: bool = False
    bits_stored: int = 16

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _value(keyword: str, vr: bytes, raw: bytes) -> Any:
    if vr == b"US":
        if len(raw) != 2:
            raise _NotNative
        return struct.unpack("<H", raw)[0]
    text = raw.decode("latin-1").rstrip(" \0")
    if vr == b"UI":
        return text
    if vr == b"DS":
        values = [float(v) for v in text.split("\\") if v.strip()]
        if keyword in _MULTI_VALUED:
            return values
        return values[0] if len(values) == 1 else ("" if not values else values)
    if vr == b"IS":
        return int(text) if text.strip() else ""
    return text.strip()


def _scan_header(path: str) -> ScannedHeader:
    """The attributes in :data:`_SCAN_TAGS` and the Pixel Data offset of a native 16-bit classic CT file."""
    with open(path, "rb") as fh:
        buf = fh.read(_HEADER_CHUNK)
        size = os.fstat(fh.fileno()).st_size
        try:
            return _scan_buffer(buf, size)
        except IndexError:  # the header runs past the first chunk: scan the whole file
            if len(buf) >= size:
                raise _NotNative from None
            buf += fh.read()
            try:
                return _scan_buffer(buf, size)
            except IndexError:
                raise _NotNative from None


def _scan_buffer(buf: bytes, size: int) -> ScannedHeader:
    """:func:`_scan_header` on the file's first bytes; IndexError when they end before Pixel Data."""
    if buf[128:132] != b"DICM":
        raise _NotNative
    tag, _, _, hdr = element(buf, 132, True)
    if tag != 0x00020000:
        raise _NotNative
    (meta_len,) = struct.unpack_from("<L", buf, 132 + hdr)
    pos = 132 + hdr + 4
    meta_end = pos + meta_len
    ts = ""
    while pos < meta_end:
        tag, _, length, hdr = element(buf, pos, True)
        if length == UNDEFINED:
            raise _NotNative
        if tag == 0x00020010:
            ts = buf[pos + hdr : pos + hdr + length].decode("ascii").rstrip(" \0")
        pos += hdr + length
    if ts not in (_EXPLICIT_LE, _IMPLICIT_LE) or pos != meta_end:
        raise _NotNative
    explicit = ts == _EXPLICIT_LE
    out = ScannedHeader()
    last = -1
    n_buf = len(buf)
    while True:
        if pos + 8 > n_buf:
            raise IndexError("header continues")
        if explicit:  # element() inlined: this loop runs ~70 times per file, 1,200 files per study
            group, elem, vr, length = _TAG_VR_LENGTH(buf, pos)
            if group == 0xFFFE:
                raise _NotNative
            tag = group << 16 | elem
            hdr = 8
            if vr in LONG_VRS:
                (length,) = _U32(buf, pos + 8)
                hdr = 12
        else:
            tag, vr, length, hdr = element(buf, pos, explicit)
        if tag == _PIXEL_DATA:
            break
        if tag <= last or tag >> 16 in (0x0002, 0xFFFE):
            raise _NotNative
        last = tag
        known = _SCAN_TAGS.get(tag)
        if known is not None and explicit and vr != known[1]:
            raise _NotNative
        if length == UNDEFINED:
            if known is not None:
                raise _NotNative  # a functional-groups sequence: multi-frame
            pos = skip_sequence(buf, pos + hdr, explicit)
            continue
        if known is not None:
            if known[1] == b"SQ":
                raise _NotNative
            end = pos + hdr + length
            if end > n_buf:
                raise IndexError("value continues")
            out[known[0]] = _value(known[0], known[1], buf[pos + hdr : end])
        pos += hdr + length
    if length == UNDEFINED or (explicit and vr not in (b"OW", b"OB")):
        raise _NotNative  # encapsulated or odd
    if out.get("SpecificCharacterSet", "") not in ("", "ISO_IR 6", "ISO_IR 100"):
        raise _NotNative  # SeriesDescription would need decoding
    rows, cols = int(out.get("Rows", 0) or 0), int(out.get("Columns", 0) or 0)
    bits_stored = int(out.get("BitsStored", 16) or 16)
    if (
        int(out.get("NumberOfFrames", 1) or 1) != 1
        or int(out.get("SamplesPerPixel", 1) or 1) != 1
        or out.get("PhotometricInterpretation", "MONOCHROME2") != "MONOCHROME2"
        or out.get("BitsAllocated") != 16
        or not 1 <= bits_stored <= 16
        or out.get("PixelRepresentation", 0) not in (0, 1)
        or rows < 1
        or cols < 1
        or length != rows * cols * 2
        or pos + hdr + length > size
    ):
        raise _NotNative
    out.pixel_offset = pos + hdr
    out.signed = out.get("PixelRepresentation", 0) == 1
    out.bits_stored = bits_stored
    return out


def scan_series(names: Sequence[str]) -> list[ScannedHeader] | None:
    """Headers of every file of a series for the fast reader, or None when any file needs pydicom."""
    headers = []
    for name in names:
        try:
            headers.append(_scan_header(name))
        except (_NotNative, OSError, struct.error, ValueError, UnicodeDecodeError, IndexError):
            return None
    return headers


def read_native(path: str, head: ScannedHeader, s: SliceRef, geom: Geometry, dst: np.ndarray) -> None:
    """Decode one native slice into ``dst`` (Y, X) of the output volume, in canonical axes.

    The usual case (int16 output, integral rescale exact in int16, no flip) reads the pixels straight into
    ``dst`` and rescales them there: no buffer, one pass less.
    """
    bits = head.bits_stored
    slope, intercept = s.slope, s.intercept
    integral = dst.dtype == np.int16 and slope.is_integer() and intercept.is_integer()
    m, c = (int(slope), int(intercept)) if integral else (1, 0)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if head.signed else (0, (1 << bits) - 1)
    ends = (m * lo, m * hi, m * lo + c, m * hi + c, c)
    exact16 = integral and (bits < 16 or head.signed) and min(ends) >= -32768 and max(ends) <= 32767
    raw_dtype = np.dtype("<i2" if head.signed else "<u2")
    in_place = (exact16 and not geom.flip_rows and not geom.flip_cols and dst.flags.c_contiguous
                and dst.dtype == np.dtype("<i2"))  # a little-endian machine: the bytes are the values
    raw = dst.view(raw_dtype) if in_place else np.empty((geom.rows, geom.columns), dtype=raw_dtype)
    _read_into(path, head.pixel_offset, raw)
    if bits < 16:  # ignore the unused high bits like pydicom does (signed: sign-extend from the top bit)
        if head.signed:
            np.left_shift(raw, 16 - bits, out=raw)
            np.right_shift(raw, 16 - bits, out=raw)
        else:
            np.bitwise_and(raw, np.uint16((1 << bits) - 1), out=raw)
    src = raw
    if geom.flip_rows:
        src = src[::-1, :]
    if geom.flip_cols:
        src = src[:, ::-1]
    if exact16:  # exact in int16: one or two passes (none for the identity read in place)
        s16 = src.view(np.int16)
        if m == 1:
            if c or not in_place:
                np.add(s16, np.int16(c), out=dst)
        else:
            np.multiply(s16, np.int16(m), out=dst)
            if c:
                np.add(dst, np.int16(c), out=dst)
        return
    if integral:
        wide = src.astype(np.int64 if max(abs(e) for e in ends) >= 2**31 else np.int32)
        if m != 1:
            np.multiply(wide, m, out=wide)
        if c:
            np.add(wide, c, out=wide)
        np.clip(wide, -32768, 32767, out=wide)
        dst[...] = wide
        return
    store_hu(src, slope, intercept, dst)


def _read_into(path: str, offset: int, out: np.ndarray) -> None:
    """Fill the contiguous array ``out`` with the file's bytes from ``offset`` (positioned reads: no file
    object, no seek; the read releases the GIL)."""
    view = memoryview(out.data).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        while got < view.nbytes:
            n = os.preadv(fd, [view[got:]], offset + got)
            if not n:
                raise VolumeError(f"{path}: pixel data ends early")
            got += n
    finally:
        os.close(fd)


def store_hu(frame: np.ndarray, slope: float, intercept: float, dst: np.ndarray) -> None:
    """``dst = frame * slope + intercept``, rounded and clipped when ``dst`` is int16."""
    v = frame.astype(np.float64) * slope + intercept if (slope, intercept) != (1.0, 0.0) else frame
    if dst.dtype == np.int16:
        v = np.clip(np.rint(v), -32768, 32767)
    dst[...] = v

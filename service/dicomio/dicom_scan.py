"""Walking a little-endian DICOM byte string element by element, without pydicom.

The one element walker the spool's per-instance header scan (:mod:`service.store.spool`) and the volume
reader's
fast path (:mod:`service.dicomio.volume`) share. It reads tags, VRs and lengths only; each caller decides
which values
it wants and what to do with what this walker does not handle (:class:`Unsupported`: hand the file to pydicom)
or with bytes that end too early (:class:`Truncated`).
"""

from __future__ import annotations

import struct

#: explicit VRs whose length field is 4 bytes (after 2 reserved bytes)
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 16


class Unsupported(Exception):
    """A structure the walker does not handle exactly (deep nesting, a malformed sequence)."""


class Truncated(IndexError):
    """The bytes end before the structure does."""


def element(buf: bytes, pos: int, explicit: bool) -> tuple[int, bytes, int, int]:
    """(tag, VR or b"", value length, header length) of the element at ``pos``."""
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = group << 16 | elem
    if group == 0xFFFE or not explicit:
        (length,) = struct.unpack_from("<L", buf, pos + 4)
        return tag, b"", length, 8
    vr = buf[pos + 4 : pos + 6]
    if vr in LONG_VRS:
        (length,) = struct.unpack_from("<L", buf, pos + 8)
        return tag, vr, length, 12
    (length,) = struct.unpack_from("<H", buf, pos + 6)
    return tag, vr, length, 8


def skip_sequence(buf: bytes, pos: int, explicit: bool, depth: int = 0) -> int:
    """Position after an undefined-length sequence whose first item starts at ``pos``."""
    if depth > _MAX_DEPTH:
        raise Unsupported("sequences nested too deep")
    while True:
        tag, _, length, _ = element(buf, pos, explicit)
        if tag == 0xFFFEE0DD:  # sequence delimitation
            return pos + 8
        if tag != 0xFFFEE000:
            raise Unsupported(f"item tag expected, found {tag:08X}")
        pos += 8
        if length != UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: walk its elements to the item delimitation
            tag, _, length, hdr = element(buf, pos, explicit)
            if tag == 0xFFFEE00D:
                pos += 8
                break
            pos += hdr
            pos = skip_sequence(buf, pos, explicit, depth + 1) if length == UNDEFINED else pos + length
            if pos > len(buf):
                raise Truncated("sequence runs past the end")

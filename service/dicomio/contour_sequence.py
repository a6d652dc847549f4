"""ROI Contour Sequence encoding of an RTSTRUCT: ContourData as DS text and the ContourSequence pre-encoded.

Contours are the bulk of a structure set (10^4 items, 10^6 coordinates): they are given to pydicom as encoded
bytes (in the output's transfer syntax, as pydicom itself would write them) so that building and writing them
does not dominate the run time. Contours trace voxel edges (:mod:`service.dicomio.contours`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from service.dicomio.contours import Loops, loop_points, trace_mask
from service.dicomio.geometry import Geometry

_CONTOUR_DATA = Tag(0x3006, 0x0050)
_CONTOURS = Tag(0x3006, 0x0040)
_CONTOUR_IMAGES = Tag(0x3006, 0x0016)
_GEOMETRIC_TYPE = Tag(0x3006, 0x0042)
_N_POINTS = Tag(0x3006, 0x0046)
_CONTOUR_NUMBER = Tag(0x3006, 0x0048)
_REF_CLASS = Tag(0x0008, 0x1150)
_REF_INSTANCE = Tag(0x0008, 0x1155)
_REF_FRAME = Tag(0x0008, 0x1160)
MAX_EXPLICIT_LEN = 0xFFFE  # 16-bit length of DS in explicit VR


def _ds(v: float) -> str:
    s = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def _ds_contour_data(loops: Loops, geometry: Geometry) -> list[bytes]:
    """ContourData of each loop (patient coordinates, see service.dicomio.contours.loop_points) as DS text: 4
    decimals (0.1 um), trailing zeros dropped, <= 16 characters.

    Vertices lie on a half-pixel lattice, so an ROI has few distinct coordinates: each is formatted once and
    the texts are laid out with array operations. With rows and columns along the axes, a coordinate
    ``position[a] + (col * dx) * row_cos[a] + (row * dy) * col_cos[a]`` has one product +-0, so it depends on
    the slice's position and on the column (or the row) alone: the distinct values come from that small table,
    computed by the same expression, without computing or sorting every vertex.
    """
    if not len(loops):
        return []
    g = geometry
    ipp = np.asarray(g.positions, dtype=np.float64).reshape(-1, 3)
    iop = np.asarray(g.orientation, dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]
    dy, dx = float(g.pixel_spacing[0]), float(g.pixel_spacing[1])
    z = np.repeat(loops.slices, np.diff(loops.offsets))
    texts: list[str] = []
    ids = np.empty((z.size, 3), dtype=np.int64)
    points = None
    for a in range(3):
        if row_cos[a] != 0 and col_cos[a] != 0:  # oblique: every vertex, sorted
            if points is None:
                points = loop_points(loops, ipp, g.pixel_spacing, g.orientation)
            uniq, inverse = np.unique(np.round(points[:, a], 4), return_inverse=True)
            ids[:, a] = inverse.reshape(-1) + len(texts)
        else:
            origins, group = np.unique(ipp[:, a], return_inverse=True)  # equal positions: equal values
            if row_cos[a] != 0:
                lat = (loops.cols + 0.5).astype(np.int64)
            elif col_cos[a] != 0:
                lat = (loops.rows + 0.5).astype(np.int64)
            else:
                lat = np.zeros(z.size, dtype=np.int64)
            lo, span = int(lat.min()), int(lat.max() - lat.min()) + 1
            key = group.reshape(-1)[z] * span + (lat - lo)
            used = np.zeros(origins.size * span, dtype=bool)
            used[key] = True
            cells = np.flatnonzero(used)
            cg, cl = np.divmod(cells, span)
            half = (cl + lo) - 0.5  # the cell's column (row), the other index any: its product is +-0
            col = half if row_cos[a] != 0 else np.full(cells.size, -0.5)
            row = half if col_cos[a] != 0 else np.full(cells.size, -0.5)
            values = origins[cg] + (col * dx) * row_cos[a] + (row * dy) * col_cos[a]
            uniq, inverse = np.unique(np.round(values, 4), return_inverse=True)
            tid = np.zeros(used.size, dtype=np.int64)
            tid[cells] = inverse.reshape(-1)
            ids[:, a] = tid[key] + len(texts)
        texts += [_ds(x) for x in uniq.tolist()]
    # every value followed by a backslash: fixed-width texts gathered, then the padding deleted
    with_sep = [(t + "\\").encode("ascii") for t in texts]
    table = np.array(with_sep, dtype=f"S{max(len(t) for t in with_sep)}")
    chars = table[ids.reshape(-1)].tobytes().translate(None, b"\0")
    n_chars = np.array([len(t) for t in with_sep], dtype=np.int64)[ids.reshape(-1)]
    ends = np.concatenate([[0], np.cumsum(n_chars)])[3 * loops.offsets].tolist()
    out = []
    for s, e in zip(ends[:-1], ends[1:], strict=True):
        b = chars[s : e - 1]  # without the last backslash
        out.append(b + b" " if len(b) % 2 else b)
    return out


def _raw(tag: BaseTag, vr: str, text: str, pad: bytes = b" ") -> RawDataElement:
    """An element given as its encoded value: pydicom copies the bytes instead of validating and converting.

    Contours are the bulk of a structure set (10^4 items, 10^6 coordinates): building them as regular
    elements (and ContourData as DSfloat objects) would dominate the run time. The values are ASCII, so
    their bytes are the same in explicit and implicit VR; :func:`encoded_as_raw` tells the writer so.
    """
    b = text.encode("ascii")
    if len(b) % 2:
        b += pad
    return RawDataElement(tag, vr, len(b), b, 0, False, True)


def image_reference(geom: Geometry, k: int) -> Dataset:
    """A ContourImageSequence item: slice ``k`` of ``geom`` (its instance, and its frame when multi-frame)."""
    item = Dataset()
    item[_REF_CLASS] = _raw(_REF_CLASS, "UI", geom.sop_class_uids[k], b"\0")
    item[_REF_INSTANCE] = _raw(_REF_INSTANCE, "UI", geom.sop_instance_uids[k], b"\0")
    frame = geom.frame_numbers[k]
    if frame is not None:
        item[_REF_FRAME] = _raw(_REF_FRAME, "IS", str(frame))
    return item


@dataclass(frozen=True)
class Traced:
    """One ROI's contours before encoding: slice, number of points and ContourData bytes of each."""

    geometry: Geometry
    slices: list[int]
    n_points: list[int]
    data: list[bytes]

    @property
    def longest(self) -> int:
        return max((len(d) for d in self.data), default=0)


def trace(mask: np.ndarray, geometry: Geometry, keyhole: bool) -> Traced:
    """The contours of one ROI's (Z, Y, X) mask on the slices of ``geometry``, with their ContourData."""
    loops = trace_mask(mask, keyhole=keyhole)
    data = _ds_contour_data(loops, geometry)
    return Traced(geometry, loops.slices.tolist(), np.diff(loops.offsets).tolist(), data)


def _element(tag: int, vr: bytes, value: bytes, implicit: bool) -> bytes:
    """One data element, little endian, its value already padded to an even length."""
    group, elem = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", group, elem, len(value)) + value
    if vr == b"SQ":
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _item(body: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def _text(value: str, pad: bytes = b" ") -> bytes:
    b = value.encode("ascii")
    return b + pad if len(b) % 2 else b


def contour_sequence(traced: Traced, implicit: bool) -> RawDataElement:
    """ContourSequence encoded as pydicom would write the equivalent datasets (defined lengths, tags in
    order), given to pydicom as bytes: 10^4 items would otherwise cost more than tracing them."""
    g = traced.geometry
    refs: dict[int, bytes] = {}
    closed = _element(int(_GEOMETRIC_TYPE), b"CS", _text("CLOSED_PLANAR"), implicit)
    items = []
    for n, (k, n_points, data) in enumerate(
        zip(traced.slices, traced.n_points, traced.data, strict=True), start=1
    ):
        ref = refs.get(k)
        if ref is None:
            body = _element(int(_REF_CLASS), b"UI", _text(g.sop_class_uids[k], b"\0"), implicit)
            body += _element(int(_REF_INSTANCE), b"UI", _text(g.sop_instance_uids[k], b"\0"), implicit)
            frame = g.frame_numbers[k]
            if frame is not None:
                body += _element(int(_REF_FRAME), b"IS", _text(str(frame)), implicit)
            ref = refs[k] = _element(int(_CONTOUR_IMAGES), b"SQ", _item(body), implicit)
        items.append(
            _item(
                b"".join(
                    (
                        ref,
                        closed,
                        _element(int(_N_POINTS), b"IS", _text(str(n_points)), implicit),
                        _element(int(_CONTOUR_NUMBER), b"IS", _text(str(n)), implicit),
                        _element(int(_CONTOUR_DATA), b"DS", data, implicit),
                    )
                )
            )
        )
    value = b"".join(items)
    return RawDataElement(_CONTOURS, "SQ", len(value), value, 0, implicit, True)


def encoded_as_raw(ds: Dataset, implicit: bool) -> None:
    """Mark every nested item as already encoded in the output syntax, so its raw elements are copied."""
    for tag in ds.keys():
        elem = ds.get_item(tag)
        if elem is None or elem.is_raw or elem.VR != "SQ":
            continue
        for item in elem.value:
            item.set_original_encoding(implicit, True, item._character_set)
            encoded_as_raw(item, implicit)

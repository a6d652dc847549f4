"""What an acceptable CT instance is: :class:`InstanceMeta` (the header fields the node keeps) and
:func:`instance_meta`, the one set of header checks that the SCP and any re-indexing share.

The checks read either a pydicom Dataset or the plain dict of the fast header scan
(:mod:`service.store.header_scan`); each refusal is an :mod:`service.store.ingest_errors` exception.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from pydicom import Dataset

from service.store.ingest_errors import (
    InvalidGeometry,
    InvalidIdentifier,
    MissingAttribute,
    MissingGeometry,
    ModalityMismatch,
    PixelDataLengthMismatch,
    SOPClassMismatch,
    SOPInstanceMismatch,
)

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
PATH_SAFE_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_NOMINAL_RESP_PHASE = 0x00209245  # Nominal Percentage of Respiratory Phase (not 0020,9241: that is cardiac)


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
        # asdict()'s deep copy was ~40 % of the index insert per instance; the fields are flat (str, int,
        # float, None and tuples of them), so a shallow dict gives the same JSON
        return json.dumps({name: getattr(self, name) for name in _FIELD_NAMES}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> InstanceMeta:
        d = json.loads(text)
        for key in ("image_type", "image_position", "image_orientation"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


_FIELD_NAMES = tuple(f.name for f in fields(InstanceMeta))


# The validation below reads either a pydicom Dataset or the plain dict of the fast header scan: both
# answer ``.get(keyword)`` with pydicom-like values (str, int, float, list of them).
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
    if not PATH_SAFE_UID_RE.match(value):
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

"""service/dicomio/rtstruct.py as it was before the pre-encoded contour sequences (commit aa180ff), kept verbatim below
this header as the reference, except that it traces with the previous tracer (contours_previous):
tests/unit/test_contours_equal.py checks that the new writer gives byte-identical files; bench/rtstruct.py times
both in one run.
"""

# ruff: noqa
# mypy: ignore-errors


from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RTStructureSetStorage,
)

from itvnode import __version__
from tests.support.contours_previous import mask_to_contours  # the only changed line
from service.store.durable import private_dir, write_atomic
from service.dicomio.uids import content_key as _content_key
from service.dicomio.uids import output_uid
from service.dicomio.geometry import Geometry

if TYPE_CHECKING:
    from service.structure_settings import StructureSetting

log = logging.getLogger(__name__)

Layout = Literal["combined", "per-series"]
LAYOUTS: tuple[str, ...] = ("combined", "per-series")
HOLE_MODES: tuple[str, ...] = ("keyhole", "xor")
MANUFACTURER = "itvnode"
REVIEW_NOTE = "AUTOMATIC CONTOURS - review before clinical use"
# RT Referenced Study: Detached Study Management (retired); the value RT writers commonly use (rt-utils too).
_STUDY_REF_CLASS = "1.2.840.10008.3.1.2.3.1"
_CONTOUR_DATA = Tag(0x3006, 0x0050)
_GEOMETRIC_TYPE = Tag(0x3006, 0x0042)
_N_POINTS = Tag(0x3006, 0x0046)
_CONTOUR_NUMBER = Tag(0x3006, 0x0048)
_REF_CLASS = Tag(0x0008, 0x1150)
_REF_INSTANCE = Tag(0x0008, 0x1155)
_REF_FRAME = Tag(0x0008, 0x1160)
_MAX_EXPLICIT_LEN = 0xFFFE  # 16-bit length of DS in explicit VR


@dataclass(frozen=True)
class RoiStyle:
    """Display colour and RT ROI Interpreted Type ('' = no claim, a Type 2 empty value)."""

    color: tuple[int, int, int] = (255, 0, 0)
    interpreted_type: str = ""


@dataclass(frozen=True)
class Algorithm:
    """What produced the masks; goes into ROIGenerationDescription, SoftwareVersions and the UIDs."""

    model: str = "SAM 3"
    model_version: str = "unknown"
    adapter_version: str = "none"
    generation: str = "AUTOMATIC"  # ROIGenerationAlgorithm; SEMIAUTOMATIC: input contours, cleaned

    @property
    def description(self) -> str:
        return f"itvnode {__version__}; {self.model} {self.model_version}; LoRA {self.adapter_version}"

    @property
    def identity(self) -> tuple[str, ...]:
        """What goes into the output content key (service.dicomio.uids)."""
        return (self.model, self.model_version, self.adapter_version, f"itvnode {__version__}")


@dataclass(frozen=True)
class _Roi:
    name: str
    style: RoiStyle
    mask: np.ndarray  # (Z, Y, X) bool
    geometry: Geometry  # series whose slices the contours reference


@dataclass
class _Plan:
    key: str  # referenced-series part of the UID entropy
    label_suffix: str
    series: list[Geometry] = field(default_factory=list)
    rois: list[_Roi] = field(default_factory=list)


def phase_label(percent: float, label: str = "") -> str:
    """``40.0 -> 'P40'``, ``12.5 -> 'P12.5'``; a vendor label from the manifest wins (``'In50'`` for Siemens
    amplitude binning, service.intake.phases.order_phases)."""
    return label or f"P{percent:g}"


def roi_name(base: str, percent: float, label: str = "") -> str:
    """Per-phase ROI name, TG-263 style ``<name>^P<percent>`` (or ``<name>^In50``), at most 16 characters
    (base truncated)."""
    suffix = "^" + phase_label(percent, label)
    return base[: 16 - len(suffix)] + suffix


def parse_roi_name(name: str) -> tuple[str, float | None]:
    """Inverse of :func:`roi_name`: ``'GTVp^P40' -> ('GTVp', 40.0)``, ``'ITV' -> ('ITV', None)``.

    Only a last ``^`` qualifier of the form ``P<percent>`` is a phase; any other qualifier stays in the base.
    """
    base, sep, qualifier = name.strip().rpartition("^")
    m = re.fullmatch(r"P(\d+(?:\.\d+)?)", qualifier.strip(), flags=re.IGNORECASE) if sep else None
    if m is None:
        return name.strip(), None
    return base.strip(), float(m.group(1))


def styles_from_settings(structures: Sequence[StructureSetting]) -> dict[str, RoiStyle]:
    """Styles keyed by every name the engine emits (``Lung_L``/``Lung_R`` for split structures, envelopes)."""
    out: dict[str, RoiStyle] = {}
    for s in structures:
        style = RoiStyle(tuple(s.color), s.interpreted_type)  # type: ignore[arg-type]
        names = [f"{s.name}_L", f"{s.name}_R"] if s.split_laterality else [s.name]
        for n in names:
            out[n] = style
        if s.envelope:
            out[s.envelope_name or f"{s.name}_ITV"] = RoiStyle(
                tuple(s.color),  # type: ignore[arg-type]
                s.envelope_interpreted_type,
            )
    return out


def _ds(v: float) -> str:
    s = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def _ds_texts(points: list[np.ndarray]) -> list[bytes]:
    """ContourData of each contour as DS text: 4 decimals (0.1 um), trailing zeros dropped, <= 16 characters.

    Vertices lie on a half-pixel lattice, so an ROI has few distinct coordinates: format each once.
    """
    if not points:
        return []
    flat = np.round(np.concatenate([p.ravel() for p in points]), 4)
    uniq, inverse = np.unique(flat, return_inverse=True)
    text = np.array([_ds(v) for v in uniq.tolist()], dtype=object)[inverse]
    out, start = [], 0
    for p in points:
        b = "\\".join(text[start : start + p.size].tolist()).encode("ascii")
        start += p.size
        out.append(b + b" " if len(b) % 2 else b)
    return out


def _raw(tag: BaseTag, vr: str, text: str, pad: bytes = b" ") -> RawDataElement:
    """An element given as its encoded value: pydicom copies the bytes instead of validating and converting.

    Contours are the bulk of a structure set (10^4 items, 10^6 coordinates): building them as regular
    elements (and ContourData as DSfloat objects) would dominate the run time. The values are ASCII, so
    their bytes are the same in explicit and implicit VR; :func:`_encoded_as_raw` tells the writer so.
    """
    b = text.encode("ascii")
    if len(b) % 2:
        b += pad
    return RawDataElement(tag, vr, len(b), b, 0, False, True)


def _image_ref(geom: Geometry, k: int) -> Dataset:
    item = Dataset()
    item[_REF_CLASS] = _raw(_REF_CLASS, "UI", geom.sop_class_uids[k], b"\0")
    item[_REF_INSTANCE] = _raw(_REF_INSTANCE, "UI", geom.sop_instance_uids[k], b"\0")
    frame = geom.frame_numbers[k]
    if frame is not None:
        item[_REF_FRAME] = _raw(_REF_FRAME, "IS", str(frame))
    return item


def _contour_sequence(roi: _Roi, keyhole: bool) -> tuple[list[Dataset], int]:
    g = roi.geometry
    contours = mask_to_contours(roi.mask, g.positions, g.pixel_spacing, g.orientation, keyhole=keyhole)
    items: list[Dataset] = []
    longest = 0
    texts = _ds_texts([c.points for c in contours])
    for n, (c, data) in enumerate(zip(contours, texts, strict=True), start=1):
        item = Dataset()
        item.ContourImageSequence = DicomSequence([_image_ref(g, c.slice_index)])
        item[_GEOMETRIC_TYPE] = _raw(_GEOMETRIC_TYPE, "CS", "CLOSED_PLANAR")
        item[_N_POINTS] = _raw(_N_POINTS, "IS", str(len(c.points)))
        item[_CONTOUR_NUMBER] = _raw(_CONTOUR_NUMBER, "IS", str(n))
        longest = max(longest, len(data))
        item[_CONTOUR_DATA] = RawDataElement(_CONTOUR_DATA, "DS", len(data), data, 0, False, True)
        items.append(item)
    return items, longest


def _encoded_as_raw(ds: Dataset, implicit: bool) -> None:
    """Mark every nested item as already encoded in the output syntax, so its raw elements are copied."""
    for tag in ds.keys():
        elem = ds.get_item(tag)
        if elem is None or elem.is_raw or elem.VR != "SQ":
            continue
        for item in elem.value:
            item.set_original_encoding(implicit, True, item._character_set)
            _encoded_as_raw(item, implicit)


def _check_inputs(
    geometries: Sequence[Geometry],
    phase_percents: Sequence[float],
    masks: Mapping[str, np.ndarray],
    envelopes: Mapping[str, np.ndarray],
    tags: Sequence[str],
) -> None:
    if not geometries:
        raise ValueError("no phase geometries")
    if len(geometries) != len(phase_percents):
        raise ValueError(f"{len(geometries)} phase geometries but {len(phase_percents)} phase percents")
    g0 = geometries[0]
    for g in geometries[1:]:
        if not g.same_grid(g0):
            raise ValueError(
                f"series {g.series_instance_uid} does not share the grid of {g0.series_instance_uid}"
            )
    if not masks and not envelopes:
        raise ValueError("no structures to write (a structure set needs at least one ROI)")
    if len({g.series_instance_uid for g in geometries}) != len(geometries):
        raise ValueError("two phases share one SeriesInstanceUID")
    if len({g.study_instance_uid for g in geometries}) != 1:
        raise ValueError("phase series belong to different studies")
    shape4 = (len(geometries), *g0.shape)
    for name, m in masks.items():
        if m.shape != shape4:
            raise ValueError(f"mask {name!r} has shape {m.shape}, expected (phases, z, y, x) = {shape4}")
    for name, m in envelopes.items():
        if m.shape != g0.shape:
            raise ValueError(f"envelope {name!r} has shape {m.shape}, expected (z, y, x) = {g0.shape}")
    names = [roi_name(n, p, tag) for n in masks for p, tag in zip(phase_percents, tags, strict=True)]
    names += list(envelopes)
    if len(names) != len(set(names)):
        raise ValueError(f"ROI names collide after the 16-character limit: {sorted(names)}")


def usable_references(
    geometries: Sequence[Geometry], references: Mapping[str, Geometry], *, warn: bool = True
) -> dict[str, Geometry]:
    """The reference series (AVG/MIP) an output references: those on the grid of the phases."""
    refs = {}
    for kind, g in references.items():
        if g.same_grid(geometries[0]):
            refs[kind] = g
        elif warn:
            log.warning(
                "reference series %s (%s) does not share the phase grid: not referenced",
                g.series_instance_uid,
                kind,
            )
    return refs


def result_content_key(
    *,
    study_key: str,
    geometries: Sequence[Geometry],
    references: Mapping[str, Geometry] | None,
    algorithm: Algorithm,
    layout: str,
    settings_digest: str = "",
    revisions: Mapping[str, int] | None = None,
) -> str:
    """The content key (service.dicomio.uids) of the outputs built from these phases and the usable references;
    ``revisions``: inputs re-sent with changed content (service.store.spool_index.SpoolIndexReader.revisions)."""
    used = [*geometries, *usable_references(geometries, references or {}, warn=False).values()]
    return _content_key(
        study_key=study_key,
        input_sop_instance_uids=(u for g in used for u in g.sop_instance_uids),
        algorithm=algorithm.identity,
        layout=layout,
        settings=settings_digest,
        revisions=revisions,
    )


def inputs_note(phase_percents: Sequence[float], references: Sequence[str] = (),
                labels: Sequence[str] | None = None) -> str:
    """Which inputs a result used, for descriptions: ``10 phases (0, 10, ... 90%) + AVG``; with vendor labels
    (amplitude binning) ``10 phases (In0, In20, ... Ex20) + AVG``."""
    if labels and any(labels) and any(not lab.startswith("P") for lab in labels):
        text = f"{len(phase_percents)} phases ({', '.join(labels)})"
    else:
        pcts = ", ".join(f"{p:g}" for p in phase_percents)
        text = f"{len(phase_percents)} phases ({pcts}%)"
    return text + "".join(f" + {k}" for k in references)


def _plans(
    layout: str,
    geometries: Sequence[Geometry],
    phase_percents: Sequence[float],
    masks: Mapping[str, np.ndarray],
    envelopes: Mapping[str, np.ndarray],
    styles: Mapping[str, RoiStyle],
    references: Mapping[str, Geometry],
    tags: Sequence[str],
) -> list[_Plan]:
    g0 = geometries[0]
    refs = usable_references(geometries, references)

    def style(name: str) -> RoiStyle:
        return styles.get(name, RoiStyle())

    def phase_rois(p: int) -> list[_Roi]:
        return [_Roi(roi_name(n, phase_percents[p], tags[p]), style(n), m[p], geometries[p])
                for n, m in masks.items()]

    if layout == "combined":
        env_geom = next(iter(refs.values()), g0)
        plan = _Plan("combined", "4D", series=list(geometries) + list(refs.values()))
        for n, m in masks.items():  # structure-major: GTVp^P0 .. GTVp^P90, then the next structure
            plan.rois.extend(
                _Roi(roi_name(n, pct, tags[p]), style(n), m[p], geometries[p])
                for p, pct in enumerate(phase_percents)
            )
        plan.rois.extend(_Roi(n, style(n), e, env_geom) for n, e in envelopes.items())
        return [plan]
    if layout == "per-series":
        plans = []
        for p, g in enumerate(geometries):
            plan = _Plan(
                g.series_instance_uid, phase_label(phase_percents[p], tags[p]), series=[g], rois=phase_rois(p)
            )
            plan.rois.extend(_Roi(n, style(n), e, g) for n, e in envelopes.items())
            plans.append(plan)
        for kind, g in refs.items() if envelopes else ():
            plans.append(
                _Plan(
                    g.series_instance_uid,
                    kind,
                    series=[g],
                    rois=[_Roi(n, style(n), e, g) for n, e in envelopes.items()],
                )
            )
        return plans
    raise ValueError(f"unknown RTSTRUCT layout {layout!r}; expected one of {LAYOUTS}")


def build_rtstructs(
    *,
    study_key: str,
    identifiers: Mapping[str, str],
    geometries: Sequence[Geometry],
    phase_percents: Sequence[float],
    masks: Mapping[str, np.ndarray],
    envelopes: Mapping[str, np.ndarray],
    phase_labels: Sequence[str] | None = None,
    styles: Mapping[str, RoiStyle] | None = None,
    algorithm: Algorithm | None = None,
    layout: str = "combined",
    references: Mapping[str, Geometry] | None = None,
    skipped: Mapping[str, str] | None = None,
    uid_prefix: str | None = None,
    series_number: int = 901,
    holes: str = "keyhole",
    now: datetime | None = None,
    content_key: str | None = None,
    settings_digest: str = "",
    version: int = 1,
    phases_note: str | None = None,
    qa_notes: Sequence[str] = (),
) -> list[Dataset]:
    """Build the RTSTRUCT(s) of one 4DCT.

    ``geometries``/``phase_percents`` (/``phase_labels``, the manifest's vendor labels such as ``In50``: the
    per-phase ROI suffix; default ``P<percent>``): one per phase, in the order of the masks' P axis.
    ``masks``: structure name -> bool (P, Z, Y, X); ``envelopes``: name (e.g. ``ITV``) -> bool (Z, Y, X).
    ``identifiers``: the manifest's patient/study attributes. ``references``: kind (``AVG``/``MIP``) ->
    geometry of a reference series. ``skipped``: structure -> reason, listed in StructureSetDescription.
    ``uid_prefix``: the site's UID root (ending in '.'); default pydicom's. Empty masks give an ROI without
    ContourSequence. ``holes``: ``keyhole`` (one contour per outer boundary, holes cut in through a zero-width
    channel: right for receivers that OR or XOR the contours of a slice) or ``xor`` (holes as separate inner
    contours).

    UIDs: ``content_key`` (default: :func:`result_content_key` of these inputs and ``settings_digest``) and
    each object's referenced series. ``version``: this study's result version (1 for the first; a late phase
    makes the next): named in SeriesDescription and StructureSetDescription with the phases used, and
    SeriesNumber is ``series_number + 100 * (version - 1)`` (+ 1 per further file of the layout).
    ``phases_note`` (``ITV from 3 of 10 phases: ...``) and ``qa_notes`` (QA warnings) go into
    StructureSetDescription, in that order, within its 1024 characters (VR ST).
    """
    if holes not in HOLE_MODES:
        raise ValueError(f"unknown hole encoding {holes!r}; expected one of {HOLE_MODES}")
    algorithm = algorithm or Algorithm()
    styles = styles or {}
    references = references or {}
    skipped = skipped or {}
    now = now or datetime.now(UTC)
    tags = list(phase_labels) if phase_labels is not None else [""] * len(phase_percents)
    if len(tags) != len(phase_percents):
        raise ValueError(f"{len(tags)} phase labels but {len(phase_percents)} phase percents")
    _check_inputs(geometries, phase_percents, masks, envelopes, tags)
    plans = _plans(layout, geometries, phase_percents, masks, envelopes, styles, references, tags)
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    key = content_key or result_content_key(
        study_key=study_key, geometries=geometries, references=references, algorithm=algorithm,
        layout=layout, settings_digest=settings_digest,
    )
    ref_kinds = list(usable_references(geometries, references, warn=False))
    used = inputs_note(phase_percents, ref_kinds, [phase_label(p, t) for p, t in zip(phase_percents, tags,
                                                                                      strict=True)])
    short = f"v{version} {len(phase_percents)}ph" + "".join(f"+{k}" for k in ref_kinds)
    out = []
    for i, plan in enumerate(plans):
        series_uid = output_uid(uid_prefix, key, plan.key, "series")
        sop_uid = output_uid(uid_prefix, key, plan.key, "instance")
        ds = _dataset(
            plan,
            identifiers,
            algorithm,
            _description(algorithm, skipped, version, used, phases_note, qa_notes),
            series_uid,
            sop_uid,
            series_number + 100 * (version - 1) + i,
            now,
            holes == "keyhole",
            (version, used, short),
        )
        out.append(ds)
        log.info(
            "study %s: RTSTRUCT %s (%s, %s): %d ROIs, %d contours",
            study_key,
            sop_uid,
            layout,
            plan.label_suffix,
            len(plan.rois),
            sum(len(r.get("ContourSequence", [])) for r in ds.ROIContourSequence),
        )
    return out


DESCRIPTION_MAX = 1024  # StructureSetDescription (3006,0006) is ST: at most 1024 characters


def _description(algorithm: Algorithm, skipped: Mapping[str, str], version: int, used: str,
                 phases_note: str | None = None, qa_notes: Sequence[str] = ()) -> str:
    """Review note, the result version and its inputs, what the ITV is built from, QA warnings (as many as
    fit, then a count), what was skipped, and the generator; the essentials first so that truncation at 1024
    characters only loses detail."""
    head = f"{REVIEW_NOTE}. Version {version}, from {used}."
    if phases_note:
        head += f" {phases_note}."
    tail = f" Generated by {algorithm.description}."
    if skipped:
        tail = " Not contoured: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "." + tail
    notes = list(qa_notes)
    qa = ""
    for shown in range(len(notes), -1, -1):  # as many warnings as fit
        if not notes:
            break
        more = len(notes) - shown
        qa = " QA: " + "; ".join([*notes[:shown], *([f"+{more} more in qa.json"] if more else [])]) + "."
        if len(head) + len(qa) + len(tail) <= DESCRIPTION_MAX:
            break
    return (head + qa + tail)[:DESCRIPTION_MAX]


def _dataset(
    plan: _Plan,
    identifiers: Mapping[str, str],
    algorithm: Algorithm,
    description: str,
    series_uid: UID,
    sop_uid: UID,
    series_number: int,
    now: datetime,
    keyhole: bool,
    inputs: tuple[int, str, str],
) -> Dataset:
    version, used, short = inputs
    g0 = plan.series[0]
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    texts = [str(v) for v in identifiers.values()]
    if any(not t.isascii() for t in texts):
        ds.SpecificCharacterSet = "ISO_IR 192"
    # SOP Common
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient, General Study (Type 2 attributes present even when empty)
    for key in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    ):
        setattr(ds, key, str(identifiers.get(key, "") or ""))
    if identifiers.get("StudyDescription"):
        ds.StudyDescription = str(identifiers["StudyDescription"])
    ds.StudyInstanceUID = g0.study_instance_uid
    # RT Series
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = f"itvnode {plan.label_suffix} {short} - review before clinical use"[:64]
    ds.OperatorsName = ""
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "itvnode 4DCT auto-contouring"
    ds.SoftwareVersions = [
        f"itvnode {__version__}",
        f"{algorithm.model} {algorithm.model_version}"[:64],
        f"LoRA {algorithm.adapter_version}"[:64],
    ]
    # Frame of Reference
    ds.FrameOfReferenceUID = g0.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # Structure Set
    ds.StructureSetLabel = f"AUTO {plan.label_suffix}"[:16]
    ds.StructureSetName = f"itvnode {plan.label_suffix}"[:64]
    ds.StructureSetDescription = description
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_frame_of_reference(plan)])
    # Approval: machine output is never approved
    ds.ApprovalStatus = "UNAPPROVED"

    ssroi, roic, obs = [], [], []
    longest = 0
    for number, roi in enumerate(plan.rois, start=1):
        s = Dataset()
        s.ROINumber = number
        s.ReferencedFrameOfReferenceUID = g0.frame_of_reference_uid
        s.ROIName = roi.name
        s.ROIGenerationAlgorithm = algorithm.generation
        s.ROIGenerationDescription = algorithm.description[:64]
        ssroi.append(s)
        c = Dataset()
        c.ReferencedROINumber = number
        c.ROIDisplayColor = list(roi.style.color)
        items, n_bytes = _contour_sequence(roi, keyhole)
        longest = max(longest, n_bytes)
        if items:  # Type 3: an empty structure keeps its ROI without contours
            c.ContourSequence = DicomSequence(items)
        roic.append(c)
        o = Dataset()
        o.ObservationNumber = number
        o.ReferencedROINumber = number
        o.ROIObservationLabel = roi.name
        o.RTROIInterpretedType = roi.style.interpreted_type
        o.ROIInterpreter = ""
        obs.append(o)
    ds.StructureSetROISequence = DicomSequence(ssroi)
    ds.ROIContourSequence = DicomSequence(roic)
    ds.RTROIObservationsSequence = DicomSequence(obs)

    # DS lengths are 16-bit in explicit VR; a very long contour needs the implicit syntax.
    implicit = longest > _MAX_EXPLICIT_LEN
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"ITVNODE_{__version__}"[:16]
    ds.file_meta = meta
    _encoded_as_raw(ds, implicit)
    return ds


def _frame_of_reference(plan: _Plan) -> Dataset:
    series_items = []
    for g in plan.series:
        s = Dataset()
        s.SeriesInstanceUID = g.series_instance_uid
        s.ContourImageSequence = DicomSequence([_image_ref(g, k) for k in range(len(g.sop_instance_uids))])
        series_items.append(s)
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_REF_CLASS
    study.ReferencedSOPInstanceUID = plan.series[0].study_instance_uid
    study.RTReferencedSeriesSequence = DicomSequence(series_items)
    f = Dataset()
    f.FrameOfReferenceUID = plan.series[0].frame_of_reference_uid
    f.RTReferencedStudySequence = DicomSequence([study])
    return f


def write_dataset(ds: Dataset, out_dir: str | Path, prefix: str) -> Path:
    """Write ``<prefix>.<SOPInstanceUID>.dcm`` under ``out_dir`` durably and atomically, in the transfer
    syntax of its file meta; a re-run overwrites the same name (deterministic UIDs)."""
    out = Path(out_dir)
    private_dir(out)
    path = out / f"{prefix}.{ds.SOPInstanceUID}.dcm"
    buf = BytesIO()
    implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    write_atomic(path, buf.getvalue())
    return path


def write_rtstruct(ds: Dataset, out_dir: str | Path) -> Path:
    """Write ``RS.<SOPInstanceUID>.dcm`` under ``out_dir``."""
    return write_dataset(ds, out_dir, "RS")

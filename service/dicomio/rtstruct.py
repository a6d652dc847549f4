"""RT Structure Set writing: per-phase contours and envelopes (ITV) of a 4DCT, as DICOM RTSTRUCT.

Layouts (docs/rtstruct.md):

- ``combined``: one RTSTRUCT with every structure on every phase (``GTVp^P40``) plus the envelopes (``ITV``),
  referencing every phase series (and the AVG/MIP reference series when given, which then carries the ITV).
- ``per-series``: one RTSTRUCT per phase series with that phase's structures and the envelopes, plus one per
  reference series (AVG/MIP) holding the envelopes only.

Output UIDs derive from the content key of :mod:`service.dicomio.uids` (study key, every input instance
actually used, algorithm, layout, settings) and the object's referenced series: a re-run of the same content
replaces the previous objects at the receiver, new content (a late phase, a late AVG, a new adapter) gets new
UIDs. Contours trace voxel edges (:mod:`service.dicomio.contours`). ContourData values are written as DS
strings of at most 12 characters (0.1 um).

This module chooses what goes into each object (layout, ROI names, UIDs); :mod:`service.dicomio.structure_set`
assembles one, :mod:`service.dicomio.contour_sequence` encodes its contours.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from service.dicomio.geometry import Geometry
from service.dicomio.output import Algorithm, RoiStyle, write_dataset
from service.dicomio.structure_set import Plan, Roi, description, structure_set
from service.dicomio.uids import content_key as _content_key
from service.dicomio.uids import output_uid

log = logging.getLogger(__name__)

Layout = Literal["combined", "per-series"]
LAYOUTS: tuple[str, ...] = ("combined", "per-series")
HOLE_MODES: tuple[str, ...] = ("keyhole", "xor")


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
    """The content key (service.dicomio.uids) of the outputs built from these phases and the usable
    references; ``revisions``: inputs re-sent with changed content
    (service.store.spool_index.SpoolIndexReader.revisions)."""
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
) -> list[Plan]:
    g0 = geometries[0]
    refs = usable_references(geometries, references)

    def style(name: str) -> RoiStyle:
        return styles.get(name, RoiStyle())

    def phase_rois(p: int) -> list[Roi]:
        return [Roi(roi_name(n, phase_percents[p], tags[p]), style(n), m[p], geometries[p])
                for n, m in masks.items()]

    if layout == "combined":
        env_geom = next(iter(refs.values()), g0)
        plan = Plan("combined", "4D", series=list(geometries) + list(refs.values()))
        for n, m in masks.items():  # structure-major: GTVp^P0 .. GTVp^P90, then the next structure
            plan.rois.extend(
                Roi(roi_name(n, pct, tags[p]), style(n), m[p], geometries[p])
                for p, pct in enumerate(phase_percents)
            )
        plan.rois.extend(Roi(n, style(n), e, env_geom) for n, e in envelopes.items())
        return [plan]
    if layout == "per-series":
        plans = []
        for p, g in enumerate(geometries):
            plan = Plan(
                g.series_instance_uid, phase_label(phase_percents[p], tags[p]), series=[g], rois=phase_rois(p)
            )
            plan.rois.extend(Roi(n, style(n), e, g) for n, e in envelopes.items())
            plans.append(plan)
        for kind, g in refs.items() if envelopes else ():
            plans.append(
                Plan(
                    g.series_instance_uid,
                    kind,
                    series=[g],
                    rois=[Roi(n, style(n), e, g) for n, e in envelopes.items()],
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
        ds, n_contours = structure_set(
            plan,
            identifiers,
            algorithm,
            description(algorithm, skipped, version, used, phases_note, qa_notes),
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
            n_contours,
        )
    return out


def write_rtstruct(ds: Dataset, out_dir: str | Path) -> Path:
    """Write ``RS.<SOPInstanceUID>.dcm`` under ``out_dir``."""
    return write_dataset(ds, out_dir, "RS")

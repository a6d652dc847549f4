"""The segmentation engine: a 4D HU volume in, cleaned per-phase masks, envelopes (ITV) and QA numbers out.

Order of work (docs/postprocessing.md), per phase in :mod:`models.phase_segmentation` (whose phases overlap,
:mod:`models.phase_overlap`), then across phases here:

1. SAM 3 structures: the slices of a phase that :func:`prompt_slices` keeps go through ``segmenter.predict``
   with all prompts at once (the vision features of a slice are computed once and reused for every prompt),
   in slice chunks so that only one chunk of probabilities is ever in memory; probabilities are binarised at
   0.5 (the segmenter applies each structure's ``score_threshold`` to instance scores, see
   models/sam3/inference.py).
2. Threshold structures (``method="threshold"``, e.g. External) with :func:`models.threshold.threshold_body`.
3. Laterality split (``split_laterality``): voxel columns with x index >= the body midline are patient Left
   (x grows towards patient Left, docs/internal-api.md), the rest Right. The midline of each phase is the x
   centroid of the External (threshold) structure, or of :func:`threshold_body` when none is configured.
4. Temporal filter (SAM 3 structures only: a HU threshold is deterministic per phase, and a persistent
   couch or arm would survive it anyway) -> connectivity and hole filling -> envelope -> QA
   (:func:`postprocess_volume`, also the whole engine of ``itvnode itv`` on contours read from RTSTRUCTs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from models.post.connectivity import CleanReport, ConnectivityParams, FillMode, clean_phases
from models.post.envelope import envelope
from models.post.qa import QAParams, study_qa
from models.post.temporal import TemporalParams
from models.structures import MAX_NAME_LEN, StructureSpec

log = logging.getLogger(__name__)

SAM3_NOT_CONFIGURED = "SAM 3 weights not configured (ITVNODE_SAM3_DIR)"
PROBABILITY_CUT = 0.5  # the segmenter's probability maps are the union of confident instances at 0.5
ORGAN_MAX_HOLE_CC = 1.0  # organs: fill pinholes only; a tumour inside a lung stays out of the lung
THRESHOLD_MIN_PART_CC = 5.0  # models.threshold.threshold_body's own floor for body parts (its default)
PASSTHROUGH_NOTE = "threshold_body already applied connectivity and hole filling"


class Segmenter(Protocol):
    """What the engine needs of :class:`models.sam3.inference.Sam3Segmenter`."""

    def predict(self, slices_hu: np.ndarray, prompts: Sequence[str],
                score_threshold: float | Mapping[str, float] | None = None) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class OutputStructure:
    """One ROI the engine produces: a spec, or one side of a spec split by laterality."""

    name: str
    spec: StructureSpec
    side: Literal["L", "R"] | None = None
    envelope_name: str | None = None


def output_structures(specs: Sequence[StructureSpec]) -> list[OutputStructure]:
    """Expand specs into output ROIs (``Lung`` -> ``Lung_L``, ``Lung_R``) with their envelope names.

    An envelope without ``envelope_name`` is called ``<name>^ENV``; a split structure's envelope gets the side
    suffix (``ITV_L``). Names must stay unique and within 16 characters.
    """
    out: list[OutputStructure] = []
    for spec in specs:
        env = (spec.envelope_name or f"{spec.name}^ENV") if spec.envelope else None
        if spec.split_laterality:
            for side in ("L", "R"):
                out.append(OutputStructure(f"{spec.name}_{side}", spec, side,  # type: ignore[arg-type]
                                           f"{env}_{side}" if env else None))
        else:
            out.append(OutputStructure(spec.name, spec, None, env))
    names = [o.name for o in out] + [o.envelope_name for o in out if o.envelope_name]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"structure / envelope names are not unique: {dup}")
    long = [n for n in names if len(n) > MAX_NAME_LEN]
    if long:
        raise ValueError(f"names longer than {MAX_NAME_LEN} characters: {long}")
    return out


def fill_mode(spec: StructureSpec) -> FillMode:
    """How holes are filled: a body outline per slice, everything else in 3D."""
    return "slice" if spec.interpreted_type == "EXTERNAL" else "3d"


def connectivity_params(spec: StructureSpec) -> ConnectivityParams | None:
    """Connectivity rules of one structure (docs/postprocessing.md); None: nothing left to do."""
    if spec.method == "threshold":
        # threshold_body already keeps the body parts above THRESHOLD_MIN_PART_CC and fills holes per slice
        # and in 3D: relabelling the body of every phase would change nothing unless a count is set
        if spec.expected_components is None and spec.min_volume_cc <= THRESHOLD_MIN_PART_CC:
            return None
        return ConnectivityParams(spec.expected_components, spec.min_volume_cc, "none")
    max_hole = ORGAN_MAX_HOLE_CC if spec.interpreted_type in ("ORGAN", "AVOIDANCE", "CONTROL") else None
    return ConnectivityParams(spec.expected_components, spec.min_volume_cc, fill_mode(spec), max_hole)


@dataclass
class EngineResult:
    """Per-ROI bool (P, Z, Y, X) masks, per-envelope bool (Z, Y, X), QA dict, and what was skipped and why."""

    masks: dict[str, np.ndarray]
    envelopes: dict[str, np.ndarray]
    qa: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)
    raw_masks: dict[str, np.ndarray] | None = None  # before temporal filter / connectivity (keep_raw=True)


@dataclass(frozen=True)
class SkipParams:
    """Which slices can hold a structure: inside the body and near the lungs (cheap HU test, subsampled).

    A slice holds body when at least ``min_body_cm2`` of it is within ``body_hu`` (HU >= the value); lung
    when at least ``min_lung_cm2`` is air (HU < ``air_hu``) enclosed by body along its row. SAM 3 then runs
    on body slices within ``margin_mm`` of the lungs' z-range of that phase (or on every body slice when no
    slice has lung). The test samples rows and columns about every ``sample_mm``.
    """

    margin_mm: float = 20.0
    body_hu: float = -350.0
    air_hu: float = -400.0
    min_body_cm2: float = 5.0
    min_lung_cm2: float = 1.0
    sample_mm: float = 4.0

    def __post_init__(self) -> None:
        if self.margin_mm < 0 or self.sample_mm < 0 or self.min_body_cm2 < 0 or self.min_lung_cm2 < 0:
            raise ValueError(f"invalid slice-skip parameters: {self}")


def prompt_slices(phase: np.ndarray, spacing: Sequence[float], params: SkipParams) -> np.ndarray:
    """Bool (Z,) of the slices of one phase (Z, Y, X) HU that SAM 3 should see."""
    dz, dy, dx = (float(v) for v in spacing)
    sy, sx = max(1, int(params.sample_mm / dy)), max(1, int(params.sample_mm / dx))
    sub = phase[:, ::sy, ::sx]
    px_cm2 = dy * dx * sy * sx / 100.0
    body = sub >= params.body_hu
    has_body = np.count_nonzero(body, axis=(1, 2)) * px_cm2 >= params.min_body_cm2
    # air with body on both sides along its row: lungs and airway, not the air around the patient
    enclosed = np.logical_or.accumulate(body, axis=2) & np.logical_or.accumulate(body[:, :, ::-1], axis=2)[
        :, :, ::-1]
    air = enclosed & ~body & (sub < params.air_hu)
    has_lung = (np.count_nonzero(air, axis=(1, 2)) * px_cm2 >= params.min_lung_cm2) & has_body
    zs = np.flatnonzero(has_lung)
    if zs.size == 0:
        return has_body
    margin = int(np.ceil(params.margin_mm / dz)) if dz > 0 else 0
    near = np.zeros_like(has_body)
    near[max(0, int(zs[0]) - margin) : int(zs[-1]) + margin + 1] = True
    return has_body & near


def body_midlines(body: np.ndarray) -> np.ndarray:
    """x index of the body centroid per phase of a bool (P, Z, Y, X) body mask; image centre when empty."""
    out = np.full(body.shape[0], (body.shape[3] - 1) / 2.0)
    for p in range(body.shape[0]):
        prof = np.add.reduce(body[p], axis=(0, 1), dtype=np.int64)
        total = int(prof.sum())
        if total:
            out[p] = float(np.dot(prof, np.arange(prof.size))) / total
    return out


def split_sides(mask: np.ndarray, midline_x: float) -> tuple[np.ndarray, np.ndarray]:
    """(Left, Right) parts of a (..., X) mask: columns with x index >= ``midline_x`` are patient Left."""
    left_cols = np.arange(mask.shape[-1]) >= midline_x
    return mask & left_cols, mask & ~left_cols


def postprocess(masks: dict[str, np.ndarray], spacing: Sequence[float], outputs: Sequence[OutputStructure],
                temporal: TemporalParams | None = None, workers: int = 2,
                hu: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict[str, CleanReport]]:
    """Temporal filter (SAM 3 ROIs), connectivity and hole filling IN PLACE, then envelopes.

    Returns ``(envelopes, reports)``. ROIs missing from ``masks`` (skipped) are ignored. ``hu`` (P, Z, Y, X),
    the CT of the masks, enables the temporal filter's motion-compensated matching; without it the filter
    falls back to overlap matching (docs/postprocessing.md).
    """
    temporal = temporal or TemporalParams()
    envelopes: dict[str, np.ndarray] = {}
    reports: dict[str, CleanReport] = {}
    for out in outputs:
        if out.name not in masks:
            continue
        t0 = time.perf_counter()
        tp = temporal if out.spec.method == "sam3" else None
        params = connectivity_params(out.spec)
        if params is None:
            n_ph = masks[out.name].shape[0]
            reports[out.name] = CleanReport(removed_temporal=[0] * n_ph, removed_connectivity=[0] * n_ph,
                                            note=PASSTHROUGH_NOTE)
        else:
            reports[out.name] = clean_phases(masks[out.name], spacing, tp, params, workers, hu)
        if out.envelope_name:
            envelopes[out.envelope_name] = envelope(masks[out.name])
        r = reports[out.name]
        log.debug("postprocess %s: %d components, removed %d temporal / %d connectivity in %.2f s", out.name,
                  sum(r.components), sum(r.removed_temporal), sum(r.removed_connectivity),
                  time.perf_counter() - t0)
    return envelopes, reports


def segment_volume(hu: np.ndarray, spacing: Sequence[float], structures: Sequence[StructureSpec],
                   segmenter: Segmenter | None, temporal: TemporalParams | None = None, *,
                   keep_raw: bool = False, workers: int = 2, qa_params: QAParams | None = None,
                   phase_percents: Sequence[float] | None = None, slices_per_call: int = 32,
                   study_key: str = "", skip: SkipParams | None = SkipParams(),
                   overlap: bool = True) -> EngineResult:
    """Segment a 4DCT already in memory: HU (P, Z, Y, X) or one phase (Z, Y, X); spacing (dz, dy, dx) in mm.

    The per-phase steps of :class:`models.phase_segmentation.PhaseSegmentation` (SAM 3 of a phase overlaps
    the CPU work of the phase before unless ``overlap=False``), then the cross-phase post-processing.
    ``skip``: SAM 3 runs only on the slices :func:`prompt_slices` keeps (``None``: every slice); the QA's
    ``sam3_slices`` says how many were skipped per prompt.
    """
    from models.phase_overlap import array_phases, run_phases
    from models.phase_segmentation import PhaseSegmentation

    vol = np.asarray(hu)
    if vol.ndim == 3:
        vol = vol[None]
    if vol.ndim != 4:
        raise ValueError(f"hu must be (phases, z, y, x), got shape {np.shape(hu)}")
    seg = PhaseSegmentation((vol.shape[0], vol.shape[1], vol.shape[2], vol.shape[3]), spacing,
                            structures, segmenter, slices_per_call=slices_per_call, skip=skip,
                            study_key=study_key)
    run_phases(seg, array_phases(vol), overlap=overlap)
    return seg.finish(vol, temporal, keep_raw=keep_raw, workers=workers, qa_params=qa_params,
                      phase_percents=phase_percents)


def postprocess_volume(masks: dict[str, np.ndarray], hu: np.ndarray, spacing: Sequence[float],
                       structures: Sequence[StructureSpec], temporal: TemporalParams | None = None, *,
                       skipped: Mapping[str, str] | None = None, workers: int = 2,
                       qa_params: QAParams | None = None, phase_percents: Sequence[float] | None = None,
                       study_key: str = "") -> EngineResult:
    """Everything after segmentation, for masks from any source: temporal filter, connectivity, envelopes, QA.

    ``masks``: output ROI name (:func:`output_structures` of ``structures``: ``Lung_L``, ``GTVp``) -> bool
    (P, Z, Y, X), cleaned IN PLACE; names without a structure are ignored, structures without a mask are
    left out. ``hu``: the 4DCT (P, Z, Y, X) the masks lie on, for steps that look at the image.
    :func:`segment_volume` calls this with SAM 3's masks; ``itvnode itv`` with contours read from RTSTRUCTs.
    """
    vol = np.asarray(hu)
    if vol.ndim == 3:
        vol = vol[None]
    sp = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    outputs = output_structures(structures)
    for name, m in masks.items():
        if m.shape != vol.shape:
            raise ValueError(f"mask {name!r} has shape {m.shape}, the volume {vol.shape}")
    t_post = time.perf_counter()
    envelopes, reports = postprocess(masks, sp, outputs, temporal, workers, hu=vol)
    log.info("study %s: post-processing %d ROI(s) over %d phase(s) in %.2f s", study_key or "-", len(reports),
             vol.shape[0], time.perf_counter() - t_post)
    skipped = dict(skipped or {})
    qa = study_qa(masks, sp, envelopes, {k: r.as_dict() for k, r in reports.items()}, skipped, qa_params,
                  phase_percents, {o.envelope_name: o.name for o in outputs if o.envelope_name})
    elapsed = round(time.perf_counter() - t_post, 3)
    qa["timing_s"] = {"total": elapsed, "postprocess": elapsed}
    qa["temporal"] = _temporal_dict(temporal or TemporalParams())
    ordered = {o.name: masks[o.name] for o in outputs if o.name in masks}
    return EngineResult(ordered, envelopes, qa, skipped)


def _temporal_dict(t: TemporalParams) -> dict[str, Any]:
    return {"min_phases": t.min_phases, "min_overlap": t.min_overlap, "match": t.match,
            "max_centroid_mm": t.max_centroid_mm, "motion_mm": t.motion_mm,
            "motion_margin_mm": t.motion_margin_mm, "motion_min_ncc": t.motion_min_ncc,
            "motion_min_mm3": t.motion_min_mm3,
            "centroid_volume_ratio": t.centroid_volume_ratio, "max_gap": t.max_gap, "circular": t.circular,
            "connectivity": t.connectivity}

"""The QA report of one study: four A4 pages (PDF and one PNG per page) from the cleaned masks, the CT and the
QA numbers, for a person to look at before trusting the RTSTRUCT.

1. summary: phases used / expected, structures produced and skipped (with reasons), volumes, ITV volume,
   motion amplitude SI/AP/LR, QA warnings, model + adapter, "review before clinical use";
2. volume per phase per structure; target centroid per phase (SI, AP, LR) and its SI-AP loop;
3. axial, coronal and sagittal slices through the target at end-inhale and end-exhale with every structure's
   contour, and the envelope (ITV) with every phase's target outline on the reference series;
4. the coronal slice through the target in every phase with its contour (a missing or jumping phase shows).

Two steps, so that the worker never holds the CT for the pictures: :func:`extract` (here) takes the slices the
pages need (2D arrays only: small) while the 4D volume is in memory; ``render`` (worker/qa_render.py) draws
them later, off the RTSTRUCT's critical path. numpy + matplotlib only: no DICOM, no torch
(service/dicomio/encapsulated_pdf.py wraps the PDF for the PACS).

Orientation (canonical axes of service/dicomio/volume.py: x towards patient Left, y towards Posterior, z with
the
patient z, i.e. towards the head): axial images show the patient's left on the image right and anterior up;
coronal images the head up and the patient's left on the right; sagittal images the head up and anterior on
the left. Every image is drawn in patient millimetres (equal aspect), with a scale bar and the orientation
letters on its edges.

End-inhale is the phase labelled nearest 0 %, end-exhale the one nearest 50 % (the vendors' convention).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPORT_DIR = "report"  # results/<REPORT_DIR>: report.pdf, page-1.png ...
DEFAULT_COLORS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#999999")
ENVELOPE_COLOR = "#00d5ff"
REVIEW = "Machine-generated contours: review by a qualified person before clinical use."


@dataclass
class Plane:
    """One 2D image in patient mm: ``image`` (rows, cols), pixel-centre coordinates ``u`` (cols) and ``v``
    (rows), what the axes are (``plane``), and contours (name -> bool image of the same shape)."""

    plane: str  # axial | coronal | sagittal
    image: np.ndarray
    u: np.ndarray
    v: np.ndarray
    contours: dict[str, np.ndarray] = field(default_factory=dict)
    where: str = ""  # "z = 12.5 mm"


@dataclass
class ReportData:
    """Everything the pages show: 2D slices and numbers only (JSON-able apart from the arrays)."""

    study_key: str
    percents: list[float]
    qa: dict[str, Any]
    skipped: dict[str, str]
    algorithm: dict[str, Any]
    target: str | None  # the structure the envelope is built from (GTVp)
    envelope: str | None  # its envelope (ITV)
    colors: dict[str, str]
    inhale: int  # phase index
    exhale: int
    phase_views: dict[int, list[Plane]]  # phase index -> axial, coronal, sagittal through the target
    reference_kind: str  # AVG | MIP | "50 % phase"
    reference_views: list[Plane]  # envelope + every phase's target outline (names "P<i>")
    strip: list[Plane]  # coronal per phase, same plane
    notes: list[str] = field(default_factory=list)  # e.g. "ITV from 10 of 10 phases"


def _nearest(percents: Sequence[float], want: float) -> int:
    d = [min(abs(p - want), 100 - abs(p - want)) for p in percents]
    return int(np.argmin(d))


def _profiles(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel counts of a (Z, Y, X) mask per z, y and x index (int64): its projections on the three axes,
    without listing its voxels (``np.nonzero`` of a body-sized mask is ~100x slower)."""
    m = np.asarray(mask, dtype=bool)
    plane = m.sum(axis=0, dtype=np.int32)  # at most Z per pixel
    per_z = np.array([np.count_nonzero(s) for s in m], dtype=np.int64)
    return per_z, plane.sum(axis=1, dtype=np.int64), plane.sum(axis=0, dtype=np.int64)


def _centroid_index(mask: np.ndarray) -> tuple[int, int, int] | None:
    """The voxel nearest the centroid of a (Z, Y, X) mask, None when it is empty. Equals rounding the mean
    of ``np.nonzero(mask)`` per axis: the index sums are exact integers (below 2**53) either way and the
    division is the same one float division."""
    profiles = _profiles(mask)
    n = int(profiles[0].sum())
    if not n:
        return None
    return tuple(  # type: ignore[return-value]
        int(round(int(np.dot(np.arange(c.size, dtype=np.int64), c)) / n)) for c in profiles
    )


def _coords(
    origin: Sequence[float], spacing: Sequence[float], shape: Sequence[int]
) -> tuple[np.ndarray, ...]:
    """Pixel-centre patient coordinates along z, y, x (mm)."""
    ox, oy, oz = origin
    dz, dy, dx = spacing
    return (oz + dz * np.arange(shape[0]), oy + dy * np.arange(shape[1]), ox + dx * np.arange(shape[2]))


def _window(n: int, centre: int, half: int) -> slice:
    if half <= 0 or 2 * half >= n:
        return slice(0, n)
    lo = min(max(0, centre - half), n - 2 * half)
    return slice(lo, lo + 2 * half)


def _views(
    vol: np.ndarray, contours: Mapping[str, np.ndarray], at: tuple[int, int, int],
    zyx: tuple[np.ndarray, ...],
    crop: tuple[slice, slice, slice],
) -> list[Plane]:
    """Axial, coronal, sagittal planes through voxel ``at`` of ``vol`` (Z, Y, X), cropped to ``crop``."""
    z, y, x = at
    cz, cy, cx = crop
    zc, yc, xc = zyx
    return [
        Plane("axial", vol[z, cy, cx].astype(np.float32), xc[cx], yc[cy],
              {k: m[z, cy, cx] for k, m in contours.items()}, f"z = {zc[z]:.1f} mm"),
        Plane("coronal", vol[cz, y, cx].astype(np.float32), xc[cx], zc[cz],
              {k: m[cz, y, cx] for k, m in contours.items()}, f"y = {yc[y]:.1f} mm"),
        Plane("sagittal", vol[cz, cy, x].astype(np.float32), yc[cy], zc[cz],
              {k: m[cz, cy, x] for k, m in contours.items()}, f"x = {xc[x]:.1f} mm"),
    ]


def _body_crop(hu: np.ndarray, body_any: np.ndarray | None) -> tuple[slice, slice, slice]:
    """The bounding box of the body (``body_any``: the External in any phase, else HU > -500) over every
    phase, plus a small margin."""
    m = np.asarray(body_any if body_any is not None else (hu[0] > -500))
    if not m.any():
        return (slice(0, hu.shape[1]), slice(0, hu.shape[2]), slice(0, hu.shape[3]))
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(m.any(axis=other))
        n = m.shape[axis]
        out.append(slice(max(0, int(idx[0]) - 3), min(n, int(idx[-1]) + 4)))
    return out[0], out[1], out[2]


def _zoom_crop(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> tuple[slice, slice, slice]:
    """The bounding box of a non-empty (Z, Y, X) mask grown by ``margin_mm`` (clamped to the array)."""
    out = []
    for axis, counts in enumerate(_profiles(mask)):
        idx = np.flatnonzero(counts)
        pad = int(np.ceil(margin_mm / spacing[axis]))
        lo, hi = int(idx[0]) - pad, int(idx[-1]) + pad + 1
        out.append(slice(max(0, lo), min(mask.shape[axis], hi)))
    return out[0], out[1], out[2]


def extract(
    study_key: str,
    hu: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    percents: Sequence[float],
    masks: Mapping[str, np.ndarray],
    envelopes: Mapping[str, np.ndarray],
    qa: Mapping[str, Any],
    *,
    skipped: Mapping[str, str] | None = None,
    algorithm: Mapping[str, Any] | None = None,
    reference: tuple[str, np.ndarray] | None = None,
    colors: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> ReportData:
    """The slices and numbers of the report from a study in memory.

    ``hu``: (P, Z, Y, X) HU; ``spacing`` (dz, dy, dx) and ``origin`` (x, y, z of voxel 0) in mm; ``masks``:
    cleaned bool (P, Z, Y, X) per structure; ``envelopes`` bool (Z, Y, X); ``qa``: models.post.qa.study_qa
    (with
    ``envelopes[name]["source"]``); ``reference``: (kind, (Z, Y, X) HU) of the AVG/MIP series on the same
    grid, else the end-exhale phase is the reference.
    """
    t0 = time.perf_counter()
    n_ph = hu.shape[0]
    zyx = _coords(origin, spacing, hu.shape[1:])
    env_qa = qa.get("envelopes") or {}
    envelope = next((e for e in envelopes if env_qa.get(e, {}).get("source") in masks), None)
    target = env_qa[envelope]["source"] if envelope else None
    if target is None or not masks[target].any():  # no envelope: the smallest non-empty structure
        present = [(int(np.count_nonzero(m)), k) for k, m in masks.items() if m.any()]
        target = min(present)[1] if present else None
        envelope = envelope if target and envelope and env_qa[envelope].get("source") == target else None
    inhale, exhale = _nearest(percents, 0.0), _nearest(percents, 50.0)
    palette = dict(colors or {})
    for i, name in enumerate([*masks, *envelopes]):
        palette.setdefault(name, DEFAULT_COLORS[i % len(DEFAULT_COLORS)])
    if envelope:  # the RTSTRUCT gives the envelope its structure's colour: here it must stand apart
        palette[envelope] = ENVELOPE_COLOR
    body = next((m for k, m in masks.items() if k.lower() == "external" and m.any()), None)
    body_any = np.asarray(body.any(axis=0)) if body is not None else None
    crop = _body_crop(hu, body_any)
    tmask = masks[target] if target else None
    env: np.ndarray | None = None
    if envelope:
        env = np.asarray(envelopes[envelope])
    elif tmask is not None:
        env = body_any if tmask is body and body_any is not None else np.asarray(tmask.any(axis=0))
    centre_all = _centroid_index(env) if env is not None else None
    if centre_all is None:
        centre_all = tuple(s // 2 for s in hu.shape[1:])  # type: ignore[assignment]
    assert centre_all is not None

    phase_views: dict[int, list[Plane]] = {}
    for p in dict.fromkeys((inhale, exhale)):
        at = _centroid_index(tmask[p]) if tmask is not None else None
        contours = {k: m[p] for k, m in masks.items()}
        if envelope and env is not None:
            contours[envelope] = env
        phase_views[p] = _views(hu[p], contours, at or centre_all, zyx, crop)

    if reference is not None:
        ref_kind, ref = reference
    else:
        ref_kind, ref = f"{percents[exhale]:g} % phase", hu[exhale]
    zoom = _zoom_crop(env, spacing, 30.0) if env is not None and env.any() else crop
    ref_contours: dict[str, np.ndarray] = {}
    if tmask is not None:
        ref_contours = {f"P{p}": tmask[p] for p in range(n_ph)}
    if envelope and env is not None:
        ref_contours[envelope] = env
    reference_views = _views(ref, ref_contours, centre_all, zyx, zoom)

    strip: list[Plane] = []
    y = centre_all[1]  # one coronal plane for every phase: motion and jumps show against it
    sz = _window(hu.shape[1], centre_all[0], int(np.ceil(60.0 / spacing[0])))
    sx = _window(hu.shape[3], centre_all[2], int(np.ceil(60.0 / spacing[2])))
    for p in range(n_ph):
        contours = {target: tmask[p, sz, y, sx]} if tmask is not None and target else {}
        if envelope and env is not None:
            contours[envelope] = env[sz, y, sx]
        strip.append(Plane("coronal", hu[p, sz, y, sx].astype(np.float32), zyx[2][sx], zyx[0][sz], contours,
                           f"y = {zyx[1][y]:.1f} mm"))
    log.debug("study %s: report slices extracted in %.2f s", study_key, time.perf_counter() - t0)
    return ReportData(
        study_key=study_key, percents=[float(p) for p in percents], qa=dict(qa), skipped=dict(skipped or {}),
        algorithm=dict(algorithm or {}), target=target, envelope=envelope, colors=palette, inhale=inhale,
        exhale=exhale, phase_views=phase_views, reference_kind=ref_kind, reference_views=reference_views,
        strip=strip, notes=list(notes),
    )


# --------------------------------------------------------------------------------------------- render


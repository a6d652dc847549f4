"""Threshold methods: the body outline (External) and, selectable for lungs, air inside the body split L/R.

Both take one phase ``(Z, Y, X)`` HU or all phases ``(P, Z, Y, X)`` (each phase is processed on its own) and
a voxel spacing ``(dz, dy, dx)`` in mm. Axes follow docs/internal-api.md: x index grows towards patient
Left.

Body: voxels in ``hu_range``; optionally (``bridge_mm`` > 0) an in-plane opening cuts bridges thinner than
2 x ``bridge_mm`` so that a couch or board touching the patient through a thin contact detaches (the opened
boundary is restored afterwards); a couch/table top is recognised as a wide, thin slab and dropped; every
other 3D component of at least ``min_part_cc`` (and ``min_part_fraction`` of the largest) is kept, because an
arm beside the torso is body too; holes are filled per slice (which also fills every 3D cavity).
Limitation: a couch resting on the back over a contact thicker than 2 x ``bridge_mm`` stays attached.
Everything after the range test runs inside the bounding box of the in-range voxels and phases run on
threads: a full-size phase (120 x 512 x 512) takes about 0.14 s of one core without the opening, two
ndimage.label passes most of it (bench/threshold.py, against the previous implementation in
tests/support/threshold_previous.py). A caller going phase after phase passes a :class:`ScratchPool` so that
the temporaries are reused instead of being fresh memory every phase.
"""

from __future__ import annotations

import logging
import math
import queue
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from scipy import ndimage

from models.post.labels import thread_map

log = logging.getLogger(__name__)

_CONN6 = ndimage.generate_binary_structure(3, 1)
_FEW_CANDIDATES = 8  # body parts above the size floor tested for couch shape without find_objects
_SIZES_CHUNK = 1 << 18  # labels per np.bincount call in _sizes
_RANGE_CHUNK = 1 << 20  # voxels per comparison in _in_range (a temporary that stays in cache)
_LABEL_MAX = 2**31 - 2  # ndimage.label writes int32 below this many voxels
_PLANE4 = np.zeros((3, 3, 3), dtype=bool)  # 4-connectivity within an axial slice, none across slices
_PLANE4[1] = ndimage.generate_binary_structure(2, 1)


class Scratch:
    """Arrays :func:`threshold_body` reuses from one phase to the next, so that a phase's temporaries (the
    in-range mask, the label images, ~100 MB at 120 x 512 x 512) are not fresh memory every time (page
    faults and zeroing in the kernel were a third of a phase's time). One thread at a time."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype`` on the buffer called ``name``
        (what an earlier ``get`` of that name returned is overwritten)."""
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = self._buffers[name] = np.empty(max(nbytes, 1), dtype=np.uint8)
        return buf[:nbytes].view(dt).reshape(shape)


class ScratchPool:
    """:class:`Scratch` per concurrent caller: :meth:`take` lends one (a new one when all are lent)."""

    def __init__(self) -> None:
        self._free: queue.SimpleQueue[Scratch] = queue.SimpleQueue()

    @contextmanager
    def take(self) -> Iterator[Scratch]:
        try:
            scratch = self._free.get_nowait()
        except queue.Empty:
            scratch = Scratch()
        try:
            yield scratch
        finally:
            self._free.put(scratch)


def _per_phase(hu: np.ndarray) -> tuple[np.ndarray, bool]:
    arr = np.asarray(hu)
    if arr.ndim == 3:
        return arr[None], False
    if arr.ndim == 4:
        return arr, True
    raise ValueError(f"expected (Z, Y, X) or (P, Z, Y, X) HU, got shape {arr.shape}")


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive values (dz, dy, dx) in mm, got {tuple(spacing)}")
    return float(spacing[0]), float(spacing[1]), float(spacing[2])


def _disk(radius_mm: float, dy: float, dx: float) -> np.ndarray | None:
    """In-plane elliptical footprint (1, h, w) of ``radius_mm``; ``None`` when it would be a single pixel."""
    ry, rx = int(radius_mm / dy), int(radius_mm / dx)
    if ry < 1 and rx < 1:
        return None
    yy, xx = np.mgrid[-ry : ry + 1, -rx : rx + 1]
    disk = ((yy * dy) ** 2 + (xx * dx) ** 2) <= radius_mm**2 + 1e-6
    return disk[None]


def fill_holes(mask: np.ndarray, scratch: Scratch | None = None) -> np.ndarray:
    """Fill enclosed holes per axial slice (4-connected background not reaching the slice border).

    One labelling pass over the volume instead of a fill per slice; a cavity enclosed in 3D is enclosed on
    each of its slices too, so this also fills every 3D hole. With ``scratch``, the result is a scratch
    array (its ``"filled"`` buffer) and the label image uses its ``"labels"`` buffer.
    """
    if scratch is not None and mask.size < _LABEL_MAX:
        background = scratch.get("labels", mask.shape, np.int32)
        n = ndimage.label(np.logical_not(mask, out=scratch.get("background", mask.shape, bool)),
                          structure=_PLANE4, output=background)
    else:
        background, n = ndimage.label(~mask, structure=_PLANE4)
    filled = np.ones(n + 1, dtype=bool)  # per label: part of the result (label 0 is the foreground itself)
    for edge in (background[:, 0, :], background[:, -1, :], background[:, :, 0], background[:, :, -1]):
        filled[edge] = False  # background reaching the slice border stays background
    filled[0] = True
    if scratch is not None:  # one pass: the foreground and every enclosed hole
        return np.take(filled, background, out=scratch.get("filled", mask.shape, bool), mode="clip")
    return filled[background]


def _is_couch(comp: np.ndarray, dy: float, dx: float, max_thickness_mm: float, min_width_mm: float) -> bool:
    """A couch/table top is a slab: wide left-right, thin front-back on every slice it occupies."""
    occupied: np.ndarray = np.any(comp, axis=1)  # (Z, X): the columns each slice occupies
    zs = np.flatnonzero(occupied.any(axis=1))
    cols = occupied[zs]
    first = np.argmax(cols, axis=1)
    last = cols.shape[1] - 1 - np.argmax(cols[:, ::-1], axis=1)
    wide = (last - first + 1) * dx
    voxels = np.array([np.count_nonzero(comp[k]) for k in zs], dtype=np.int64)
    thick = voxels * dy * dx / wide  # mean AP thickness across its width
    return bool(np.median(thick) < max_thickness_mm and np.median(wide) >= min_width_mm)


def _sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxels per label 0..n: ``np.bincount`` over cache-sized chunks (it converts each chunk to intp; one
    call over the whole array writes and reads that copy through memory)."""
    flat = labels.reshape(-1)
    counts = np.zeros(n + 1, dtype=np.int64)
    for i in range(0, flat.size, _SIZES_CHUNK):
        counts += np.bincount(flat[i : i + _SIZES_CHUNK], minlength=n + 1)
    return counts


def _in_range(hu: np.ndarray, hu_range: tuple[float, float], out: np.ndarray | None = None) -> np.ndarray:
    """``(hu >= lo) & (hu <= hi)`` (into the bool array ``out`` when given); integer HU is compared with
    integer bounds (no cast of every voxel), a slab of slices at a time (the second comparison's temporary
    stays in cache)."""
    lo, hi = hu_range
    if hu.dtype.kind in "iu" and math.isfinite(lo) and math.isfinite(hi):
        info = np.iinfo(hu.dtype)
        lo_i, hi_i = max(math.ceil(lo), int(info.min)), min(math.floor(hi), int(info.max))
        if out is None:
            out = np.empty(hu.shape, dtype=bool)
        if lo_i > hi_i:
            out[...] = False
            return out
        lo_t, hi_t = hu.dtype.type(lo_i), hu.dtype.type(hi_i)
        step = max(1, _RANGE_CHUNK // max(1, math.prod(hu.shape[1:])))
        tmp = np.empty((min(step, hu.shape[0]), *hu.shape[1:]), dtype=bool)
        for k in range(0, hu.shape[0], step):
            o, t = out[k : k + step], tmp[: min(step, hu.shape[0] - k)]
            np.greater_equal(hu[k : k + step], lo_t, out=o)
            o &= np.less_equal(hu[k : k + step], hi_t, out=t)
        return out
    if out is None:
        return (hu >= lo) & (hu <= hi)
    out[...] = (hu >= lo) & (hu <= hi)
    return out


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` (Z, Y, X), grown by ``margin`` pixels in y and x (clamped); None if empty."""
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    if zs.size == 0:
        return None
    plane = np.asarray(mask[zs[0] : zs[-1] + 1].any(axis=0))
    ys, xs = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    ny, nx = plane.shape
    return (
        slice(int(zs[0]), int(zs[-1]) + 1),
        slice(max(0, int(ys[0]) - margin), min(ny, int(ys[-1]) + 1 + margin)),
        slice(max(0, int(xs[0]) - margin), min(nx, int(xs[-1]) + 1 + margin)),
    )


def _body_one(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    hu_range: tuple[float, float],
    min_part_cc: float,
    min_part_fraction: float,
    bridge_mm: float,
    couch_thickness_mm: float,
    couch_min_width_mm: float,
    out: np.ndarray | None = None,
    scratch: Scratch | None = None,
) -> np.ndarray:
    """:func:`_body_one_full` computed inside the bounding box of the in-range voxels only (into ``out``;
    temporaries on ``scratch``).

    Exact: outside that box nothing is in range, so components, sizes and couch tests are unchanged; the
    in-plane opening sees zeros beyond the box either way; hole filling keeps a one-pixel background margin
    (or the image edge) around the box, so background reaching the box's border is exactly the background
    reaching the slice border. The box is a fraction of a 512 x 512 slice for a patient (bench/threshold.py).
    """
    raw = _in_range(hu, hu_range, scratch.get("raw", hu.shape, bool) if scratch is not None else None)
    box = _bbox(raw, 1)
    if out is None:
        out = np.zeros(hu.shape, dtype=bool)
    else:
        out[...] = False
    if box is None:
        return out
    out[box] = _body_one_full(
        hu[box], spacing, hu_range, min_part_cc, min_part_fraction, bridge_mm, couch_thickness_mm,
        couch_min_width_mm, raw=raw[box], scratch=scratch,
    )
    return out


def _body_one_full(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    hu_range: tuple[float, float],
    min_part_cc: float,
    min_part_fraction: float,
    bridge_mm: float,
    couch_thickness_mm: float,
    couch_min_width_mm: float,
    raw: np.ndarray | None = None,
    scratch: Scratch | None = None,
) -> np.ndarray:
    """The body outline of one phase over the whole array (the reference :func:`_body_one` must equal).
    With ``scratch`` the temporaries, and the result, are scratch arrays."""
    dz, dy, dx = spacing
    if raw is None:
        raw = _in_range(hu, hu_range)
    if not raw.any():
        return raw
    foot = _disk(bridge_mm, dy, dx) if bridge_mm > 0 else None
    core = ndimage.binary_opening(raw, structure=foot) if foot is not None else raw
    if scratch is not None and core.size < _LABEL_MAX:
        labels = scratch.get("labels", core.shape, np.int32)
        n = ndimage.label(core, structure=_CONN6, output=labels)
    else:
        labels, n = ndimage.label(core, structure=_CONN6)
    if n == 0:
        return np.zeros_like(raw)
    voxel_cc = dz * dy * dx / 1000.0
    sizes = _sizes(labels, n)[1:] * voxel_cc
    floor = max(min_part_cc, min_part_fraction * float(sizes.max()))
    candidates = [int(i) + 1 for i in np.flatnonzero(sizes >= floor)]
    # _is_couch does not depend on the box it is given: whole-array masks for a few candidates are cheaper
    # than find_objects over every label
    objects = ndimage.find_objects(labels) if len(candidates) > _FEW_CANDIDATES else None
    kept_ids: list[int] = []
    couches = 0
    for i in candidates:
        if couch_thickness_mm > 0:
            sl = objects[i - 1] if objects is not None else None
            if sl is not None:
                comp = labels[sl] == i
            elif scratch is not None:
                comp = np.equal(labels, i, out=scratch.get("comp", labels.shape, bool))
            else:
                comp = labels == i
            if _is_couch(comp, dy, dx, couch_thickness_mm, couch_min_width_mm):
                couches += 1
                continue
        kept_ids.append(i)
    if couches:
        log.debug("threshold body: dropped %d couch-like component(s)", couches)
    kept = scratch.get("kept", labels.shape, bool) if scratch is not None else None
    if len(kept_ids) == 1:
        kept = np.equal(labels, kept_ids[0], out=kept)
    else:
        keep = np.zeros(n + 1, dtype=bool)
        keep[kept_ids] = True
        kept = np.take(keep, labels, out=kept, mode="clip")
    if foot is not None:  # give back the boundary the opening shaved off, but not what it cut loose
        kept = raw & ndimage.binary_dilation(kept, structure=foot)
    box = _bbox(kept, 1)
    if box is None:
        return kept
    # exact: a background margin (or the image edge) surrounds the box; ``labels`` is free again
    kept[box] = fill_holes(kept[box], scratch)
    return kept


def threshold_body(
    hu: np.ndarray,
    spacing: Sequence[float],
    hu_range: tuple[float, float] = (-350.0, 3000.0),
    *,
    min_part_cc: float = 5.0,
    min_part_fraction: float = 0.005,
    bridge_mm: float = 0.0,
    couch_thickness_mm: float = 20.0,
    couch_min_width_mm: float = 150.0,
    workers: int = 2,
    out: np.ndarray | None = None,
    scratch: ScratchPool | None = None,
) -> np.ndarray:
    """Body outline: bool mask of the same shape as ``hu`` ((Z, Y, X) or (P, Z, Y, X), per phase), written
    into ``out`` when given (a bool array of that shape, e.g. the phase's slot of a study's mask).
    ``scratch``: where the temporaries come from, kept by a caller that runs phase after phase (default: a
    pool for this call).

    ``couch_thickness_mm=0`` disables couch removal; ``bridge_mm=0`` disables the opening. Phases run on
    ``workers`` threads (the array work releases the GIL).
    """
    phases, is4d = _per_phase(hu)
    sp = _check_spacing(spacing)
    lo, hi = float(hu_range[0]), float(hu_range[1])
    if not lo < hi:
        raise ValueError(f"hu_range {hu_range} must be (low, high) with low < high")
    if out is None:
        out = np.empty(phases.shape, dtype=bool)
    elif out.shape != np.shape(hu) or out.dtype != bool:
        raise ValueError(f"out must be bool of shape {np.shape(hu)}, got {out.dtype} {out.shape}")
    else:
        out = out if is4d else out[None]
    pool = scratch if scratch is not None else ScratchPool()

    def one(p: int) -> None:
        with pool.take() as sc:
            _body_one(phases[p], sp, (lo, hi), min_part_cc, min_part_fraction, bridge_mm, couch_thickness_mm,
                      couch_min_width_mm, out=out[p], scratch=sc)

    thread_map(one, range(len(phases)), workers)
    return out if is4d else out[0]


def _split_lr(comp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split one air component spanning both sides at its thinnest sagittal plane in the middle third."""
    cols = comp.sum(axis=(0, 1))
    xs = np.flatnonzero(cols)
    a, b = xs[0], xs[-1]
    third = max((b - a) // 3, 1)
    mid = np.arange(a + third, max(b - third, a + third + 1))
    cut = int(mid[np.argmin(cols[mid])])
    right = comp.copy()
    right[..., cut:] = False
    left = comp.copy()
    left[..., :cut] = False
    return left, right


def _lungs_one(
    hu: np.ndarray, spacing: tuple[float, float, float], body: np.ndarray, hu_max: float, min_volume_cc: float
) -> tuple[np.ndarray, np.ndarray]:
    dz, dy, dx = spacing
    air = (hu < hu_max) & body
    labels, n = ndimage.label(air, structure=_CONN6)
    empty = np.zeros_like(air)
    if n == 0:
        return empty, empty.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * (dz * dy * dx / 1000.0)
    order = [i + 1 for i in np.argsort(sizes)[::-1] if sizes[i] >= min_volume_cc]
    if not order:
        return empty, empty.copy()
    first = labels == order[0]
    # Two lungs are two components unless they touch (anterior junction, or through the airway).
    if len(order) >= 2 and sizes[order[1] - 1] >= 0.2 * sizes[order[0] - 1]:
        second = labels == order[1]
        cx1 = np.flatnonzero(first.any(axis=(0, 1))).mean()
        cx2 = np.flatnonzero(second.any(axis=(0, 1))).mean()
        return (first, second) if cx1 > cx2 else (second, first)  # larger x index = patient Left
    return _split_lr(first)


def threshold_lungs(
    hu: np.ndarray,
    spacing: Sequence[float],
    body: np.ndarray | None = None,
    hu_max: float = -400.0,
    min_volume_cc: float = 20.0,
) -> dict[str, np.ndarray]:
    """Air (HU < ``hu_max``) inside the body, two largest components, ``{"Lung_L": ..., "Lung_R": ...}``.

    Airway and small gas pockets fall below the size rule; lungs that touch are split at the thinnest sagittal
    plane. Enclosed soft tissue (vessels, tumour) is not filled in (the lung contour is "lung minus GTV").
    """
    phases, is4d = _per_phase(hu)
    sp = _check_spacing(spacing)
    if body is None:
        body = threshold_body(hu, sp)
    bodies, _ = _per_phase(body)
    if bodies.shape != phases.shape:
        raise ValueError(f"body mask shape {bodies.shape} does not match HU {phases.shape}")
    pairs = [
        _lungs_one(p, sp, b.astype(bool), hu_max, min_volume_cc) for p, b in zip(phases, bodies, strict=True)
    ]
    left = np.stack([p[0] for p in pairs])
    right = np.stack([p[1] for p in pairs])
    return {"Lung_L": left if is4d else left[0], "Lung_R": right if is4d else right[0]}

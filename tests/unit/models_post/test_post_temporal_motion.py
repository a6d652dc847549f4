"""Motion-compensated matching: a small fast tumour keeps every phase, false positives beside it still go.

Scenes: a small 4DCT (lung at -800 HU with texture and noise, the tumour at 0 HU on a cos^6 path) in which
every false positive sits on a vessel-like blob that is in the CT in every phase (so the CT alone does not
give it away) and moves with the breathing. Each scene is checked against the old rules too, so that these
tests show what the CT-based rule adds: plain IoU loses the tumour's fast phases, centroids keep the
false positives.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from models.engine import segment_volume
from models.phantom import Phantom
from models.post.motion import estimate_shift
from models.post.temporal import TemporalParams, temporal_filter
from models.structures import default_structures
from service.settings import load_settings
from worker.engine_settings import engine_config

from .conftest import Injected, oracle_for

SP = (3.0, 1.5, 1.5)
DIMS = (26, 44, 44)
CENTRE = np.array([22.0, 33.0, 33.0])  # tumour at exhale (mm); inhale is CENTRE + (amplitude, 0, 0)
OLD = TemporalParams(motion_mm=None)
CENTROID = TemporalParams(motion_mm=None, max_centroid_mm=15.0)


def _si(n_ph: int, amplitude: float, offset: float = 0.07) -> np.ndarray:
    return amplitude * np.cos(np.pi * (np.arange(n_ph) / n_ph + offset)) ** 6


def _ball(centre: np.ndarray, r: float) -> np.ndarray:
    z, y, x = (np.arange(n)[:, None, None] if a == 0 else np.arange(n)[None, :, None] if a == 1
               else np.arange(n)[None, None, :] for a, n in enumerate(DIMS))
    pos = [(g + 0.5) * s for g, s in zip((z, y, x), SP, strict=True)]
    return np.asarray(sum((p - c) ** 2 for p, c in zip(pos, centre, strict=True)) <= r * r)


def scene(radius: float, amplitude: float, fps: list[tuple[int, float, float, float]], n_ph: int = 10,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(hu, masks, tumour, fp) for a tumour on a cos^6 path; ``fps``: (phase, dy mm, dx mm, radius mm)
    offsets from the tumour's centre in that phase, each on a blob that moves with the breathing."""
    rng = np.random.default_rng(seed)
    si = _si(n_ph, amplitude)
    texture = ndi.gaussian_filter(rng.normal(0, 1, DIMS), 1.0) * 100.0
    tumour = np.zeros((n_ph, *DIMS), bool)
    fp = np.zeros_like(tumour)
    hu = np.zeros((n_ph, *DIMS), np.int16)
    for p in range(n_ph):
        c = CENTRE + [si[p], 0, 0]
        tumour[p] = _ball(c, radius)
        img = -800.0 + ndi.shift(texture, (si[p] / SP[0], 0, 0), order=1, mode="nearest")
        img += rng.normal(0, 20.0, DIMS)
        for ph, dy, dx, r in fps:  # the blob is anatomy: it is there in every phase, moving with the lung
            img[_ball(c + [0, dy, dx], r)] = -40.0
            if ph == p:
                fp[p] |= _ball(c + [0, dy, dx], r)
        img[tumour[p]] = rng.normal(0, 20.0, int(tumour[p].sum()))
        hu[p] = img.astype(np.int16)
    fp &= ~tumour
    return hu, tumour | fp, tumour, fp


def _kept(out: np.ndarray, part: np.ndarray) -> float:
    return float((out & part).sum() / part.sum())


def test_small_fast_tumour_keeps_every_phase() -> None:
    hu, masks, tumour, _ = scene(3.5, 33.0, [])
    old, _ = temporal_filter(masks, OLD, SP)
    assert _kept(old, tumour) < 0.9  # plain IoU loses the fast phases
    out, rep = temporal_filter(masks, TemporalParams(), SP, hu=hu)
    assert (out == tumour).all()
    assert rep.motion == "ct" and rep.motion_links and sum(rep.removed) == 0


def test_false_positive_beside_the_path_is_removed() -> None:
    # 4 mm tumour, 30 mm; a 4 mm blob 6 mm (surface to surface) beside it in one phase
    hu, masks, tumour, fp = scene(4.0, 30.0, [(3, 14.0, 0.0, 4.0)], seed=1)
    cen, _ = temporal_filter(masks, CENTROID, SP)
    assert _kept(cen, tumour) == 1.0 and _kept(cen, fp) > 0.5  # centroids keep tumour and artifact
    out, rep = temporal_filter(masks, TemporalParams(), SP, hu=hu)
    assert (out == tumour).all()
    assert rep.removed[3] == 1 and rep.removed_voxels[3] == int(fp.sum())


def test_zigzag_chain_of_false_positives_is_removed() -> None:
    # consecutive phases 2..5, alternating sides, 5-11 mm from the tumour's surface
    chain = [(2, 11.5, 0.0, 3.0), (3, -11.5, 0.0, 3.0), (4, 0.0, 17.5, 3.0), (5, 0.0, -17.5, 3.0)]
    hu, masks, tumour, fp = scene(3.5, 34.0, chain, seed=2)
    for params in (OLD, CENTROID):  # each old rule fails one half of the test
        old, _ = temporal_filter(masks, params, SP)
        assert _kept(old, tumour) < 1.0 or _kept(old, fp) > 0.0
    out, rep = temporal_filter(masks, TemporalParams(), SP, hu=hu)
    assert (out == tumour).all()
    assert [rep.removed[p] for p in (2, 3, 4, 5)] == [1, 1, 1, 1]


def test_mask_only_fallback_is_the_overlap_rule() -> None:
    hu, masks, tumour, fp = scene(3.5, 33.0, [(4, 12.0, 0.0, 3.0)], seed=3)
    plain, rep = temporal_filter(masks, TemporalParams(), SP)  # no CT
    same, rep_off = temporal_filter(masks, OLD, SP, hu=hu)  # CT given, motion switched off
    assert rep.motion == "no CT" and rep_off.motion == "off" and not rep.motion_links
    assert (plain == same).all()
    expected, _ = temporal_filter(masks, TemporalParams(max_centroid_mm=None, motion_mm=None), SP)
    assert (plain == expected).all()
    assert not (plain & fp).any() and _kept(plain, tumour) < 1.0  # documented: fast phases lost without CT


def test_estimate_shift_recovers_a_displacement() -> None:
    rng = np.random.default_rng(5)
    a = ndi.gaussian_filter(rng.normal(0, 1, (30, 60, 60)), 1.5).astype(np.float32) * 100
    b = np.roll(a, (4, -6, 8), axis=(0, 1, 2))
    box = (slice(12, 16), slice(25, 30), slice(25, 30))
    got = estimate_shift(a, b, box, (2.5, 1.0, 1.0), 6.0, 20.0)
    assert got is not None and got.score > 0.95
    assert all(abs(g - w) <= 1 for g, w in zip(got.voxels, (4, -6, 8), strict=True))
    assert estimate_shift(np.zeros_like(a), np.zeros_like(a), box, (2.5, 1.0, 1.0), 6.0, 20.0) is None


def test_motion_params_validation_and_settings_wiring() -> None:
    for bad in ({"motion_mm": 0}, {"motion_margin_mm": -1}, {"motion_min_ncc": 1.5}, {"motion_min_mm3": -1}):
        with pytest.raises(ValueError):
            TemporalParams(**bad)  # type: ignore[arg-type]
    tp = engine_config(load_settings(sam3_dir=None, adapter_dir=None, temporal_motion_mm=12.0,
                                     temporal_motion_min_ncc=0.7)).temporal
    assert (tp.motion_mm, tp.motion_min_ncc, tp.motion_margin_mm) == (12.0, 0.7, 8.0)
    off = engine_config(load_settings(sam3_dir=None, adapter_dir=None, temporal_motion_mm=None))
    assert off.temporal.motion_mm is None


def test_engine_passes_the_ct_to_the_filter(phantom6: Phantom, injected: Injected) -> None:
    seg = oracle_for(phantom6, injected.masks)
    res = segment_volume(phantom6.hu, phantom6.spacing, default_structures(), seg,
                         TemporalParams(min_phases=3), slices_per_call=10)
    cleanup = res.qa["structures"]["GTVp"]["cleanup"]
    assert cleanup["motion"] == "ct" and isinstance(cleanup["motion_links"], list)
    assert len(cleanup["removed_temporal_voxels"]) == phantom6.shape[0]
    assert res.qa["temporal"]["motion_mm"] == 25.0

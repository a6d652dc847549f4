"""The phase-coherence rule: sporadic components go, blocks of >= k contiguous phases stay."""

from __future__ import annotations

import numpy as np
import pytest

import models.post.labels as labels
from models.post.labels import bounding_box, label_components, label_phases, pair_overlaps
from models.post.temporal import TemporalParams, find_genuine, render, temporal_filter

SHAPE = (12, 24, 24)


def _stack(n_phases: int) -> np.ndarray:
    return np.zeros((n_phases, *SHAPE), bool)


def _cube(m: np.ndarray, z: int, y: int, x: int, s: int = 4) -> None:
    m[z:z + s, y:y + s, x:x + s] = True


def test_single_phase_blob_removed_static_anatomy_kept() -> None:
    m = _stack(10)
    for p in range(10):
        _cube(m[p], 2, 2, 2, 5)
    blob = np.zeros(SHAPE, bool)
    _cube(blob, 7, 15, 15, 3)
    m[4] |= blob
    out, rep = temporal_filter(m, TemporalParams(min_phases=3))
    assert not (out[4] & blob).any()
    assert (out == (m & ~blob[None])).all()
    assert rep.removed == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert rep.removed_voxels[4] == 27


def test_block_length_against_k() -> None:
    m = _stack(10)
    _cube(m[2], 1, 1, 1)
    _cube(m[3], 1, 1, 1)  # two contiguous phases: sporadic for k = 3
    for p in (6, 7, 8):
        _cube(m[p], 6, 12, 12)  # three contiguous phases: genuine for k = 3
    out, _ = temporal_filter(m, TemporalParams(min_phases=3))
    assert not out[2].any() and not out[3].any()
    assert out[6:9].sum() == 3 * 64
    out2, _ = temporal_filter(m, TemporalParams(min_phases=2))
    assert out2.sum() == m.sum()
    out4, _ = temporal_filter(m, TemporalParams(min_phases=4))
    assert not out4.any()


def test_phases_are_circular() -> None:
    m = _stack(10)
    for p in (9, 0, 1):
        _cube(m[p], 3, 3, 3)
    out, _ = temporal_filter(m, TemporalParams(min_phases=3, circular=True))
    assert out.sum() == m.sum()
    out, _ = temporal_filter(m, TemporalParams(min_phases=3, circular=False))
    assert not out.any()


def test_moving_structure_chains_through_the_block() -> None:
    # a cube sliding 1 voxel per phase: each phase overlaps its neighbour, not phases further away
    m = _stack(8)
    for p in range(8):
        _cube(m[p], 2, 2 + (p if p < 4 else 8 - p) * 2, 5, 4)
    out, rep = temporal_filter(m, TemporalParams(min_phases=8))
    assert out.sum() == m.sum() and rep.tracks == 1


def test_dropped_phase_is_bridged() -> None:
    # present in phases 0, 1, 3 of 6 (phase 2 dropped, 4-5 genuinely absent): a block of 3 only across the gap
    m = _stack(6)
    for p in (0, 1, 3):
        _cube(m[p], 2, 2, 2, 6)
    out, _ = temporal_filter(m, TemporalParams(min_phases=3, max_gap=1))
    assert out.sum() == m.sum()
    out, _ = temporal_filter(m, TemporalParams(min_phases=3, max_gap=0))
    assert not out.any()


def test_dropped_phase_keeps_all_neighbours_of_moving_anatomy() -> None:
    m = _stack(10)
    for p in range(10):
        _cube(m[p], 2, 2 + abs(5 - p), 4, 6)
    m[5] = False  # the structure is missing in one phase
    blob = np.zeros(SHAPE, bool)
    _cube(blob, 9, 18, 18, 2)
    m[6] |= blob
    for k in (3, 9):
        out, _ = temporal_filter(m, TemporalParams(min_phases=k))
        assert (out == (m & ~blob[None])).all(), k


def test_bridged_gap_does_not_count_towards_k() -> None:
    # the same blob in phases 3 and 5 (nothing in 4) is linked across the gap, but the missing phase does not
    # count: 2 present phases < k = 3
    m = _stack(10)
    for p in range(10):
        _cube(m[p], 1, 1, 1, 5)
    _cube(m[3], 7, 16, 16, 3)
    _cube(m[5], 7, 16, 16, 3)
    out, _ = temporal_filter(m, TemporalParams(min_phases=3, max_gap=1))
    assert not out[3, 7:, 16:, 16:].any() and not out[5, 7:, 16:, 16:].any()


def test_overlap_fraction_threshold() -> None:
    m = _stack(3)
    m[0, 0:10, 0:10, 0:10] = True
    m[1, 0:10, 0:10, 9:19] = True  # overlap 100 of 1000 voxels = 0.1; IoU 100 / 1900
    m[2, 0:10, 0:10, 0:10] = True
    for match, threshold, kept in (("overlap", 0.1, True), ("overlap", 0.11, False), ("iou", 0.05, True),
                                   ("iou", 0.06, False)):
        params = TemporalParams(min_phases=3, min_overlap=threshold, match=match,  # type: ignore[arg-type]
                                circular=False)
        out, _ = temporal_filter(m, params)
        assert out.sum() == (m.sum() if kept else 0), (match, threshold)


def test_iou_rejects_a_speck_on_the_path_of_a_moving_structure() -> None:
    # a speck next to a moving block in phase 2 lies where the block is in phase 3: the overlap fraction
    # (|A & B| / min) matches it to the block, IoU does not
    m = _stack(6)
    for p in range(6):
        m[p, 2:8, 4 + 2 * p:10 + 2 * p, 4:10] = True
    m[2, 4:6, 15:17, 6:8] = True  # 2 voxels beyond the block's edge in phase 2, inside it in phase 3
    assert not m[2, :, 14, :].any() and m[3, 4:6, 15, 6:8].all()  # separate in phase 2, inside in phase 3
    out, _ = temporal_filter(m, TemporalParams(min_phases=3, match="overlap", circular=False))
    assert out[2, 4:6, 15:17, 6:8].all()
    out, _ = temporal_filter(m, TemporalParams(min_phases=3, match="iou", circular=False))
    assert not out[2, 4:6, 15:17, 6:8].any()
    assert out.sum() == m.sum() - 8


def test_centroid_rule_matches_fast_small_object() -> None:
    # a small object that jumps by more than its size each phase never overlaps its neighbours
    m = _stack(4)
    for p in range(4):
        _cube(m[p], 4, 2 + 5 * p, 10, 3)
    sp = (2.0, 1.0, 1.0)
    out, _ = temporal_filter(m, TemporalParams(min_phases=4), spacing=sp)
    assert not out.any()
    out, _ = temporal_filter(m, TemporalParams(min_phases=4, max_centroid_mm=5.5), spacing=sp)
    assert out.sum() == m.sum()
    out, _ = temporal_filter(m, TemporalParams(min_phases=4, max_centroid_mm=4.5), spacing=sp)
    assert not out.any()


def test_k_larger_than_phases_and_single_phase() -> None:
    m = _stack(2)
    _cube(m[0], 1, 1, 1)
    _cube(m[1], 1, 1, 1)
    _cube(m[1], 8, 18, 18, 2)
    out, rep = temporal_filter(m, TemporalParams(min_phases=3))
    assert rep.effective_min_phases == 2
    assert out[0].sum() == 64 and out[1].sum() == 64
    one = m[:1].copy()
    out, rep = temporal_filter(one, TemporalParams(min_phases=3))
    assert (out == one).all()


def test_empty_and_all_empty_phases() -> None:
    m = _stack(5)
    out, rep = temporal_filter(m)
    assert not out.any() and rep.removed == [0] * 5
    assert bounding_box(m) is None


def test_pair_overlaps_dense_and_sparse_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    a = rng.random((10, 30, 30)) > 0.7
    b = rng.random((10, 30, 30)) > 0.7
    la, na = label_components(a, 1)
    lb, nb = label_components(b, 1)
    dense = pair_overlaps(la, na, lb, nb)
    monkeypatch.setattr(labels, "_MAX_DENSE_PAIRS", 0)
    assert (na + 1) * (nb + 1) > 2 * np.count_nonzero(a & b)  # so the np.unique path runs
    sparse = pair_overlaps(la, na, lb, nb)
    key = lambda t: sorted(zip(*(x.tolist() for x in t), strict=True))  # noqa: E731
    assert key(dense) == key(sparse)
    # against a direct count for one pair
    i, j, c = dense[0][0], dense[1][0], dense[2][0]
    assert c == np.count_nonzero((la == i) & (lb == j))


def test_label_falls_back_to_int32_beyond_65535_components() -> None:
    m = np.zeros((1, 520, 520), bool)
    m[0, ::2, ::2] = True  # 67,600 isolated voxels
    labels, n = label_components(m, 3)
    assert n == 260 * 260 and labels.dtype == np.int32


def test_render_in_place_and_keep_tables() -> None:
    m = _stack(3)
    for p in range(3):
        _cube(m[p], 1, 1, 1)
    _cube(m[1], 7, 15, 15, 2)
    lab = label_phases(m, 3, workers=1)
    keep, rep = find_genuine(lab, TemporalParams(min_phases=3), workers=1)
    assert [k.sum() for k in keep] == [1, 1, 1]
    before = m.copy()
    render(lab, keep, out=m, workers=2)
    assert m.sum() == before.sum() - 8


def test_params_validation() -> None:
    with pytest.raises(ValueError):
        TemporalParams(min_phases=0)
    with pytest.raises(ValueError):
        TemporalParams(min_overlap=0.0)
    with pytest.raises(ValueError):
        TemporalParams(max_gap=-1)
    with pytest.raises(ValueError):
        TemporalParams(connectivity=4)
    with pytest.raises(ValueError):
        TemporalParams(max_centroid_mm=0)
    with pytest.raises(ValueError):
        TemporalParams(match="dice")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="phases"):
        temporal_filter(np.zeros((3, 3, 3), bool))

"""Connectivity: the largest N / all above a floor, specks dropped, holes filled per slice or in 3D."""

from __future__ import annotations

import numpy as np
import pytest

from models.post.connectivity import (
    ConnectivityParams,
    clean_mask,
    clean_phases,
    fill_holes,
    select_components,
)
from models.post.temporal import TemporalParams

SP = (2.0, 1.0, 1.0)  # 2 mm^3 voxels: 500 voxels = 1 cc


def _scene() -> np.ndarray:
    m = np.zeros((20, 40, 40), bool)
    m[2:12, 2:17, 2:17] = True  # 2250 voxels = 4.5 cc
    m[2:10, 22:35, 22:35] = True  # 1352 voxels
    m[15:17, 30:33, 2:5] = True  # 18 voxels = 0.036 cc: a speck
    return m


def test_expected_components_keeps_largest() -> None:
    out = clean_mask(_scene(), SP, ConnectivityParams(expected_components=1, min_volume_cc=0.05))
    assert out.sum() == 2250 and out[2:12, 2:17, 2:17].all()
    out = clean_mask(_scene(), SP, ConnectivityParams(expected_components=2, min_volume_cc=0.05))
    assert out.sum() == 2250 + 1352


def test_floor_drops_specks_and_keeps_the_rest() -> None:
    out = clean_mask(_scene(), SP, ConnectivityParams(expected_components=None, min_volume_cc=0.05))
    assert out.sum() == 2250 + 1352
    out = clean_mask(_scene(), SP, ConnectivityParams(expected_components=None, min_volume_cc=0.0))
    assert out.sum() == 2250 + 1352 + 18
    out = clean_mask(_scene(), SP, ConnectivityParams(expected_components=5, min_volume_cc=3.0))
    assert out.sum() == 2250  # the floor applies before the count


def test_select_components_ties_are_deterministic() -> None:
    sizes = np.array([0, 10, 10, 5])
    keep = np.ones(4, bool)
    out = select_components(sizes, keep, ConnectivityParams(expected_components=1, min_volume_cc=0), 1.0)
    assert out.tolist() == [False, True, False, False]


def test_fill_holes_3d_and_per_slice() -> None:
    m = np.zeros((9, 12, 12), bool)
    m[1:8, 1:11, 1:11] = True
    m[3:6, 4:8, 4:8] = False  # enclosed cavity
    tube = m.copy()
    tube[:, 5:7, 5:7] = False  # a channel open at the top and bottom of the volume
    assert fill_holes(m.copy(), "3d").sum() == 7 * 100
    assert fill_holes(m.copy(), "slice").sum() == 7 * 100
    assert fill_holes(m.copy(), "none").sum() == m.sum()
    filled3d = fill_holes(tube.copy(), "3d")
    assert not filled3d[:, 5:7, 5:7].any()  # open in 3D: not a hole
    filled2d = fill_holes(tube.copy(), "slice")
    assert filled2d[1:8, 5:7, 5:7].all()  # enclosed in every slice it crosses


def test_fill_holes_respects_max_size() -> None:
    m = np.zeros((8, 20, 20), bool)
    m[1:7, 1:19, 1:19] = True
    m[3, 3, 3] = False  # 1 voxel
    m[2:6, 8:14, 8:14] = False  # 144 voxels
    out = fill_holes(m.copy(), "3d", max_hole_voxels=10)
    assert out[3, 3, 3] and not out[2:6, 8:14, 8:14].any()


def test_clean_phases_reports_and_works_in_place() -> None:
    masks = np.zeros((4, 20, 40, 40), bool)
    for p in range(4):
        masks[p] = _scene()
        masks[p, 15:17, 30:33, 2:5] = False
    masks[2, 15:18, 30:36, 30:36] = True  # one-phase blob of 108 voxels (0.216 cc)
    masks[1, 16, 36, 36] = True  # a one-voxel speck
    rep = clean_phases(masks, SP, TemporalParams(min_phases=3),
                       ConnectivityParams(expected_components=1, min_volume_cc=0.05))
    assert rep.removed_temporal == [0, 1, 1, 0]
    assert rep.removed_connectivity == [1, 1, 1, 1]  # the smaller box
    assert rep.voxels == [2250] * 4
    assert masks.sum() == 4 * 2250
    d = rep.as_dict()
    assert d["effective_min_phases"] == 3 and d["components"] == [2, 3, 3, 2]


def test_clean_phases_without_temporal_keeps_sporadic() -> None:
    masks = np.zeros((3, 8, 10, 10), bool)
    masks[1, 2:6, 2:6, 2:6] = True
    rep = clean_phases(masks, SP, None, ConnectivityParams(min_volume_cc=0.0))
    assert masks.sum() == 64 and rep.removed_temporal == [0, 0, 0]


def test_clean_phases_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        clean_phases(np.zeros((3, 3, 3), bool), SP, None, ConnectivityParams())
    with pytest.raises(ValueError):
        clean_phases(np.zeros((2, 3, 3, 3), np.uint8), SP, None, ConnectivityParams())


def test_params_validation() -> None:
    with pytest.raises(ValueError):
        ConnectivityParams(expected_components=0)
    with pytest.raises(ValueError):
        ConnectivityParams(min_volume_cc=-1)
    with pytest.raises(ValueError):
        ConnectivityParams(fill_holes="2d")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ConnectivityParams(max_hole_cc=-0.1)

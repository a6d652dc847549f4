"""Dice / HD95 / MSD against hand-computed cases and an independent brute-force surface distance."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from models.metrics import compare, dice, hausdorff, hd95, msd, surface_distances


def _brute(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float]) -> tuple[float, float]:
    """Reference: surface voxels (mask minus 6-eroded mask), nearest-neighbour distances by KD-tree, mm."""
    def pts(m: np.ndarray) -> np.ndarray:
        s = m & ~ndi.binary_erosion(m, structure=ndi.generate_binary_structure(3, 1), border_value=0)
        return np.argwhere(s) * np.asarray(spacing)

    pa, pb = pts(a), pts(b)
    dab = cKDTree(pb).query(pa)[0]
    dba = cKDTree(pa).query(pb)[0]
    h = max(np.percentile(dab, 95), np.percentile(dba, 95))
    m = (dab.sum() + dba.sum()) / (dab.size + dba.size)
    return float(h), float(m)


def _sphere(shape: tuple[int, int, int], centre_mm: tuple[float, float, float], r_mm: float,
            spacing: tuple[float, float, float]) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij")
    return (zz - centre_mm[0]) ** 2 + (yy - centre_mm[1]) ** 2 + (xx - centre_mm[2]) ** 2 <= r_mm ** 2


def test_dice_basic_and_empty() -> None:
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    assert dice(a, b) == 1.0
    a[0, 0, :2] = True
    assert dice(a, b) == 0.0
    b[0, 0, 1:3] = True
    assert dice(a, b) == pytest.approx(0.5)


def test_empty_masks_defined() -> None:
    e = np.zeros((5, 5, 5), bool)
    f = e.copy()
    f[2, 2, 2] = True
    sp = (2.0, 1.0, 1.0)
    assert hd95(e, e, sp) == 0.0 and msd(e, e, sp) == 0.0
    assert hd95(e, f, sp) == math.inf and hd95(f, e, sp) == math.inf
    assert msd(f, e, sp) == math.inf
    assert compare(e, f, sp) == {"dice": 0.0, "hd95": math.inf, "msd": math.inf}
    assert compare(e, e, sp) == {"dice": 1.0, "hd95": 0.0, "msd": 0.0}


def test_single_voxels_anisotropic() -> None:
    a = np.zeros((6, 6, 10), bool)
    b = np.zeros_like(a)
    a[0, 0, 0] = True
    b[2, 3, 4] = True
    sp = (2.5, 1.0, 0.5)  # offsets 5 mm, 3 mm, 2 mm
    assert hd95(a, b, sp) == pytest.approx(math.sqrt(25 + 9 + 4))
    assert msd(a, b, sp) == pytest.approx(math.sqrt(38))
    assert hausdorff(a, b, sp) == pytest.approx(math.sqrt(38))


def test_cubes_offset_one_slice_hand_computed() -> None:
    # 4x4x4 cube and the same cube one slice higher, slices 2.5 mm, pixels 1 mm.
    # A's 56 surface voxels: bottom face (16) at 2.5 mm from B's bottom face; the 4 centre voxels of A's top
    # face are 1 mm (in-plane) from B's ring; the other 36 lie on B's surface. Symmetric for B -> A.
    a = np.zeros((8, 8, 8), bool)
    a[1:5, 2:6, 2:6] = True
    b = np.roll(a, 1, axis=0)
    sp = (2.5, 1.0, 1.0)
    d_ab, d_ba = surface_distances(a, b, sp)
    assert sorted(d_ab.tolist()) == [0.0] * 36 + [1.0] * 4 + [2.5] * 16
    assert sorted(d_ba.tolist()) == [0.0] * 36 + [1.0] * 4 + [2.5] * 16
    assert dice(a, b) == pytest.approx(0.75)
    assert hd95(a, b, sp) == pytest.approx(2.5)
    assert msd(a, b, sp) == pytest.approx(44 / 56)


def test_cubes_offset_in_x_uses_dx() -> None:
    a = np.zeros((10, 10, 12), bool)
    a[2:7, 2:7, 2:7] = True
    b = np.roll(a, 3, axis=2)  # 3 columns of 0.7 mm
    sp = (3.0, 0.8, 0.7)
    h, m = _brute(a, b, sp)
    assert hd95(a, b, sp) == pytest.approx(h)
    assert msd(a, b, sp) == pytest.approx(m)
    assert hausdorff(a, b, sp) == pytest.approx(2.1)  # far face to far face: 3 x 0.7 mm


def test_sphere_vs_shifted_sphere() -> None:
    sp = (2.0, 0.9, 0.9)
    shape = (24, 48, 48)
    a = _sphere(shape, (22.0, 21.0, 21.0), 12.0, sp)
    b = _sphere(shape, (28.0, 21.0, 21.0), 12.0, sp)  # 6 mm shift along z = 3 slices
    h, m = _brute(a, b, sp)
    assert hd95(a, b, sp) == pytest.approx(h)
    assert msd(a, b, sp) == pytest.approx(m)
    # the poles move by the full shift; the equator barely moves
    assert 3.0 <= hd95(a, b, sp) <= 6.0 + 1e-9
    assert hausdorff(a, b, sp) == pytest.approx(6.0, abs=0.9)
    assert hd95(a, b, sp) == pytest.approx(hd95(b, a, sp))


def test_crop_keeps_border_voxels_as_surface() -> None:
    # a mask filling the whole array: every border voxel is surface (erosion with a background border)
    a = np.ones((3, 5, 5), bool)
    b = a.copy()
    b[:, :, 4] = False
    sp = (1.0, 1.0, 1.0)
    h, m = _brute(a, b, sp)
    assert hd95(a, b, sp) == pytest.approx(h)
    assert msd(a, b, sp) == pytest.approx(m)


def test_identical_masks_zero_distance() -> None:
    sp = (2.5, 1.0, 1.0)
    a = _sphere((12, 20, 20), (15.0, 10.0, 10.0), 7.0, sp)
    assert hd95(a, a, sp) == 0.0 and msd(a, a, sp) == 0.0 and dice(a, a) == 1.0
    json.dumps(compare(a, a, sp), allow_nan=False)


def test_input_validation() -> None:
    a = np.zeros((3, 3, 3), bool)
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, np.zeros((3, 3, 4), bool))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        hd95(a, a, (1.0, 0.0, 1.0))

"""Pixel-edge contour tracing (service/dicomio/contours.py): exact round trip through a centre-sampling
rasteriser."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import polygon

from service.dicomio.contours import mask_to_contours, signed_area, trace_loops


def xor_rasterise(loops: list[np.ndarray], shape: tuple[int, int], union: bool = False) -> np.ndarray:
    """Even-odd (``union``: OR, plastimatch's default) combination of loops, sampling pixel centres."""
    out = np.zeros(shape, dtype=bool)
    for loop in loops:
        rr, cc = polygon(loop[:, 0], loop[:, 1], shape)
        filled = np.zeros(shape, dtype=bool)
        filled[rr, cc] = True
        out = out | filled if union else out ^ filled
    return out


def test_empty_mask_gives_no_loop() -> None:
    assert trace_loops(np.zeros((5, 7), bool)) == []


def test_single_voxel_is_a_unit_square_on_its_edges() -> None:
    m = np.zeros((5, 5), bool)
    m[2, 3] = True
    (loop,) = trace_loops(m)
    assert sorted(map(tuple, loop.tolist())) == [(1.5, 2.5), (1.5, 3.5), (2.5, 2.5), (2.5, 3.5)]
    assert signed_area(loop) == pytest.approx(1.0)


def test_rectangle_collinear_points_removed() -> None:
    m = np.zeros((20, 30), bool)
    m[3:15, 4:25] = True
    (loop,) = trace_loops(m)
    assert len(loop) == 4
    assert signed_area(loop) == pytest.approx(m.sum())


def test_hole_is_a_separate_inner_loop() -> None:
    m = np.zeros((20, 20), bool)
    m[2:18, 2:18] = True
    m[6:12, 7:14] = False
    loops = trace_loops(m)
    assert len(loops) == 2
    areas = sorted(signed_area(lp) for lp in loops)
    assert areas == pytest.approx([-42.0, 256.0])
    assert (xor_rasterise(loops, m.shape) == m).all()


def test_islands_and_island_inside_a_hole() -> None:
    m = np.zeros((30, 30), bool)
    m[1:5, 1:5] = True  # island 1
    m[10:28, 10:28] = True  # ring ...
    m[13:25, 13:25] = False  # ... with a hole
    m[18:20, 18:20] = True  # island inside the hole
    loops = trace_loops(m)
    assert len(loops) == 4
    assert sum(signed_area(lp) < 0 for lp in loops) == 1
    assert (xor_rasterise(loops, m.shape) == m).all()


def test_diagonal_neighbours_are_separate_loops_that_do_not_cross() -> None:
    m = np.zeros((6, 6), bool)
    m[2, 2] = m[3, 3] = True
    loops = trace_loops(m)
    assert len(loops) == 2
    assert all(signed_area(lp) == pytest.approx(1.0) for lp in loops)
    assert (xor_rasterise(loops, m.shape) == m).all()


def test_random_masks_round_trip_exactly() -> None:
    rng = np.random.default_rng(1234)
    for _ in range(150):
        shape = (int(rng.integers(1, 25)), int(rng.integers(1, 25)))
        m = rng.random(shape) < rng.random()
        loops = trace_loops(m)
        for lp in loops:  # axis-aligned edges only, vertices on pixel corners
            d = np.diff(np.vstack([lp, lp[:1]]), axis=0)
            assert ((d[:, 0] == 0) ^ (d[:, 1] == 0)).all()
            assert np.allclose(np.mod(lp, 1.0), 0.5)
        assert (xor_rasterise(loops, shape) == m).all()


def test_keyhole_joins_each_hole_to_its_outer_loop() -> None:
    m = np.zeros((30, 30), bool)
    m[10:28, 10:28] = True
    m[13:17, 13:25] = False  # two holes ...
    m[19:25, 13:18] = False
    m[21:23, 15:17] = True  # ... one with an island inside
    loops = trace_loops(m, keyhole=True)
    assert len(loops) == 2  # the ring with both holes cut in, and the island
    assert all(signed_area(lp) > 0 for lp in loops)
    assert (xor_rasterise(loops, m.shape, union=True) == m).all()
    assert (xor_rasterise(loops, m.shape) == m).all()


def test_keyhole_random_masks_round_trip_under_or_and_xor() -> None:
    rng = np.random.default_rng(99)
    joined = 0
    for _ in range(300):
        shape = (int(rng.integers(1, 30)), int(rng.integers(1, 30)))
        m = rng.random(shape) < rng.random()
        loops = trace_loops(m, keyhole=True)
        joined += len(trace_loops(m)) - len(loops)
        assert all(signed_area(lp) > 0 for lp in loops)
        assert (xor_rasterise(loops, shape, union=True) == m).all()
        assert (xor_rasterise(loops, shape) == m).all()
    assert joined > 100  # the random masks did have holes


def test_patient_coordinates_use_row_and_column_spacing() -> None:
    m = np.zeros((3, 10, 12), bool)
    m[1, 4, 7] = True  # slice 1, row (y) 4, column (x) 7
    positions = [(-50.0, -80.0, 10.0 + 2.5 * k) for k in range(3)]
    (c,) = mask_to_contours(m, positions, pixel_spacing=(0.8, 1.2))
    assert c.slice_index == 1 and not c.is_hole
    xs, ys, zs = c.points.T
    assert np.allclose(sorted(set(np.round(xs, 6))), [-50.0 + 6.5 * 1.2, -50.0 + 7.5 * 1.2])
    assert np.allclose(sorted(set(np.round(ys, 6))), [-80.0 + 3.5 * 0.8, -80.0 + 4.5 * 0.8])
    assert np.allclose(zs, 12.5)


def test_mask_to_contours_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="slice positions"):
        mask_to_contours(np.zeros((3, 4, 4), bool), [(0, 0, 0)], (1.0, 1.0))
    with pytest.raises(ValueError, match="Z, Y, X"):
        mask_to_contours(np.zeros((4, 4), bool), [(0, 0, 0)], (1.0, 1.0))

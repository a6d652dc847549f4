"""The all-slices-at-once tracer (service/dicomio/contours.py) gives exactly the contours of the
slice-by-slice tracer
it replaced (contours_previous.py, kept verbatim): same loops, same order, same first vertex, same floats."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from scipy import ndimage

from service.dicomio import contours
from tests.support import contours_previous as previous

ORIENTATIONS = [
    (1, 0, 0, 0, 1, 0),
    (-1, 0, 0, 0, -1, 0),
    (0.6, 0.8, 0, 0, 0, -1),
    (0.8, 0.6, 0, -0.6, 0.8, 0),  # rotated in plane
]


def masks(seed: int, n: int) -> Iterator[np.ndarray]:
    """(Z, Y, X) masks: random noise, smooth blobs with holes and islands in holes, masks touching the edges
    with empty slices, single voxels, checkerboards (every corner a saddle), rings nested in holes."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        z, y, x = int(rng.integers(1, 6)), int(rng.integers(1, 50)), int(rng.integers(1, 50))
        kind = k % 6
        if kind == 0:
            m = rng.random((z, y, x)) < rng.random()
        elif kind == 1:
            f = ndimage.gaussian_filter(rng.random((z, y, x)), (0, 2, 2))
            m = (f > np.quantile(f, 0.3)) & ~(f > np.quantile(f, rng.uniform(0.7, 0.95)))
        elif kind == 2:
            m = rng.random((z, y, x)) < 0.75
            m[rng.random(z) < 0.4] = False
        elif kind == 3:
            m = np.zeros((z, y, x), bool)
            m[rng.integers(0, z, 6), rng.integers(0, y, 6), rng.integers(0, x, 6)] = True
        elif kind == 4:
            m = (np.add.outer(np.arange(y), np.arange(x)) % 2 == 0)[None].repeat(z, 0)
            m &= rng.random((z, y, x)) < 0.9
        else:
            yy, xx = np.mgrid[:y, :x]
            d = np.hypot(yy - y / 2, xx - x / 2)
            m = ((d // 3) % 2 == 0)[None].repeat(z, 0)  # concentric rings: holes with islands with holes
            m ^= rng.random((z, y, x)) < 0.05
        yield m


def assert_same(old: list, new: list) -> None:
    assert len(new) == len(old)
    for a, b in zip(old, new, strict=True):
        assert (b.slice_index, b.is_hole) == (a.slice_index, a.is_hole)
        assert b.points.shape == a.points.shape
        assert np.array_equal(b.points, a.points)  # bit for bit


@pytest.mark.parametrize("keyhole", [False, True])
def test_mask_to_contours_equals_the_previous_tracer(keyhole: bool) -> None:
    for k, m in enumerate(masks(2024, 300)):
        positions = [(-249.8 + 0.1 * z, -80.7, 10.0 + 2.5 * z) for z in range(m.shape[0])]
        spacing = (0.9765625, 1.2)
        iop = ORIENTATIONS[k % len(ORIENTATIONS)]
        assert_same(
            previous.mask_to_contours(m, positions, spacing, iop, keyhole=keyhole),
            contours.mask_to_contours(m, positions, spacing, iop, keyhole=keyhole),
        )


@pytest.mark.parametrize("keyhole", [False, True])
def test_trace_loops_equals_the_previous_tracer_on_small_noise(keyhole: bool) -> None:
    rng = np.random.default_rng(99)
    joined = 0
    for _ in range(3000):
        m = rng.random((int(rng.integers(1, 12)), int(rng.integers(1, 12)))) < rng.random()
        old, new = previous.trace_loops(m, keyhole=keyhole), contours.trace_loops(m, keyhole=keyhole)
        assert len(new) == len(old)
        assert all(np.array_equal(a, b) for a, b in zip(old, new, strict=True))
        joined += len(previous.trace_loops(m)) - len(old)
    assert joined > 100 if keyhole else joined == 0  # many holes were joined


def test_channels_through_split_runs_and_replaced_turns() -> None:
    """Holes whose channels end on one rightward run, one of them at the run's left turn (found by search)."""
    m = np.array(
        [
            [0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 1, 0, 0, 0, 0],
            [0, 1, 1, 0, 1, 1, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 1, 1, 1, 0, 0, 0],
            [1, 0, 0, 0, 1, 0, 1, 1, 0, 0],
            [1, 0, 0, 1, 1, 0, 0, 1, 1, 0],
            [1, 0, 0, 1, 0, 0, 0, 0, 1, 0],
            [1, 0, 0, 1, 0, 0, 0, 0, 1, 0],
            [1, 0, 0, 1, 0, 0, 0, 0, 1, 0],
            [1, 0, 0, 1, 1, 0, 0, 0, 1, 1],
            [1, 0, 0, 0, 1, 0, 0, 0, 0, 1],
            [1, 0, 0, 0, 1, 1, 1, 0, 0, 1],
            [1, 1, 1, 1, 1, 0, 1, 1, 1, 1],
        ],
        bool,
    )
    old, new = previous.trace_loops(m, keyhole=True), contours.trace_loops(m, keyhole=True)
    assert len(new) == len(old) == 1
    assert np.array_equal(old[0], new[0])


def test_full_slices_and_empty_masks() -> None:
    for m in (np.ones((3, 7, 9), bool), np.zeros((3, 7, 9), bool), np.zeros((0, 4, 4), bool)):
        positions = [(0.0, 0.0, float(z)) for z in range(m.shape[0])]
        assert_same(previous.mask_to_contours(m, positions, (1.0, 1.0)) if m.shape[0] else [],
                    contours.mask_to_contours(m, positions, (1.0, 1.0)))

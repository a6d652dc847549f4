"""models.threshold.threshold_body gives exactly what the previous implementation gave (threshold_previous).

The rewrite works inside the bounding box of the in-range voxels, sizes components with one bincount, tests
only the candidates for couch shape and runs phases on threads; none of that may change a voxel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from models.phantom import make_phantom
from models.phantom_spec import PhantomSpec
from models.threshold import threshold_body
from tests.support.threshold_previous import threshold_body as previous


@pytest.fixture(scope="module")
def phantom() -> Any:
    return make_phantom(PhantomSpec.sized(rows=128, slices=16, n_phases=3, slice_thickness=5.0, arms=True))


def _ys(phantom: Any) -> np.ndarray:
    return phantom.origin[1] + phantom.spacing[1] * np.arange(phantom.shape[2])


def _same(hu: np.ndarray, spacing: Any, **kw: Any) -> np.ndarray:
    new = threshold_body(hu, spacing, **kw)
    old = previous(hu, spacing, **kw)
    assert new.dtype == old.dtype == bool and new.shape == old.shape
    assert np.array_equal(new, old)
    return new


def test_phantom_phases_identical(phantom: Any) -> None:
    out = _same(phantom.hu, phantom.spacing)
    assert out.any()
    _same(phantom.hu, phantom.spacing, hu_range=(-200.0, 3000.0))
    _same(phantom.hu.astype(np.float32), phantom.spacing, hu_range=(-350.5, 2999.5))


def test_couch_straps_and_opening_identical(phantom: Any) -> None:
    hu = phantom.hu[0].copy()
    ys = _ys(phantom)
    couch = (ys > 125) & (ys < 137)
    hu[:, couch, 5:-5] = 300
    rows = np.flatnonzero((ys > 95) & (ys <= 125))
    hu[:, rows[0] : rows[-1] + 1, hu.shape[2] // 2] = 300  # a strap joining the couch to the back
    _same(hu, phantom.spacing)
    _same(hu, phantom.spacing, bridge_mm=phantom.spacing[1] * 1.2)
    _same(hu, phantom.spacing, couch_thickness_mm=0)


def test_touching_the_image_edge_and_many_parts(phantom: Any) -> None:
    hu = phantom.hu[0].copy()
    hu[:, :, :4] = 100  # tissue along the left edge: the box reaches the border
    hu[:, 0, :] = 100  # and along the top row, with background holes enclosed against the edge
    hu[:, 0, 20:30] = -1000
    rng = np.random.default_rng(0)
    for _ in range(12):  # many separate parts above the size floor (more than the few tested directly)
        z, y, x = rng.integers(2, 12), rng.integers(10, 110), rng.integers(10, 110)
        hu[z - 2 : z + 2, y - 3 : y + 3, x - 3 : x + 3] = 200
    _same(hu, phantom.spacing, min_part_cc=0.1, min_part_fraction=0.0)
    _same(hu, phantom.spacing)


def test_empty_and_out_of_dtype_ranges() -> None:
    hu = np.full((3, 10, 12), -1000, np.int16)
    _same(hu, (1.0, 1.0, 1.0))
    _same(hu, (1.0, 1.0, 1.0), hu_range=(40000.0, 50000.0))
    hu[1, 3:7, 4:9] = 0
    _same(hu, (1.0, 1.0, 1.0), hu_range=(-40000.0, 40000.0), min_part_cc=0.001)
    _same(hu, (1.0, 1.0, 1.0), hu_range=(-np.inf, np.inf), min_part_cc=0.001)

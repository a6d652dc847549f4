"""models.threshold: temporaries reused from one call to the next (ScratchPool) never change a voxel, whatever
the earlier calls left in them (bigger or smaller boxes, other ranges, couch and opening paths), and ``out``
receives exactly the returned mask."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from models.phantom import make_phantom
from models.phantom_spec import PhantomSpec
from models.threshold import ScratchPool, threshold_body
from tests.support.threshold_previous import threshold_body as previous


@pytest.fixture(scope="module")
def phantom() -> Any:
    return make_phantom(PhantomSpec.sized(rows=128, slices=16, n_phases=3, slice_thickness=5.0, arms=True))


def _cases(phantom: Any) -> list[tuple[np.ndarray, dict[str, Any]]]:
    sp = phantom.spacing
    ys = phantom.origin[1] + sp[1] * np.arange(phantom.shape[2])
    couch = phantom.hu[1].copy()
    couch[:, (ys > 125) & (ys < 137), 5:-5] = 300  # a wider box, and a component that is dropped
    small = np.full((5, 40, 40), -1000, np.int16)  # a smaller volume after bigger ones
    small[1:4, 10:30, 12:28] = 40
    small[2, 18:22, 18:22] = -1000  # an enclosed hole
    edge = phantom.hu[2].copy()
    edge[:, :, :4] = 100  # the box reaches the image border
    return [
        (couch, {}),
        (phantom.hu[0], {}),
        (small, {"min_part_cc": 0.1}),
        (couch, {"bridge_mm": sp[1] * 1.2}),
        (edge, {"min_part_cc": 0.1, "min_part_fraction": 0.0}),
        (phantom.hu[0], {"hu_range": (-200.0, 3000.0)}),
        (np.full((3, 10, 12), -1000, np.int16), {}),
        (small, {"couch_thickness_mm": 0.0, "min_part_cc": 0.1}),
        (phantom.hu, {}),  # all phases, on threads, sharing the pool
    ]


def test_reused_scratch_gives_what_fresh_arrays_give(phantom: Any) -> None:
    pool = ScratchPool()
    for _ in range(2):  # the second round starts with every buffer dirty
        found = 0
        for hu, kw in _cases(phantom):
            sp = phantom.spacing if hu.shape[-2:] == phantom.hu.shape[-2:] else (2.0, 1.0, 1.0)
            got = threshold_body(hu, sp, scratch=pool, **kw)
            assert np.array_equal(got, previous(hu, sp, **kw))
            found += bool(got.any())
        assert found == len(_cases(phantom)) - 1  # all but the empty volume find a body


def test_out_is_filled_and_returned(phantom: Any) -> None:
    hu = phantom.hu
    out = np.ones(hu.shape, dtype=bool)  # stale content must not survive
    got = threshold_body(hu[1], phantom.spacing, out=out[1], scratch=ScratchPool())
    assert np.shares_memory(got, out) and np.array_equal(out[1], previous(hu[1], phantom.spacing))
    assert out[0].all() and out[2].all()  # only the slot asked for
    with pytest.raises(ValueError, match="out must be bool"):
        threshold_body(hu[1], phantom.spacing, out=np.zeros(hu.shape[1:], dtype=np.uint8))

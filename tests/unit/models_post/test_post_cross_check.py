"""Cross-check: the vectorised rules equal the per-component implementation of
tests/support/postprocess_reference.py (the naive peer of bench/postprocess.py).

Random scenes (moving blobs, sporadic specks, dropped phases) under several parameter sets; the two
implementations share no code beyond scipy.ndimage.label.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.post.connectivity import ConnectivityParams, clean_phases
from models.post.temporal import TemporalParams
from tests.support.postprocess_reference import naive_clean


def _scene(rng: np.random.Generator, n_phases: int) -> np.ndarray:
    shape = (n_phases, 10, 28, 28)
    m = np.zeros(shape, bool)
    for _ in range(3):  # persistent, moving blobs, sometimes dropped in a phase
        z, y, x = rng.integers(1, 6), rng.integers(2, 18), rng.integers(2, 18)
        s = int(rng.integers(3, 7))
        drop = int(rng.integers(n_phases)) if rng.random() < 0.5 else -1
        for p in range(n_phases):
            if p != drop:
                dy = int(round(2 * np.sin(2 * np.pi * p / n_phases)))
                m[p, z:z + s // 2 + 2, y + dy:y + dy + s, x:x + s] = True
    m |= rng.random(shape) < 0.004  # sporadic specks
    for _ in range(int(rng.integers(0, 4))):  # short-lived blobs of 1-3 phases
        p0, length = int(rng.integers(n_phases)), int(rng.integers(1, 4))
        z, y, x = rng.integers(0, 8), rng.integers(0, 24), rng.integers(0, 24)
        for p in range(p0, p0 + length):
            m[p % n_phases, z:z + 2, y:y + 3, x:x + 3] = True
    return m


PARAMS = [
    (TemporalParams(min_phases=3), ConnectivityParams(None, 0.0, "3d")),
    (TemporalParams(min_phases=2, max_gap=0), ConnectivityParams(2, 0.01, "slice")),
    (TemporalParams(min_phases=4, max_gap=2, circular=False), ConnectivityParams(None, 0.0, "none")),
    (TemporalParams(min_phases=3, min_overlap=0.5, connectivity=1), ConnectivityParams(1, 0.0, "3d", 0.01)),
    (None, ConnectivityParams(3, 0.005, "3d")),
    (TemporalParams(min_phases=5, max_gap=2), ConnectivityParams(None, 0.0, "3d")),
    (TemporalParams(min_phases=3, match="overlap"), ConnectivityParams(None, 0.0, "3d")),
]


@pytest.mark.parametrize("case", range(len(PARAMS)))
@pytest.mark.parametrize("n_phases", [4, 7, 10])
def test_vectorised_equals_naive(case: int, n_phases: int) -> None:
    temporal, conn = PARAMS[case]
    rng = np.random.default_rng(100 * case + n_phases)
    sp = (2.0, 1.0, 1.0)
    for _ in range(3):
        m = _scene(rng, n_phases)
        ours, theirs = m.copy(), m.copy()
        clean_phases(ours, sp, temporal, conn, workers=2)
        naive_clean(theirs, sp, temporal, conn)
        assert np.array_equal(ours, theirs)
        assert ours.sum() <= m.sum() or conn.fill_holes != "none"

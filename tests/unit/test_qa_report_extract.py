"""The QA report's slice choice (worker/qa_report.py): the centroid voxel and the zoom box come from the
mask's projections and equal what the voxel list (``np.nonzero``) gives, on masks of every shape and size."""

from __future__ import annotations

import numpy as np
import pytest

from worker.qa_report import _centroid_index, _zoom_crop


def _centroid_by_voxels(mask: np.ndarray) -> tuple[int, ...] | None:
    idx = np.nonzero(mask)
    if not idx[0].size:
        return None
    return tuple(int(round(float(np.mean(a)))) for a in idx)


def _zoom_by_voxels(
    mask: np.ndarray, spacing: tuple[float, float, float], margin_mm: float
) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    out = []
    for axis in range(3):
        pad = int(np.ceil(margin_mm / spacing[axis]))
        lo, hi = int(idx[axis].min()) - pad, int(idx[axis].max()) + pad + 1
        out.append(slice(max(0, lo), min(mask.shape[axis], hi)))
    return tuple(out)


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(14)
    out = []
    for shape in ((1, 1, 1), (3, 5, 7), (20, 33, 17), (40, 64, 64)):
        for p in (0.001, 0.05, 0.5, 0.97):
            out.append(rng.random(shape) < p)
    zz, yy, xx = np.mgrid[:40, :64, :64]
    out.append((zz - 11.5) ** 2 + (yy - 40.5) ** 2 + (xx - 7.5) ** 2 < 30)  # halves: rounding ties
    out.append(np.zeros((8, 8, 8), dtype=bool))
    one = np.zeros((8, 9, 10), dtype=bool)
    one[7, 0, 9] = True
    out.append(one)
    return out


@pytest.mark.parametrize("mask", _masks(), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_centroid_equals_mean_of_voxel_indices(mask: np.ndarray) -> None:
    assert _centroid_index(mask) == _centroid_by_voxels(mask)


@pytest.mark.parametrize("mask", [m for m in _masks() if m.any()], ids=lambda m: f"{m.shape}-{int(m.sum())}")
@pytest.mark.parametrize("margin", [0.0, 3.0, 30.0])
def test_zoom_box_equals_voxel_bounds(mask: np.ndarray, margin: float) -> None:
    spacing = (2.5, 0.9765625, 1.2)
    assert _zoom_crop(mask, spacing, margin) == _zoom_by_voxels(mask, spacing, margin)

"""Fixtures for the RTSTRUCT tests: a 10-phase phantom (24 x 128 x 128, 2 mm pixels, 8 mm tumour) read back
and written in both layouts. Peer helpers live in tests/support/rtstruct_peers.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rtstruct_study import Study, build, identifiers_of

PHANTOM_10 = dict(
    n_phases=10, shape=(24, 128, 128), pixel_spacing=(2.0, 2.0), slice_thickness=2.0, tumour_radius_mm=8.0
)


@pytest.fixture(scope="session")
def study10(phantom_dicom_factory: Callable[..., Any]) -> Study:
    from models.phantom_truth import load_ground_truth
    from service.dicomio.volume import read_geometry, read_phases

    series = phantom_dicom_factory("siemens", with_avg=True, with_mip=True, **PHANTOM_10)
    hu, geoms = read_phases([s.files for s in series.phases])
    refs = {s.kind: read_geometry(s.files) for s in series.references}
    return Study(
        series,
        load_ground_truth(series.ground_truth_dir),
        hu,
        geoms,
        refs,
        identifiers_of(series.phases[0].files[0]),
    )


@pytest.fixture(scope="session")
def written(study10: Study, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    from service.dicomio.rtstruct import write_rtstruct

    out = {}
    for layout in ("combined", "per-series"):
        d = tmp_path_factory.mktemp(f"rs_{layout}")
        out[layout] = [write_rtstruct(ds, d) for ds in build(study10, layout)]
    return out

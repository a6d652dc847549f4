"""Fixtures for the RTSTRUCT tests: a 10-phase phantom (24 x 128 x 128, 2 mm pixels, 8 mm tumour) read back
and written in both layouts. Peer helpers live in rtstruct_peers.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from service.manifest import IDENTIFIER_KEYS

PHANTOM_10 = dict(
    n_phases=10, shape=(24, 128, 128), pixel_spacing=(2.0, 2.0), slice_thickness=2.0, tumour_radius_mm=8.0
)


@dataclass
class Study:
    series: Any  # PhantomSeries
    gt: Any  # GroundTruth
    hu: np.ndarray
    geometries: list[Any]
    references: dict[str, Any]
    identifiers: dict[str, str]


def identifiers_of(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {k: str(ds.get(k, "") or "") for k in IDENTIFIER_KEYS}


@pytest.fixture(scope="session")
def study10(phantom_dicom_factory: Callable[..., Any]) -> Study:
    from models.phantom import load_ground_truth
    from service.volume import read_geometry, read_phases

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


def build(study: Study, layout: str, **kw: Any) -> list[Any]:
    from service.rtstruct import Algorithm, build_rtstructs, styles_from_settings
    from service.settings import default_structures

    args: dict[str, Any] = dict(
        study_key="0123456789abcdef",
        identifiers=study.identifiers,
        geometries=study.geometries,
        phase_percents=study.gt.phase_percents,
        masks=study.gt.masks,
        envelopes={"ITV": study.gt.itv},
        styles=styles_from_settings(default_structures()),
        algorithm=Algorithm("SAM 3", "test-random-init", "lora-test-1"),
        layout=layout,
        references=study.references,
    )
    args.update(kw)
    return build_rtstructs(**args)


@pytest.fixture(scope="session")
def written(study10: Study, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    from service.rtstruct import write_rtstruct

    out = {}
    for layout in ("combined", "per-series"):
        d = tmp_path_factory.mktemp(f"rs_{layout}")
        out[layout] = [write_rtstruct(ds, d) for ds in build(study10, layout)]
    return out

"""The RTSTRUCT tests' study (phantom read back) and the builder call they share.

Test modules import these from here, never from conftest.py: several test folders have a conftest.py, and
which one ``import conftest`` finds depends on the collection order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from service.store.manifest import IDENTIFIER_KEYS


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


def build(study: Study, layout: str, **kw: Any) -> list[Any]:
    from models.structures import default_structures
    from service.dicomio.output import Algorithm
    from service.dicomio.rtstruct import build_rtstructs
    from worker.engine_settings import EngineConfig, roi_styles

    args: dict[str, Any] = dict(
        study_key="0123456789abcdef",
        identifiers=study.identifiers,
        geometries=study.geometries,
        phase_percents=study.gt.phase_percents,
        masks=study.gt.masks,
        envelopes={"ITV": study.gt.itv},
        styles=roi_styles(EngineConfig(structures=tuple(default_structures()))),
        algorithm=Algorithm("SAM 3", "test-random-init", "lora-test-1"),
        layout=layout,
        references=study.references,
    )
    args.update(kw)
    return build_rtstructs(**args)

"""Fixtures of the pipeline tests: a small phantom received into a real spool and assembled."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def assemble(data_dir: Path, files: list[Path], expected_phases: int) -> str:
    """Store ``files`` into ``data_dir``'s spool and run the assembler once; returns the study key."""
    from service.intake.assembler import Assembler
    from service.store.header_scan import meta_from_bytes
    from service.store.manifest import iter_manifests
    from service.store.spool import Spool

    spool = Spool(data_dir / "spool", fsync=False)
    try:
        for f in files:
            encoded = f.read_bytes()
            spool.store(meta_from_bytes(encoded), encoded)
        Assembler(spool, data_dir, None, quiet_period=0.0, expected_phases=expected_phases,
                  settle=0.0).poll_once(time.time() + 1.0)
    finally:
        spool.close()
    ((_, m),) = list(iter_manifests(data_dir))
    assert m.state == "complete", m.reason
    return m.study_key


@pytest.fixture
def assembled(tmp_path: Path, phantom_dicom_factory: Callable[..., Any]) -> tuple[Path, str, Any]:
    """(data_dir, study_key, phantom series): 4 phases x 24 x 96 x 96 with an AVG series, state complete."""
    series = phantom_dicom_factory("siemens", with_avg=True)
    data_dir = tmp_path / "data"
    key = assemble(data_dir, series.all_files(), expected_phases=len(series.phases))
    return data_dir, key, series


@pytest.fixture(scope="module")
def tiny() -> Any:
    """The random-init tiny SAM 3 as the worker holds it (tests.support.tiny_runs)."""
    from tests.support.tiny_runs import tiny_segmenter

    return tiny_segmenter()

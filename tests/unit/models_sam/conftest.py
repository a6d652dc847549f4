"""Fixtures for the SAM 3 side of the engine: a tiny random-initialised model, on disk and in memory."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model + processor + tokenizer written in HF format (what the real loader reads)."""
    from models.sam3.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_sam3"), seed=0)


@pytest.fixture()
def hu_slices():
    """Six 64 x 60 slices (non-square on purpose) of a body-like disc with lungs, in HU."""
    import numpy as np

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:60]
    body = ((yy - 32) / 28) ** 2 + ((xx - 30) / 26) ** 2 <= 1
    lungs = (((yy - 30) / 14) ** 2 + ((np.abs(xx - 30) - 11) / 7) ** 2) <= 1
    hu = np.full((64, 60), -1000.0)
    hu[body] = 40.0
    hu[lungs] = -850.0
    vol = np.stack([hu + rng.normal(0, 20, hu.shape) for _ in range(6)])
    return vol.astype(np.int16)

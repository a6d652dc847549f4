"""Runs of the pipeline with the random-init tiny SAM 3, shared by tests and bench/split.py: every SAM 3
score kept (``score_threshold: 0``) so that the random model paints masks and comparisons mean something, and
a fixed clock for byte-for-byte RTSTRUCT comparisons."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from service.settings import load_settings
from worker.engine_settings import EngineConfig, LoadedSegmenter, engine_config


def every_score_kept(config: EngineConfig) -> EngineConfig:
    structures = tuple(dataclasses.replace(s, score_threshold=0.0) if s.method == "sam3" else s
                       for s in config.structures)
    return dataclasses.replace(config, structures=structures)


def tiny_config() -> EngineConfig:
    """The default engine configuration without model directories, every SAM 3 score kept."""
    return every_score_kept(engine_config(load_settings(sam3_dir=None, adapter_dir=None)))


def every_score_structures() -> list[dict[str, Any]]:
    """The default ``structures`` setting with every SAM 3 score kept, for a node's YAML configuration."""
    from service.structure_settings import default_structures

    return [s.model_dump() | ({"score_threshold": 0.0} if s.method == "sam3" else {})
            for s in default_structures()]


def tiny_segmenter() -> LoadedSegmenter:
    from models.sam3.tiny import build_tiny_segmenter

    return LoadedSegmenter(build_tiny_segmenter(seed=0), version_info={"model": "SAM 3 tiny", "version": "0"})


class FixedNow(datetime):
    """``datetime`` whose ``now`` is fixed: patched into service.dicomio.rtstruct, the only clock it reads."""

    @classmethod
    def now(cls, tz: Any = None) -> FixedNow:  # type: ignore[override]
        return cls(2026, 1, 2, 3, 4, 5, tzinfo=tz)

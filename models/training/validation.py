"""Validation of a training run: 3D Dice per target of the model being trained, at the inference rule
(models.sam3.inference: windows, score threshold, probability 0.5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.sam3.inference import Sam3Segmenter
from models.sam3.windowing import Window
from models.training.config import TrainConfig
from models.training.dataset import AnnotatedVolume, Target


def validation_dice(
    model: Any,
    processor: Any,
    volumes: Sequence[AnnotatedVolume],
    targets: Sequence[Target],
    *,
    device: torch.device,
    config: TrainConfig,
    windows: Sequence[Window],
    identity: dict[str, Any],
) -> dict[str, float]:
    """Dice per target (mean over ``volumes``) and ``mean`` over targets; {} without volumes. Leaves the model
    in training mode."""
    from models.metrics import dice

    if not volumes:
        return {}
    seg = Sam3Segmenter(
        model,
        processor,
        device=device,
        dtype=torch.bfloat16 if config.amp and device.type == "cuda" else torch.float32,
        batch_size=config.batch_size,
        windows=windows,
        score_threshold=config.score_threshold,
        identity=identity,
    )
    try:
        scores: dict[str, list[float]] = {t.name: [] for t in targets}
        for vol in volumes:
            probs = seg.predict(np.asarray(vol.hu), [t.prompt for t in targets])
            for t in targets:
                scores[t.name].append(dice(probs[t.prompt] >= 0.5, t.mask_of(vol)))
    finally:
        model.train()
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    out["mean"] = float(np.mean(list(out.values())))
    return out

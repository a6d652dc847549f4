"""What a training run is told (:class:`TrainConfig`) and the LoRA it puts on the model: the peft config
comes from the one builder, ``models.sam3.lora.lora_config``, so the bench counts what training trains."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from models.sam3.lora import DEFAULT_COMPONENTS, DEFAULT_TARGETS, lora_config, lora_report
from models.training.losses import LossWeights

log = logging.getLogger(__name__)

# Short names for modules trained in full (peft modules_to_save); any dotted module name also works.
TRAIN_MODULE_ALIASES: dict[str, str] = {
    "mask_embedder": "mask_decoder.mask_embedder",
    "instance_projection": "mask_decoder.instance_projection",
    "pixel_decoder": "mask_decoder.pixel_decoder",
    "presence_head": "detr_decoder.presence_head",
    "box_head": "detr_decoder.box_head",
    "scoring": "dot_product_scoring",
    "text_projection": "text_projection",
}

@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters; validated on construction. An *epoch* is ``steps_per_epoch`` optimizer steps."""

    epochs: int = 10
    steps_per_epoch: int | None = None  # None: one pass over the training samples
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_components: tuple[str, ...] = DEFAULT_COMPONENTS
    train_modules: tuple[str, ...] = ()  # fully trained, e.g. ("mask_embedder",)
    seed: int = 0
    negative_fraction: float | None = 0.3  # base share of negative slices (None: natural proportion)
    hard_mix: float = 0.5  # share of draws led by hardness
    hard_ema: float = 0.5
    hard_power: float = 1.0
    mining_every: int = 50  # optimizer steps between mining passes (0: off; online losses still count)
    mining_pool: int = 256  # slices scored per mining pass
    band_px: int = 3  # boundary band of hard background pixels
    hu_tolerance: float | None = 100.0  # low-contrast background pixels: |HU - median HU of structure|
    loss: LossWeights = field(default_factory=LossWeights)
    score_threshold: float = 0.5  # for validation Dice, as at inference
    checkpoint_every: int = 100  # optimizer steps (0: end of each epoch only)
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)

    def __post_init__(self) -> None:
        ints = {
            "epochs": 1,
            "batch_size": 1,
            "grad_accum": 1,
            "lora_r": 1,
            "warmup_steps": 0,
            "mining_every": 0,
            "mining_pool": 0,
            "band_px": 0,
            "checkpoint_every": 0,
        }
        for k, low in ints.items():
            if int(getattr(self, k)) < low:
                raise ValueError(f"{k} must be >= {low}, got {getattr(self, k)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1 or None")
        if not self.lr > 0:
            raise ValueError("lr must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_dropout must be in [0, 1)")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError("score_threshold must be in [0, 1]")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train_modules"] = list(resolve_train_modules(self.train_modules))
        return d


def resolve_train_modules(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(TRAIN_MODULE_ALIASES.get(n, n) for n in names)


def training_lora_config(config: TrainConfig) -> Any:
    """The peft config training uses (``models.sam3.lora.lora_config`` of the ``lora_*`` fields, the
    ``train_modules`` trained in full); bench/train_memory.py counts this one."""
    return lora_config(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets,
                       config.lora_components, resolve_train_modules(config.train_modules))


def apply_training_lora(model: Any, config: TrainConfig) -> tuple[Any, Any]:
    """peft-wrap ``model`` (LoRA on ``lora_targets`` in ``lora_components``, ``train_modules`` in full)."""
    from peft import get_peft_model

    modules = resolve_train_modules(config.train_modules)
    names = {n for n, _ in model.named_modules()}
    unknown = [m for m in modules if m not in names]
    if unknown:
        raise ValueError(
            f"train_modules {unknown} are not modules of this model; aliases: {sorted(TRAIN_MODULE_ALIASES)}"
        )
    peft_model = get_peft_model(model, training_lora_config(config))
    report = lora_report(peft_model)
    log.info("%s; fully trained: %s", report, ", ".join(modules) or "none")
    return peft_model, report

"""LoRA on SAM 3 with peft: which layers, how many parameters, save and reload exactly.

Targets are ``nn.Linear`` modules named ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``fc1``, ``fc2``
inside the chosen components (default: ViT ``vision_encoder``, CLIP ``text_encoder``, DETR encoder/decoder
and the mask decoder's prompt cross-attention). ``nn.MultiheadAttention`` is never targeted (peft would wrap
its packed in-projection, which breaks its fused kernels); :func:`apply_lora` checks every adapted module is
a Linear. ``train_mask_embedder=True`` additionally trains the mask embedder MLP in full (peft
``modules_to_save``). An adapter saves as ``adapter_config.json`` + ``adapter_model.safetensors``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
# Component name -> top-level Sam3Model attribute(s).
COMPONENTS: dict[str, tuple[str, ...]] = {
    "vision": ("vision_encoder",),
    "text": ("text_encoder",),
    "detr": ("detr_encoder", "detr_decoder"),
    "mask": ("mask_decoder",),
    "geometry": ("geometry_encoder",),
}
DEFAULT_COMPONENTS: tuple[str, ...] = ("vision", "text", "detr", "mask")
MASK_EMBEDDER = "mask_decoder.mask_embedder"


@dataclass(frozen=True)
class LoraReport:
    """What :func:`apply_lora` adapted."""

    adapted_modules: int
    trainable_params: int
    total_params: int
    by_component: dict[str, int] = field(default_factory=dict)  # adapted modules per component

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in self.by_component.items())
        return (
            f"LoRA: {self.adapted_modules} Linear modules adapted ({parts}); trainable "
            f"{self.trainable_params:,} of {self.total_params:,} ({100 * self.trainable_fraction:.2f} %)"
        )


def target_regex(
    targets: Sequence[str] = DEFAULT_TARGETS, components: Sequence[str] = DEFAULT_COMPONENTS
) -> str:
    """peft ``target_modules`` regex (full match on module names): these layer names in these components."""
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown LoRA components {unknown}; choose from {sorted(COMPONENTS)}")
    if not targets or not components:
        raise ValueError("LoRA needs at least one target layer name and one component")
    tops = "|".join(a for c in components for a in COMPONENTS[c])
    names = "|".join(sorted(set(targets)))
    return rf"^({tops})\.(.*\.)?({names})$"


def _component_of(name: str) -> str:
    top = name.split(".", 1)[0]
    for comp, attrs in COMPONENTS.items():
        if top in attrs:
            return comp
    return "other"


def lora_config(
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    modules_to_save: Sequence[str] = (),
) -> Any:
    """The one peft ``LoraConfig`` of the node: :func:`apply_lora`, training
    (``models.training.config.training_lora_config``) and :func:`count_trainable_full_size` (so
    bench/train_memory.py) all build it here. ``modules_to_save``: modules trained in full."""
    from peft import LoraConfig

    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        target_modules=target_regex(targets, components),
        modules_to_save=list(modules_to_save) or None,
    )


def _embedder(train_mask_embedder: bool) -> tuple[str, ...]:
    return (MASK_EMBEDDER,) if train_mask_embedder else ()


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    train_mask_embedder: bool = False,
    components: Sequence[str] = DEFAULT_COMPONENTS,
) -> tuple[Any, LoraReport]:
    """Wrap ``model`` (a ``Sam3Model``) with fresh LoRA adapters; returns ``(peft_model, report)``.

    The base weights are frozen; only LoRA matrices (and the mask embedder with
    ``train_mask_embedder``) train.
    """
    from peft import get_peft_model

    for name, module in model.named_modules():  # fail before peft touches anything
        if isinstance(module, nn.MultiheadAttention) and name.rsplit(".", 1)[-1] in targets:
            raise ValueError(f"{name} is nn.MultiheadAttention: LoRA targets Linear layers only")
    peft_model = get_peft_model(
        model, lora_config(r, alpha, dropout, targets, components, _embedder(train_mask_embedder))
    )
    report = lora_report(peft_model)
    log.info("%s", report)
    return peft_model, report


def lora_report(peft_model: nn.Module) -> LoraReport:
    """Count adapted modules (all must wrap ``nn.Linear``) and trainable / total parameters."""
    from peft.tuners.lora import LoraLayer

    by_component: dict[str, int] = {}
    adapted = 0
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if not isinstance(base, nn.Linear) or isinstance(base, nn.MultiheadAttention):
                raise TypeError(
                    f"LoRA adapted {name}, a {type(base).__name__}: only nn.Linear may be adapted"
                )
            adapted += 1
            inner = name.split("base_model.model.", 1)[-1]
            comp = _component_of(inner)
            by_component[comp] = by_component.get(comp, 0) + 1
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    return LoraReport(
        adapted_modules=adapted,
        trainable_params=trainable,
        total_params=total,
        by_component=dict(sorted(by_component.items())),
    )


def save_adapter(peft_model: Any, out_dir: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (the adapter only, not the base)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (out / name).is_file():
            raise RuntimeError(f"peft did not write {name} into {out}")
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False) -> Any:
    """Attach a saved adapter to a base ``Sam3Model``, strictly: every adapter weight must load,
    none be left over.

    Returns the peft model (``merge_and_unload()`` it for inference speed).
    """
    from peft import PeftConfig, get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    path = Path(adapter_dir)
    config = PeftConfig.from_pretrained(str(path))
    config.inference_mode = not is_trainable
    peft_model = get_peft_model(model, config)
    weights = load_peft_weights(str(path), device="cpu")
    result: Any = set_peft_model_state_dict(peft_model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"adapter {path} does not fit this model: {len(missing)} missing adapter weights "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}"
        )
    if not is_trainable:
        peft_model.eval()
        for p in peft_model.parameters():
            p.requires_grad_(False)
    return peft_model


def count_trainable_full_size(
    r: int = 16,
    alpha: int = 32,
    targets: Sequence[str] = DEFAULT_TARGETS,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    train_mask_embedder: bool = False,
    config: Any = None,
    lora: Any = None,
) -> LoraReport:
    """LoRA parameter counts for the full-size SAM 3 (default ``Sam3Config()``) without weights or a forward
    pass: the model and its adapters are built on the meta device (shapes only, no memory). ``lora``: a
    :func:`lora_config` result to count instead of the one the other arguments describe."""
    from peft import get_peft_model
    from transformers import Sam3Config, Sam3Model

    cfg = config if config is not None else Sam3Config()
    with torch.device("meta"):
        model = Sam3Model(cfg)
        peft_model = get_peft_model(
            model, lora or lora_config(r, alpha, 0.0, targets, components, _embedder(train_mask_embedder))
        )
    return lora_report(peft_model)

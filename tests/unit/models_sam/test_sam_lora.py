"""LoRA: only Linear layers, counted; exact save/reload; full-size counts without a forward pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.sam3.loader import Sam3LoadError, build_segmenter
from models.sam3.lora import (
    DEFAULT_TARGETS,
    apply_lora,
    count_trainable_full_size,
    load_adapter,
    save_adapter,
    target_regex,
)
from models.sam3.tiny import build_tiny_model, tiny_processor


def _randomise_lora(peft_model: nn.Module, seed: int = 0) -> None:
    """LoRA B starts at zero (adapter = identity); give it weights so that reloading is really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_lora_adapts_only_named_linear_layers() -> None:
    model = build_tiny_model()
    expected = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and n.rsplit(".", 1)[-1] in DEFAULT_TARGETS
        and not n.startswith("geometry_encoder")
    }
    peft_model, report = apply_lora(model, r=4)
    from peft.tuners.lora import LoraLayer

    adapted = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }
    assert adapted == expected
    assert report.adapted_modules == len(expected) > 0
    assert set(report.by_component) == {"vision", "text", "detr", "mask"}
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert report.trainable_params == lora_params  # base frozen
    assert 0 < report.trainable_fraction < 0.2
    assert "Linear modules adapted" in str(report)


def test_components_and_mask_embedder() -> None:
    _, vision_only = apply_lora(
        build_tiny_model(), r=2, targets=("q_proj", "k_proj", "v_proj", "o_proj"), components=("vision",)
    )
    assert set(vision_only.by_component) == {"vision"} and vision_only.adapted_modules == 2 * 4
    peft_model, with_embedder = apply_lora(build_tiny_model(), r=2, train_mask_embedder=True)
    embedder = sum(
        p.numel()
        for n, p in peft_model.named_parameters()
        if "mask_embedder" in n and "modules_to_save" in n and p.requires_grad
    )
    assert embedder > 0
    with pytest.raises(ValueError, match="unknown LoRA components"):
        target_regex(components=("decoder",))


def test_multihead_attention_is_never_targeted() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_encoder = nn.Module()
            self.vision_encoder.q_proj = nn.MultiheadAttention(8, 2)  # type: ignore[assignment]

    with pytest.raises(ValueError, match="MultiheadAttention"):
        apply_lora(Holder(), r=2)


def test_adapter_save_reload_gives_identical_outputs(
    tiny_dir: Path, tmp_path: Path, hu_slices: np.ndarray
) -> None:
    from models.sam3.inference import Sam3Segmenter

    peft_model, _ = apply_lora(build_tiny_model(), r=4, train_mask_embedder=True)
    _randomise_lora(peft_model)
    with torch.no_grad():  # the fully trained mask embedder must travel too
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.1)
    adapter = save_adapter(peft_model, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    trained = Sam3Segmenter(peft_model, tiny_processor())
    expected = trained.predict(hu_slices, ["lung", "heart"], score_threshold=0.0)
    base = Sam3Segmenter(build_tiny_model(), tiny_processor()).predict(
        hu_slices, ["lung"], score_threshold=0.0
    )
    assert not np.allclose(base["lung"], expected["lung"], atol=1e-3)  # the adapter does change the output

    reloaded = Sam3Segmenter(load_adapter(build_tiny_model(), adapter), tiny_processor())
    got = reloaded.predict(hu_slices, ["lung", "heart"], score_threshold=0.0)
    for p in expected:
        np.testing.assert_array_equal(got[p], expected[p])

    # production path: loader + adapter from disk, merged for speed (equal up to float rounding)
    seg = build_segmenter(tiny_dir, adapter, device="cpu", score_threshold=0.0)
    merged = seg.predict(hu_slices, ["lung", "heart"])
    for p in expected:
        np.testing.assert_allclose(merged[p], expected[p], atol=1e-4)
    info = seg.version_info()
    assert info["adapter"]["r"] == 4 and len(info["adapter"]["sha256"]) == 64 and "lora:" in info["version"]


def test_adapter_errors_are_clear(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(Sam3LoadError, match="does not exist"):
        build_segmenter(tiny_dir, tmp_path / "none", device="cpu")
    peft_model, _ = apply_lora(build_tiny_model(), r=4)
    adapter = save_adapter(peft_model, tmp_path / "a")
    broken = shutil.copytree(adapter, tmp_path / "b")
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(Sam3LoadError, match="adapter_model.safetensors"):
        build_segmenter(tiny_dir, broken, device="cpu")
    # an adapter whose config targets layers its weights do not cover is refused, not half-loaded
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = cfg["target_modules"].replace(
        "vision_encoder|", "vision_encoder|geometry_encoder|"
    )
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing adapter weights"):
        load_adapter(build_tiny_model(), adapter)
    with pytest.raises(Sam3LoadError, match="cannot be applied.*missing adapter weights"):
        build_segmenter(tiny_dir, adapter, device="cpu")


def test_full_size_trainable_count_without_forward_pass() -> None:
    """DESIGN.md: ViT attention, r=16 -> 4,194,304 trainable (0.5 %), counted on the meta device."""
    report = count_trainable_full_size(
        r=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"), components=("vision",)
    )
    assert report.adapted_modules == 32 * 4
    assert report.trainable_params == 32 * 4 * 16 * (1024 + 1024) == 4_194_304
    assert 0.004 < report.trainable_fraction < 0.006
    assert report.total_params > 800_000_000

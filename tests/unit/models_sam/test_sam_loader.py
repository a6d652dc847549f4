"""The real loader on a tiny model written to disk: strict loading, clear errors, no download, identity."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.sam3.loader import (
    Sam3LoadError,
    build_segmenter,
    check_sam3_dir,
    load_sam3,
    resolve_device,
)
from models.sam3.tiny import TINY_MODEL_NAME, build_tiny_segmenter


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_loads_tiny_model_from_disk_like_the_original(tiny_dir: Path, hu_slices: np.ndarray) -> None:
    seg = build_segmenter(tiny_dir, None, device="cpu", batch_size=4, score_threshold=0.0)
    ref = build_tiny_segmenter(seed=0, batch_size=4)
    ref.score_threshold = 0.0
    a = seg.predict(hu_slices, ["lung"])["lung"]
    b = ref.predict(hu_slices, ["lung"])["lung"]
    np.testing.assert_array_equal(a, b)  # the weights written are the weights read, bit for bit
    assert seg.device.type == "cpu" and seg.dtype == torch.float32
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_version_info_never_claims_a_trained_model(tiny_dir: Path) -> None:
    info = build_segmenter(tiny_dir, None, device="cpu").version_info()
    assert info["model"] == TINY_MODEL_NAME and info["trained"] is False
    assert len(info["config_sha256"]) == 64 and len(info["weights_sha256"]) == 64
    assert info["adapter"] is None
    assert info["version"].startswith(TINY_MODEL_NAME) and len(info["version"]) <= 64
    assert build_tiny_segmenter().version_info()["trained"] is False


@pytest.mark.parametrize(
    "name",
    ["config.json", "model.safetensors", "processor_config.json", "tokenizer_config.json", "tokenizer.json"],
)
def test_missing_file_is_named(tiny_dir: Path, tmp_path: Path, name: str) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    (d / name).unlink()
    with pytest.raises(Sam3LoadError) as err:
        build_segmenter(d, None, device="cpu")
    text = str(err.value)
    assert name.split(".")[0] in text and "facebook/sam3" in text and "ITVNODE_SAM3_DIR" in text


def test_unset_or_absent_directory_explains_what_to_download(tmp_path: Path) -> None:
    with pytest.raises(Sam3LoadError, match="ITVNODE_SAM3_DIR is unset.*facebook/sam3"):
        check_sam3_dir(None)
    # a Hub id is not a local directory: never an implicit download
    with pytest.raises(Sam3LoadError, match="does not exist"):
        load_sam3("facebook/sam3")
    with pytest.raises(Sam3LoadError, match="does not exist"):
        check_sam3_dir(tmp_path / "nowhere")


def test_weights_that_do_not_fit_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    """Strict loading: a checkpoint missing tensors fails instead of random-initialising them."""
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_dir, tmp_path / "m")
    weights = load_file(d / "model.safetensors")
    dropped = sorted(k for k in weights if "mask_decoder" in k)[:3]
    for k in dropped:
        del weights[k]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Sam3LoadError, match="missing"):
        load_sam3(d)


def test_config_that_does_not_match_weights_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["detr_decoder_config"]["num_queries"] = 5  # weights hold 8 queries
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Sam3LoadError, match="mismatched|size"):
        load_sam3(d)


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(Sam3LoadError, match="CUDA is not available"):
            resolve_device("cuda")


def test_windows_from_settings_reach_the_model(tiny_dir: Path, hu_slices: np.ndarray) -> None:
    from service.settings import load_settings

    windows = load_settings().hu_windows
    default = build_segmenter(tiny_dir, None, device="cpu", windows=windows)
    assert default.version_info()["hu_windows"] == [[-1350.0, 150.0], [-160.0, 240.0], [-1000.0, 1000.0]]
    narrow = build_segmenter(tiny_dir, None, device="cpu", windows=[(-100, 100)] * 3)
    assert not torch.equal(default.pixel_values(hu_slices), narrow.pixel_values(hu_slices))
    with pytest.raises(ValueError, match="3 HU windows"):
        build_segmenter(tiny_dir, None, device="cpu", windows=[(-100, 100)] * 2)


def test_loads_the_facebook_sam3_layout(tiny_dir: Path, tmp_path: Path, hu_slices: np.ndarray) -> None:
    """facebook/sam3 ships a ``sam3_video`` config with the image model under ``detector_config`` and weights
    prefixed ``detector_model.`` next to ``tracker_model.`` ones: the loader takes the detector, strictly."""
    from safetensors.torch import load_file, save_file
    from transformers import Sam3VideoConfig

    from models.sam3.tiny import tiny_sam3_config

    d = _copy(tiny_dir, tmp_path / "video_layout")
    Sam3VideoConfig(detector_config=tiny_sam3_config()).save_pretrained(d)
    weights = {f"detector_model.{k}": v for k, v in load_file(d / "model.safetensors").items()}
    weights["tracker_model.memory_encoder.weight"] = torch.zeros(4)
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((d / "config.json").read_text())["model_type"] == "sam3_video"

    seg = build_segmenter(d, None, device="cpu", score_threshold=0.0)
    ref = build_tiny_segmenter(seed=0)
    np.testing.assert_array_equal(
        seg.predict(hu_slices[:2], ["lung"])["lung"],
        ref.predict(hu_slices[:2], ["lung"], score_threshold=0.0)["lung"],
    )

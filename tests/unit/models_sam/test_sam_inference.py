"""Sam3Segmenter.predict on the tiny random model: shapes, feature reuse, batching, thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.sam3.inference import Sam3Segmenter
from models.sam3.tiny import build_tiny_segmenter, tiny_processor

PROMPTS4 = ["lung", "heart", "lung tumor", "body"]


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def test_predict_returns_one_probability_map_per_prompt(hu_slices: np.ndarray) -> None:
    seg = build_tiny_segmenter(batch_size=4)
    out = seg.predict(hu_slices, PROMPTS4, score_threshold=0.0)
    assert list(out) == PROMPTS4
    for probs in out.values():
        assert probs.shape == hu_slices.shape and probs.dtype == np.float32
        assert np.isfinite(probs).all() and probs.min() >= 0.0 and probs.max() <= 1.0
        assert probs.max() > 0.0  # threshold 0 keeps every instance
    # a threshold no instance reaches gives empty maps, not an error
    empty = seg.predict(hu_slices, ["lung"], score_threshold=1.0)["lung"]
    assert not empty.any()


def test_vision_encoder_runs_once_per_batch_whatever_the_number_of_prompts(hu_slices: np.ndarray) -> None:
    seg = build_tiny_segmenter(batch_size=4)
    vision = _count_calls(seg.model.vision_encoder)
    text = _count_calls(seg.model.text_encoder)
    geometry = _count_calls(seg.model.geometry_encoder)
    seg.predict(hu_slices, ["lung"])
    one = (vision[0], text[0], geometry[0])
    vision[0] = text[0] = geometry[0] = 0
    seg.predict(hu_slices, PROMPTS4)
    four = (vision[0], text[0], geometry[0])
    n_batches = -(-len(hu_slices) // 4)
    assert one[0] == four[0] == n_batches  # vision features computed once per batch, reused by every prompt
    assert one[1] == 1 and four[1] == 4  # text features once per prompt per call
    assert four[2] == 4 * n_batches  # padded box: the geometry encoder runs, as in the original SAM 3


def test_batch_size_does_not_change_the_result(hu_slices: np.ndarray) -> None:
    a = build_tiny_segmenter(batch_size=1).predict(hu_slices, ["lung"], score_threshold=0.0)["lung"]
    b = build_tiny_segmenter(batch_size=4).predict(hu_slices, ["lung"], score_threshold=0.0)["lung"]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_semantic_map_is_max_over_confident_instances() -> None:
    """Documented combination rule, checked on hand-made model outputs."""

    class Out:
        pred_logits = torch.tensor([[2.0, -2.0, 3.0]])
        presence_logits = torch.tensor([[4.0]])
        pred_masks = torch.stack([torch.full((4, 4), v) for v in (0.0, 5.0, -1.0)])[None]

    scores = Sam3Segmenter.instance_scores(Out)
    assert torch.allclose(scores, torch.sigmoid(Out.pred_logits) * torch.sigmoid(torch.tensor(4.0)))
    probs = Sam3Segmenter.semantic_probs(Out, (8, 8), threshold=0.5)
    # instance 1 (mask logit 5) is below the score threshold: the map is max(sigmoid(0), sigmoid(-1)) = 0.5
    assert probs.shape == (1, 8, 8)
    assert torch.allclose(probs, torch.full((1, 8, 8), 0.5))


def test_inputs_are_validated(hu_slices: np.ndarray) -> None:
    seg = build_tiny_segmenter()
    with pytest.raises(ValueError, match="N, Y, X"):
        seg.predict(hu_slices[0], ["lung"])
    with pytest.raises(ValueError, match="non-empty"):
        seg.predict(hu_slices, [" "])
    with pytest.raises(ValueError, match="image_size"):
        Sam3Segmenter(seg.model, tiny_processor(112))
    assert seg.predict(hu_slices[:0], ["lung"])["lung"].shape == (0, 64, 60)


def test_per_prompt_thresholds(hu_slices: np.ndarray) -> None:
    seg = build_tiny_segmenter()
    out = seg.predict(hu_slices[:2], ["lung", "heart"], score_threshold={"lung": 0.0, "heart": 1.0})
    assert out["lung"].any() and not out["heart"].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_autocast_agrees_with_cpu_fp32(hu_slices: np.ndarray) -> None:
    cpu = build_tiny_segmenter(device="cpu").predict(hu_slices, ["lung"], score_threshold=0.0)["lung"]
    gpu_seg = build_tiny_segmenter(device="cuda")
    assert gpu_seg.dtype == torch.bfloat16
    gpu = gpu_seg.predict(hu_slices, ["lung"], score_threshold=0.0)["lung"]
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    assert float(np.mean(np.abs(gpu - cpu))) < 0.05  # bf16 rounding only

"""Per-slice SAM 3 inference with text prompts: HU slices in, one probability map per prompt out.

Cost model (DESIGN.md): the vision encoder is ~90 % of the work, so per batch of slices the vision features
are computed once (``get_vision_features``) and reused for every prompt (``vision_embeds=``); text features
are computed once per prompt per :meth:`Sam3Segmenter.predict` call (``get_text_features``).

Text-only prompts get one padded box (label -10): the original SAM 3 always appends the geometry encoder's
CLS token, HF skips the geometry encoder without boxes; the padded box makes HF match the original model.

From instances to a semantic map: SAM 3 is DETR-style and returns up to ``num_queries`` instance masks per
slice, each with a score = sigmoid(detection logit) x sigmoid(presence logit). The probability map of a
prompt on a slice is the pixel-wise maximum of sigmoid(mask logit) over the instances whose score >=
``score_threshold`` (mask logits are first resized bilinearly to the slice grid); 0 where no instance
qualifies. Thresholding the map at 0.5 therefore gives the union of the confident instances' masks, which is
what a structure such as "lung" means.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.sam3.windowing import (
    DEFAULT_WINDOWS,
    PixelNormalisation,
    Window,
    logits_to_grid,
    to_pixel_values,
    window_channels,
)

log = logging.getLogger(__name__)

PAD_BOX_LABEL = (
    -10
)  # Sam3Model masks boxes with this label out of the geometry prompt but keeps the CLS token


@dataclass
class TextFeatures:
    """Cached output of ``get_text_features`` for one prompt (batch of 1)."""

    embeds: torch.Tensor  # (1, L, D) projected text features (pooler_output)
    attention_mask: torch.Tensor  # (1, L) bool


class Sam3Segmenter:
    """A loaded SAM 3 (+ optional LoRA) that segments CT slices by text prompt.

    Build it with :func:`models.sam3.loader.build_segmenter` (production) or
    :func:`models.sam3.tiny.build_tiny_segmenter` (tests). ``dtype`` is the autocast dtype: bf16 on CUDA,
    fp32 on CPU by default; the weights stay as loaded.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = 4,
        *,
        windows: Sequence[Window] = DEFAULT_WINDOWS,
        score_threshold: float = 0.5,
        identity: Mapping[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.device = torch.device(device)
        self.dtype = (
            dtype if dtype is not None else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        )
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.batch_size = int(batch_size)
        self.windows = tuple(windows)
        self.score_threshold = float(score_threshold)
        self.norm = PixelNormalisation.from_processor(processor)
        model_size = _model_image_size(model)
        if model_size is not None and model_size != self.norm.size:
            raise ValueError(
                f"processor resizes to {self.norm.size} but the model was built for {model_size}: "
                "image_size in processor_config.json and config.json must agree"
            )
        self._identity = dict(identity or {"model": "unknown", "trained": None})

    # -- identity -------------------------------------------------------------------------------------------
    def version_info(self) -> dict[str, Any]:
        """Model identity for RTSTRUCT provenance and deterministic UIDs (name, hashes, adapter)."""
        info = dict(self._identity)
        info.setdefault("version", _short_version(info))
        info["hu_windows"] = [
            [w.low, w.high] for w in self.windows
        ]  # they shape the input: part of provenance
        return info

    # -- building blocks ------------------------------------------------------------------------------------
    def _autocast(self) -> AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> TextFeatures:
        """Text features for one prompt (tokenised like ``Sam3Processor``: padded to its max length)."""
        tok = self.processor(text=prompt, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        with self._autocast():
            out = self.model.get_text_features(input_ids=ids, attention_mask=mask)
        return TextFeatures(embeds=out.pooler_output, attention_mask=mask.bool())

    def pixel_values(self, slices_hu: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, Y, X) HU -> (N, 3, H, W) normalised model input on the segmenter's device."""
        return to_pixel_values(window_channels(slices_hu, self.windows, device=self.device), self.norm)

    @torch.inference_mode()
    def vision_features(self, pixel_values: torch.Tensor) -> Any:
        with self._autocast():
            return self.model.get_vision_features(pixel_values=pixel_values)

    @torch.inference_mode()
    def decode(self, vision: Any, text: TextFeatures, n: int) -> Any:
        """Geometry (padded box) + DETR + mask decoder for one prompt on ``n`` slices with cached features."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        embeds = text.embeds.expand(n, -1, -1)
        mask = text.attention_mask.expand(n, -1)
        boxes = torch.zeros(n, 1, 4, device=self.device)
        labels = torch.full((n, 1), PAD_BOX_LABEL, dtype=torch.long, device=self.device)
        with self._autocast():
            return self.model(
                vision_embeds=vision,
                text_embeds=BaseModelOutputWithPooling(pooler_output=embeds),
                attention_mask=mask,
                input_boxes=boxes,
                input_boxes_labels=labels,
            )

    @staticmethod
    def instance_scores(outputs: Any) -> torch.Tensor:
        """(B, Q) score = sigmoid(detection) x sigmoid(presence), as the HF post-processing does."""
        scores = outputs.pred_logits.float().sigmoid()
        if outputs.presence_logits is not None:
            scores = scores * outputs.presence_logits.float().sigmoid()
        return scores

    @staticmethod
    def semantic_probs(outputs: Any, shape: tuple[int, int], threshold: float) -> torch.Tensor:
        """(B, Y, X) float32: max over confident instances of sigmoid(mask logits resized to ``shape``)."""
        scores = Sam3Segmenter.instance_scores(outputs)
        masks = outputs.pred_masks
        out = torch.zeros((masks.shape[0], *shape), dtype=torch.float32, device=masks.device)
        for b in range(masks.shape[0]):
            keep = scores[b] >= threshold
            if bool(keep.any()):
                # sigmoid is monotonic: max of probabilities = sigmoid of the max logit
                out[b] = logits_to_grid(masks[b, keep], shape).amax(dim=0).sigmoid()
        return out

    # -- the seam -------------------------------------------------------------------------------------------
    def predict(
        self,
        slices_hu: np.ndarray,
        prompts: Sequence[str],
        score_threshold: float | Mapping[str, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """(N, Y, X) HU slices -> ``{prompt: (N, Y, X) float32 probabilities}``.

        ``score_threshold``: one value, or one per prompt; default the segmenter's ``score_threshold``.
        """
        slices = np.asarray(slices_hu)
        if slices.ndim != 3:
            raise ValueError(f"predict takes (N, Y, X) slices, got shape {slices.shape}")
        prompts = list(dict.fromkeys(prompts))  # unique, order kept
        if any(not p.strip() for p in prompts):
            raise ValueError("prompts must be non-empty strings")
        thresholds = self._thresholds(prompts, score_threshold)
        n, ny, nx = slices.shape
        result = {p: np.zeros((n, ny, nx), dtype=np.float32) for p in prompts}
        if n == 0 or not prompts:
            return result

        t0 = time.perf_counter()
        text = {p: self.encode_prompt(p) for p in prompts}  # once per prompt per call
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            vision = self.vision_features(self.pixel_values(slices[start:stop]))  # once per batch
            for p in prompts:
                outputs = self.decode(vision, text[p], stop - start)
                probs = self.semantic_probs(outputs, (ny, nx), thresholds[p])
                result[p][start:stop] = probs.cpu().numpy()
        log.info(
            "sam3 predict: %d slices x %d prompts in %.2f s (batch %d, %s, %s)",
            n,
            len(prompts),
            time.perf_counter() - t0,
            self.batch_size,
            self.device,
            str(self.dtype).removeprefix("torch."),
        )
        return result

    def _thresholds(
        self, prompts: list[str], score_threshold: float | Mapping[str, float] | None
    ) -> dict[str, float]:
        if score_threshold is None:
            values = {p: self.score_threshold for p in prompts}
        elif isinstance(score_threshold, Mapping):
            values = {p: float(score_threshold.get(p, self.score_threshold)) for p in prompts}
        else:
            values = {p: float(score_threshold) for p in prompts}
        for p, v in values.items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"score threshold for {p!r} must be in [0, 1], got {v}")
        return values


def _model_image_size(model: Any) -> tuple[int, int] | None:
    cfg = getattr(model, "config", None)
    vision = getattr(cfg, "vision_config", None)
    size = getattr(vision, "image_size", None)
    if size is None:
        return None
    if isinstance(size, list | tuple):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def _short_version(info: Mapping[str, Any]) -> str:
    """<= 64 characters (fits DICOM LO, e.g. SoftwareVersions): model name, config/weights hash, adapter."""
    parts = [str(info.get("model", "unknown"))[:32]]
    if info.get("config_sha256"):
        parts.append("cfg:" + str(info["config_sha256"])[:6])
    if info.get("weights_sha256"):
        parts.append("w:" + str(info["weights_sha256"])[:6])
    adapter = info.get("adapter")
    if isinstance(adapter, Mapping) and adapter.get("sha256"):
        parts.append("lora:" + str(adapter["sha256"])[:6])
    return " ".join(parts)[:64]

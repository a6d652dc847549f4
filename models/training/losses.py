"""Losses for semantic fine-tuning of SAM 3's instance (DETR-style) outputs.

SAM 3 returns, per image and prompt, ``Q`` instance queries: ``pred_masks`` (B, Q, h, w) logits,
``pred_logits`` (B, Q) detection logits and ``presence_logits`` (B, 1). Inference (models/sam3/inference.py)
keeps
the queries whose score sigmoid(detection) x sigmoid(presence) >= threshold and takes the pixel-wise max of
their masks. Training matches that with a simple, Hungarian-free rule (docs/training.md):

* positive slice: the query whose mask has the best soft IoU with the target is *matched*; its mask gets
  Dice + focal loss on the slice grid (logits resized bilinearly, as at inference) plus a top-k BCE on hard
  background pixels (near the boundary, or of similar HU: :mod:`models.training.hard_negatives`); its
  detection target is 1, every other query's 0; presence target 1.
* negative slice: every query's detection target is 0 and the presence target is 0; no mask loss.

Every function returns per-sample values (B,) so that the sampler can be fed per-sample losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from models.sam3.windowing import logits_to_grid


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms and their parameters."""

    dice: float = 2.0
    focal: float = 1.0
    hard_pixels: float = 0.5
    detection: float = 1.0
    presence: float = 1.0
    focal_gamma: float = 2.0  # 0: plain BCE
    focal_alpha: float | None = None  # weight of the positive class in [0, 1]; None: unweighted
    hard_fraction: float = 0.1  # top-k share of the candidate background pixels in the hard-pixel term

    def __post_init__(self) -> None:
        for k in ("dice", "focal", "hard_pixels", "detection", "presence", "focal_gamma"):
            if getattr(self, k) < 0:
                raise ValueError(f"loss weight {k} must be >= 0")
        if self.focal_alpha is not None and not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError("focal_alpha must be in [0, 1] or None")
        if not 0.0 < self.hard_fraction <= 1.0:
            raise ValueError("hard_fraction must be in (0, 1]")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per sample; ``logits``/``target`` (B, ...). ``smooth`` keeps empty targets defined."""
    p = logits.float().sigmoid().flatten(1)
    t = target.float().flatten(1)
    inter = (p * t).sum(1)
    return 1.0 - (2.0 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = None
) -> torch.Tensor:
    """Mean sigmoid focal loss per sample (Lin et al. 2017); ``gamma=0, alpha=None`` is plain BCE."""
    x = logits.float().flatten(1)
    t = target.float().flatten(1)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    if gamma:
        p = x.sigmoid()
        p_t = p * t + (1 - p) * (1 - t)
        bce = bce * (1 - p_t) ** gamma
    if alpha is not None:
        bce = bce * (alpha * t + (1 - alpha) * (1 - t))
    return bce.mean(1)


def hard_pixel_loss(
    logits: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor, fraction: float = 0.1
) -> torch.Tensor:
    """Mean BCE of the hardest ``fraction`` of candidate background pixels, per sample (0 without any).

    ``candidates`` (B, Y, X) bool: background pixels worth mining (boundary band, low contrast); pixels of the
    target are never candidates.
    """
    x = logits.float().flatten(1)
    t = target.float().flatten(1)
    cand = candidates.flatten(1).bool() & (t < 0.5)
    bce = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    out = torch.zeros(x.shape[0], device=x.device)
    for b in range(x.shape[0]):
        vals = bce[b][cand[b]]
        if vals.numel():
            k = max(1, int(round(fraction * vals.numel())))
            out[b] = vals.topk(k).values.mean()
    return out


@torch.no_grad()
def match_queries(
    mask_logits: torch.Tensor, target: torch.Tensor, det_logits: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,) index of the query with the best soft IoU of its mask (B, Q, Y, X) with ``target`` (B, Y, X)
    plus its detection probability (a one-target DETR matching cost; the score term keeps the choice
    stable while masks are still poor, so one query learns the structure instead of a random one per step)."""
    p = mask_logits.float().sigmoid().flatten(2)
    t = target.float().flatten(1)[:, None, :]
    inter = (p * t).sum(-1)
    union = p.sum(-1) + t.sum(-1) - inter
    quality = inter / union.clamp_min(1e-6)
    if det_logits is not None:
        quality = quality + det_logits.float().sigmoid()
    return quality.argmax(dim=1)


@dataclass
class LossOutput:
    total: torch.Tensor  # scalar, mean over the batch
    per_sample: torch.Tensor  # (B,) detached
    parts: dict[str, float]  # batch means of each term (for logging)
    matched: torch.Tensor  # (B,) matched query per sample (meaningful for positives)


def sam3_loss(
    outputs: Any,
    target: torch.Tensor,
    present: torch.Tensor,
    candidates: torch.Tensor,
    weights: LossWeights | None = None,
) -> LossOutput:
    """The training loss of one batch; ``target`` (B, Y, X) on the slice grid, ``present`` (B,) bool."""
    w = weights or LossWeights()
    shape = (int(target.shape[-2]), int(target.shape[-1]))
    masks = logits_to_grid(outputs.pred_masks, shape)  # (B, Q, Y, X) float32
    matched = match_queries(masks, target, outputs.pred_logits)
    b_idx = torch.arange(masks.shape[0], device=masks.device)
    best = masks[b_idx, matched]  # (B, Y, X)
    pres = present.float().to(masks.device)

    d = dice_loss(best, target) * pres
    f = focal_loss(best, target, w.focal_gamma, w.focal_alpha) * pres
    h = hard_pixel_loss(best, target, candidates, w.hard_fraction) * pres

    det = outputs.pred_logits.float()
    det_target = torch.zeros_like(det)
    det_target[b_idx, matched] = pres
    det_l = F.binary_cross_entropy_with_logits(det, det_target, reduction="none").mean(1)
    if outputs.presence_logits is not None:
        pl = outputs.presence_logits.float().reshape(det.shape[0], -1)[:, 0]
        pres_l = F.binary_cross_entropy_with_logits(pl, pres, reduction="none")
    else:
        pres_l = torch.zeros_like(det_l)

    per = w.dice * d + w.focal * f + w.hard_pixels * h + w.detection * det_l + w.presence * pres_l
    parts = {
        "dice": float(d.detach().mean()),
        "focal": float(f.detach().mean()),
        "hard_pixels": float(h.detach().mean()),
        "detection": float(det_l.detach().mean()),
        "presence": float(pres_l.detach().mean()),
    }
    return LossOutput(total=per.mean(), per_sample=per.detach(), parts=parts, matched=matched)


def grouped_loss(
    outputs: Any,
    targets: Sequence[torch.Tensor],
    present: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    weights: LossWeights,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """:func:`sam3_loss` of a batch whose slices may lie on different grids: each grid's samples go
    separately, weighted by their share. Returns the batch loss (mean), per-sample losses and term means."""
    n = len(targets)
    shapes: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(targets):
        shapes.setdefault(tuple(t.shape), []).append(i)
    per = torch.zeros(n, device=device)
    total = torch.zeros((), device=device)
    parts: dict[str, float] = {}
    for idx in shapes.values():
        sel = torch.as_tensor(idx, device=device)
        sub = SimpleNamespace(
            pred_masks=outputs.pred_masks[sel],
            pred_logits=outputs.pred_logits[sel],
            presence_logits=None if outputs.presence_logits is None else outputs.presence_logits[sel],
        )
        out = sam3_loss(
            sub,
            torch.stack([targets[i] for i in idx]),
            present[sel],
            torch.stack([candidates[i] for i in idx]),
            weights,
        )
        total = total + out.total * (len(idx) / n)
        per[sel] = out.per_sample
        for k, v in out.parts.items():
            parts[k] = parts.get(k, 0.0) + v * len(idx) / n
    return total, per, parts

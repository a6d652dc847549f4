"""Loss terms against hand-computed values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.training.hard_negatives import pixel_candidates
from models.training.losses import (
    LossWeights,
    dice_loss,
    focal_loss,
    hard_pixel_loss,
    match_queries,
    sam3_loss,
)

LN2 = math.log(2.0)


def test_dice_loss_hand_values() -> None:
    logits = torch.tensor([[100.0, -100.0, -100.0, -100.0]])
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(1 / 3)  # 1 - 2*1/(1+2)
    assert dice_loss(torch.full((1, 4), -100.0), torch.zeros(1, 4)).item() == pytest.approx(0.0)


def test_focal_loss_hand_values() -> None:
    z = torch.zeros(1, 4)
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert focal_loss(z, t, gamma=0.0).item() == pytest.approx(LN2)  # plain BCE at p = 0.5
    assert focal_loss(z, t, gamma=2.0).item() == pytest.approx(LN2 / 4)  # (1 - 0.5)^2 * ln 2
    # alpha 0.25 on positives, 0.75 on negatives, half each
    assert focal_loss(z, t, gamma=2.0, alpha=0.25).item() == pytest.approx(LN2 / 4 * 0.5)


def test_hard_pixel_loss_takes_top_k_background() -> None:
    logits = torch.tensor([[0.0, 2.0, -2.0, 5.0]])
    target = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    cand = torch.ones(1, 4, dtype=torch.bool)
    # background pixels 0, 1, 2; k = round(0.5 * 3) = 2 -> the two largest BCE(x, 0) = log(1 + e^x)
    expected = (math.log1p(math.exp(2.0)) + math.log1p(1.0)) / 2
    assert hard_pixel_loss(logits, target, cand, 0.5).item() == pytest.approx(expected)
    assert hard_pixel_loss(logits, target, torch.zeros_like(cand), 0.5).item() == 0.0


def test_match_queries_best_iou_and_score_tiebreak() -> None:
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1
    masks = torch.full((1, 3, 4, 4), -10.0)
    masks[0, 1, :2] = 10.0  # query 1 is the structure
    masks[0, 2, :, :2] = 10.0  # query 2 half overlaps
    assert match_queries(masks, target).item() == 1
    empty = torch.full((1, 3, 4, 4), -10.0)
    assert match_queries(empty, target, torch.tensor([[0.0, -3.0, 4.0]])).item() == 2


def test_sam3_loss_negative_and_positive() -> None:
    out = SimpleNamespace(
        pred_masks=torch.zeros(2, 3, 4, 4), pred_logits=torch.zeros(2, 3), presence_logits=torch.zeros(2, 1)
    )
    target = torch.zeros(2, 4, 4)
    target[1, 1:3, 1:3] = 1
    present = torch.tensor([False, True])
    cand = torch.zeros(2, 4, 4, dtype=torch.bool)
    w = LossWeights(dice=1, focal=1, hard_pixels=1, detection=1, presence=1, focal_gamma=0.0)
    res = sam3_loss(out, target, present, cand, w)
    # negative: every logit 0 -> detection BCE ln2 (all targets 0) + presence ln2; no mask terms
    assert res.per_sample[0].item() == pytest.approx(2 * LN2)
    # positive: p = 0.5 everywhere: dice 1 - (2*2 + 1)/(8 + 4 + 1), BCE ln2, detection ln2, presence ln2
    assert res.per_sample[1].item() == pytest.approx(1 - 5 / 13 + 3 * LN2)
    assert res.total.item() == pytest.approx(res.per_sample.mean().item())
    res.total.requires_grad  # noqa: B018


def test_pixel_candidates_band_and_low_contrast() -> None:
    hu = np.full((9, 9), -1000.0)
    hu[6:, 6:] = 45.0  # like the target, far away: low contrast
    target = np.zeros((9, 9), dtype=bool)
    target[3:5, 3:5] = True
    hu[target] = 40.0
    cand = pixel_candidates(hu, target, band_px=1, hu_tolerance=20.0)
    assert not (cand & target).any()
    assert cand[2, 3] and cand[5, 4]  # boundary band
    assert cand[8, 8]  # similar HU
    assert not cand[0, 8]  # neither
    assert not pixel_candidates(hu, np.zeros_like(target)).any()

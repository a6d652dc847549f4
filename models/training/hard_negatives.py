"""Hard negative mining, at two levels (docs/training.md).

* Pixels: :func:`pixel_candidates` marks the background pixels worth mining on a slice: a band of
  ``band_px`` pixels around the structure (boundary discrimination) and pixels whose HU lies within
  ``hu_tolerance`` of the structure's median HU on that slice (low contrast: heart against liver, tumour
  against vessels or diaphragm). :func:`models.training.losses.hard_pixel_loss` takes the top-k of them.
* Samples: :func:`mine` periodically scores a pool of slices (all negatives first, then positives) without
  gradients and feeds the per-sample losses to :class:`models.training.sampler.HardNegativeSampler`, which
  then oversamples the slices the model gets most wrong.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from models.training.sampler import HardNegativeSampler

log = logging.getLogger(__name__)


def pixel_candidates(
    hu: np.ndarray, target: np.ndarray, band_px: int = 3, hu_tolerance: float | None = 100.0
) -> np.ndarray:
    """bool (Y, X): background pixels near the boundary or of similar HU; none for an empty target."""
    t = np.asarray(target, dtype=bool)
    out = np.zeros(t.shape, dtype=bool)
    if not t.any():
        return out
    if band_px > 0:
        out |= ndi.binary_dilation(t, iterations=int(band_px)) & ~t
    if hu_tolerance is not None:
        med = float(np.median(hu[t]))
        out |= (np.abs(np.asarray(hu, dtype=np.float32) - med) <= hu_tolerance) & ~t
    return out


@dataclass
class MiningReport:
    step: int
    scored: int
    seconds: float
    mean_negative_loss: float
    mean_positive_loss: float
    hardest: list[int]  # sample indices of the hardest negatives after the update


def mine(
    sampler: HardNegativeSampler,
    score: Callable[[Sequence[int]], np.ndarray],
    *,
    pool_size: int,
    batch_size: int,
    rng: np.random.Generator,
    step: int = 0,
) -> MiningReport:
    """Score up to ``pool_size`` samples (negatives first, at random) and update the sampler's hardness.

    ``score(indices) -> per-sample losses`` runs the model without gradients (the trainer supplies it).
    """
    t0 = time.perf_counter()
    neg = np.flatnonzero(sampler.is_negative)
    pos = np.flatnonzero(~sampler.is_negative)
    rng.shuffle(neg)
    rng.shuffle(pos)
    pool = np.concatenate([neg, pos])[: max(0, int(pool_size))]
    losses = np.zeros(pool.size)
    for start in range(0, pool.size, batch_size):
        chunk = pool[start : start + batch_size]
        losses[start : start + chunk.size] = np.asarray(score(chunk.tolist()), dtype=np.float64)
    sampler.update(pool, losses)
    is_neg = sampler.is_negative[pool]
    report = MiningReport(
        step=step,
        scored=int(pool.size),
        seconds=round(time.perf_counter() - t0, 3),
        mean_negative_loss=float(losses[is_neg].mean()) if is_neg.any() else 0.0,
        mean_positive_loss=float(losses[~is_neg].mean()) if (~is_neg).any() else 0.0,
        hardest=[int(i) for i in sampler.hardest(5)],
    )
    log.info(
        "hard negative mining at step %d: %d slices scored in %.1f s (negatives %.3f, positives %.3f)",
        step,
        report.scored,
        report.seconds,
        report.mean_negative_loss,
        report.mean_positive_loss,
    )
    return report

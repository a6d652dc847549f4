"""A weighted sampler that oversamples the examples the model gets most wrong (hard negative mining).

Each sample ``i`` carries a *hardness* ``h_i``: an exponential moving average of its recent losses (from the
training steps that drew it and from the periodic mining passes of :mod:`models.training.hard_negatives`).
Samples are drawn with replacement with probability

    p_i = (1 - mix) * u_i + mix * h_i ** power / sum_j h_j ** power

where ``u`` is the base distribution (uniform over samples, or uniform per class when
``negative_fraction`` fixes the share of negatives). The ``1 - mix`` floor keeps every sample reachable, so an
example that became easy is still revisited and its hardness refreshed. Samples never scored keep the mean
hardness of the scored ones (neutral until seen).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class HardNegativeSampler:
    """Draws sample indices; :meth:`update` feeds per-sample losses back.

    ``is_negative[i]`` marks negatives (slices without the structure). ``negative_fraction`` (None: natural
    proportion) sets the base share of negatives; ``mix`` in [0, 1] is the share of draws led by hardness;
    ``ema`` the weight of the newest loss; ``power`` sharpens (>1) or flattens (<1) the preference.
    ``hard_negatives_only`` restricts the hardness-led share to negatives (positives keep their base weight).
    """

    def __init__(
        self,
        is_negative: Sequence[bool] | np.ndarray,
        *,
        seed: int = 0,
        mix: float = 0.5,
        ema: float = 0.5,
        power: float = 1.0,
        negative_fraction: float | None = None,
        hard_negatives_only: bool = False,
    ) -> None:
        neg = np.asarray(is_negative, dtype=bool)
        if neg.ndim != 1 or neg.size == 0:
            raise ValueError("the sampler needs at least one sample")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        if power <= 0:
            raise ValueError(f"power must be > 0, got {power}")
        if negative_fraction is not None and not 0.0 <= negative_fraction <= 1.0:
            raise ValueError(f"negative_fraction must be in [0, 1], got {negative_fraction}")
        self.is_negative = neg
        self.mix, self.ema, self.power = float(mix), float(ema), float(power)
        self.negative_fraction = negative_fraction
        self.hard_negatives_only = bool(hard_negatives_only)
        self.hardness = np.zeros(neg.size, dtype=np.float64)
        self.seen = np.zeros(neg.size, dtype=bool)
        self.rng = np.random.default_rng(seed)
        self.base = self._base_distribution()

    def __len__(self) -> int:
        return int(self.is_negative.size)

    def _base_distribution(self) -> np.ndarray:
        n = self.is_negative.size
        if self.negative_fraction is None:
            return np.full(n, 1.0 / n)
        n_neg = int(self.is_negative.sum())
        n_pos = n - n_neg
        base = np.zeros(n)
        frac = self.negative_fraction if n_pos and n_neg else (1.0 if n_neg else 0.0)
        if n_neg:
            base[self.is_negative] = frac / n_neg
        if n_pos:
            base[~self.is_negative] = (1.0 - frac) / n_pos
        return base / base.sum()

    def probabilities(self) -> np.ndarray:
        """Current draw probability of every sample (sums to 1)."""
        if self.mix == 0.0 or not self.seen.any():
            return self.base.copy()
        h = self.hardness.copy()
        h[~self.seen] = float(self.hardness[self.seen].mean())
        h = np.maximum(h, 0.0) ** self.power
        eligible = self.is_negative if self.hard_negatives_only else np.ones_like(self.is_negative)
        h = np.where(eligible, h, 0.0)
        total = h.sum()
        if total <= 0:
            return self.base.copy()
        hard = h / total
        if self.hard_negatives_only:
            # positives keep their base share; hardness redistributes the negatives' share only
            neg_share = float(self.base[self.is_negative].sum())
            p = np.where(
                self.is_negative, (1 - self.mix) * self.base + self.mix * neg_share * hard, self.base
            )
        else:
            p = (1 - self.mix) * self.base + self.mix * hard
        return p / p.sum()

    def sample(self, n: int) -> np.ndarray:
        """``n`` indices drawn with replacement from :meth:`probabilities`."""
        return self.rng.choice(self.is_negative.size, size=int(n), replace=True, p=self.probabilities())

    def update(self, indices: Sequence[int] | np.ndarray, losses: Sequence[float] | np.ndarray) -> None:
        """Blend new per-sample losses into the hardness (first loss of a sample replaces the prior)."""
        idx = np.asarray(indices, dtype=np.int64)
        val = np.asarray(losses, dtype=np.float64)
        if idx.shape != val.shape:
            raise ValueError(f"{idx.size} indices but {val.size} losses")
        if not np.all(np.isfinite(val)):
            raise ValueError("losses must be finite")
        for i, v in zip(idx.tolist(), val.tolist(), strict=True):  # duplicates apply in order
            self.hardness[i] = v if not self.seen[i] else (1 - self.ema) * self.hardness[i] + self.ema * v
            self.seen[i] = True

    def hardest(self, k: int, negatives_only: bool = True) -> np.ndarray:
        """Indices of the ``k`` hardest scored samples (for logging / the manifest)."""
        mask = self.seen & (self.is_negative if negatives_only else True)
        idx = np.flatnonzero(mask)
        order = np.argsort(-self.hardness[idx], kind="stable")
        return idx[order[:k]]

    # checkpointing: plain lists / dicts only (torch.load(weights_only=True) friendly)
    def state_dict(self) -> dict[str, Any]:
        return {
            "hardness": self.hardness.tolist(),
            "seen": self.seen.tolist(),
            "rng": self.rng.bit_generator.state,
            "n": int(self.is_negative.size),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.is_negative.size:
            raise ValueError(f"sampler state is for {state['n']} samples, this sampler has {len(self)}")
        self.hardness = np.asarray(state["hardness"], dtype=np.float64)
        self.seen = np.asarray(state["seen"], dtype=bool)
        self.rng.bit_generator.state = state["rng"]

"""The hard-negative sampler oversamples what the model gets wrong (fixed seeds, statistical checks)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from scipy.stats import binomtest

from models.training.hard_negatives import mine
from models.training.sampler import HardNegativeSampler


def _sampler(**kw: object) -> tuple[HardNegativeSampler, np.ndarray]:
    is_neg = np.array([True] * 100 + [False] * 100)
    s = HardNegativeSampler(is_neg, seed=123, **kw)  # type: ignore[arg-type]
    hard = np.arange(10)  # ten negatives the model gets badly wrong
    losses = np.full(200, 0.1)
    losses[hard] = 2.0
    s.update(np.arange(200), losses)
    return s, hard


def test_hard_negatives_are_oversampled_statistically() -> None:
    s, hard = _sampler(mix=0.5)
    draws = s.sample(20000)
    hits = int(np.isin(draws, hard).sum())
    # uniform sampling would give 10/200 = 5 %: the hard ones must be drawn far more often
    assert binomtest(hits, 20000, 0.05, alternative="greater").pvalue < 1e-12
    expected = 10 * (0.5 / 200 + 0.5 * 2.0 / (190 * 0.1 + 10 * 2.0))  # 0.2814 (module docstring formula)
    assert s.probabilities()[hard].sum() == pytest.approx(expected)
    assert hits / 20000 == pytest.approx(expected, abs=0.015)


def test_floor_keeps_easy_samples_reachable_and_mix_zero_is_uniform() -> None:
    s, _ = _sampler(mix=0.5)
    assert s.probabilities().min() >= 0.5 / 200 - 1e-12
    u, _ = _sampler(mix=0.0)
    assert np.allclose(u.probabilities(), 1 / 200)


def test_negative_fraction_and_hard_negatives_only() -> None:
    s, hard = _sampler(mix=0.8, negative_fraction=0.3, hard_negatives_only=True)
    p = s.probabilities()
    assert p[100:].sum() == pytest.approx(0.7)  # positives keep their base share
    assert p[:100].sum() == pytest.approx(0.3)
    assert p[hard].sum() > 0.3 * 0.5  # most of the negatives' share goes to the hard ones


def test_ema_update_and_unseen_samples_neutral() -> None:
    s = HardNegativeSampler([True, True, False], seed=0, ema=0.5)
    s.update([0], [4.0])
    assert s.hardness[0] == 4.0  # first loss replaces the prior
    s.update([0], [0.0])
    assert s.hardness[0] == 2.0
    p = s.probabilities()
    assert p[1] == pytest.approx(p[0])  # unseen samples take the mean hardness of the seen ones
    with pytest.raises(ValueError):
        s.update([0, 1], [1.0])
    with pytest.raises(ValueError):
        s.update([0], [float("nan")])


def test_seeded_and_state_round_trip() -> None:
    a, _ = _sampler()
    b, _ = _sampler()
    assert np.array_equal(a.sample(50), b.sample(50))
    state = a.state_dict()
    c = HardNegativeSampler(np.array([True] * 100 + [False] * 100), seed=999)
    c.load_state_dict(state)
    assert np.array_equal(a.sample(50), c.sample(50))
    with pytest.raises(ValueError):
        HardNegativeSampler([True], seed=0).load_state_dict(state)


def test_mining_pass_feeds_sampler_from_scores() -> None:
    """A mining pass scores negatives first and the sampler then favours the ones scored worst."""
    is_neg = np.array([True] * 40 + [False] * 40)
    s = HardNegativeSampler(is_neg, seed=1, mix=0.7)
    worst = {3, 17, 29}

    def score(indices: Sequence[int]) -> np.ndarray:
        return np.array([5.0 if i in worst else 0.2 for i in indices])

    report = mine(s, score, pool_size=40, batch_size=8, rng=np.random.default_rng(0), step=10)
    assert report.scored == 40 and s.seen[:40].all() and not s.seen[40:].any()
    assert set(report.hardest[:3]) == worst
    draws = s.sample(5000)
    share = np.isin(draws, list(worst)).mean()
    assert binomtest(int(share * 5000), 5000, 3 / 80, alternative="greater").pvalue < 1e-12

"""Envelope (ITV) and the QA numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from models.post.envelope import envelope, envelope_phases
from models.post.qa import QAParams, phase_stats, structure_qa, study_qa

SP = (2.5, 1.0, 1.0)
SHAPE = (30, 32, 32)


def _breathing_sphere(n_phases: int = 10, amplitude_mm: float = 15.0, radius_mm: float = 6.0) -> np.ndarray:
    """A sphere moving SI with the Lujan cos^4 law, centroid known analytically."""
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n, s in zip(SHAPE, SP, strict=True)), indexing="ij")
    out = np.zeros((n_phases, *SHAPE), bool)
    for p in range(n_phases):
        zc = 50.0 - amplitude_mm * math.cos(math.pi * p / n_phases) ** 4
        out[p] = (zz - zc) ** 2 + (yy - 16.0) ** 2 + (xx - 16.0) ** 2 <= radius_mm ** 2
    return out


def test_envelope_is_union() -> None:
    m = _breathing_sphere()
    env = envelope(m)
    assert (env == m.any(axis=0)).all()
    assert (envelope_phases(m, [0, 5]) == (m[0] | m[5])).all()
    assert (envelope_phases(m) == env).all()
    assert not envelope(np.zeros((3, 4, 4, 4), bool)).any()
    with pytest.raises(ValueError):
        envelope_phases(m, [10])
    with pytest.raises(ValueError):
        envelope(m[0])


def test_volumes_centroids_and_motion() -> None:
    m = _breathing_sphere()
    counts, cents = phase_stats(m, SP)
    assert (counts == m.sum(axis=(1, 2, 3))).all()
    for p in range(10):
        assert cents[p] == pytest.approx(np.argwhere(m[p]).mean(axis=0) * np.asarray(SP))
    q = structure_qa(m, SP)
    assert q["motion_mm"]["SI"] == pytest.approx(15.0, abs=1.0)
    assert q["motion_mm"]["AP"] == pytest.approx(0.0, abs=1e-9)
    assert q["volume_cc"][0] == pytest.approx(counts[0] * 2.5 / 1000, rel=1e-3)
    assert q["vanished_phases"] == [] and q["jump_phases"] == [] and not q["absent"]


def test_vanished_phase_and_sorting_jump_flagged() -> None:
    m = _breathing_sphere()
    m[3] = False
    swapped = _breathing_sphere()
    swapped[[0, 5]] = swapped[[5, 0]]  # end-inhale and end-exhale binned the wrong way round
    assert structure_qa(m, SP)["vanished_phases"] == [3]
    jumps = structure_qa(swapped, SP)["jump_phases"]
    assert 0 in jumps and 5 in jumps  # the swapped phases (their neighbours may be flagged with them)
    assert set(jumps) <= {9, 0, 1, 4, 5, 6}
    # too few phases to tell breathing from a jump: no flags
    assert structure_qa(_breathing_sphere(4), SP)["jump_phases"] == []
    q = study_qa({"GTVp": swapped, "Lung_L": m}, SP, phase_percents=[10.0 * i for i in range(10)])
    assert any("phase-sorting" in w for w in q["warnings"])
    assert any("Lung_L: empty in phase(s) 30%" in w for w in q["warnings"])


def test_study_qa_is_json() -> None:
    m = _breathing_sphere()
    empty = np.zeros_like(m)
    q = study_qa({"GTVp": m, "Heart": empty}, SP, {"ITV": envelope(m)},
                 cleanup={"GTVp": {"removed_temporal": [0] * 10}}, skipped={"Lung_L": "reason"},
                 params=QAParams(jump_mm=3.0))
    text = json.dumps(q, allow_nan=False)
    back = json.loads(text)
    assert back["structures"]["Heart"]["absent"] is True
    assert back["structures"]["Heart"]["motion_mm"]["SI"] is None
    assert back["envelopes"]["ITV"]["volume_cc"] > max(back["structures"]["GTVp"]["volume_cc"])
    assert back["skipped"] == {"Lung_L": "reason"}
    assert back["structures"]["GTVp"]["cleanup"] == {"removed_temporal": [0] * 10}


def test_qa_params_validation() -> None:
    with pytest.raises(ValueError):
        QAParams(jump_mm=0)
    with pytest.raises(ValueError):
        QAParams(min_phases_for_jumps=2)

"""QA flags for implausible results: volume ranges, heart vs lung, variation, ITV vs largest phase,
vanished and jumping phases, phases used vs expected. Texts carry ROI names and numbers only."""

from __future__ import annotations

import numpy as np
import pytest

from models.post.qa import QAParams, cycle_qa, study_qa

SP = (2.0, 2.0, 2.0)  # 8 mm^3 voxels: 125 voxels per cc
PCTS = [float(p) for p in range(0, 100, 10)]


def _box(n_ph: int, shape: tuple[int, int, int], size: tuple[int, int, int], z0: int = 0,
         shifts: list[int] | None = None) -> np.ndarray:
    out = np.zeros((n_ph, *shape), bool)
    for p in range(n_ph):
        z = z0 + (shifts[p] if shifts else 0)
        out[p, z:z + size[0], : size[1], : size[2]] = True
    return out


def _kinds(q: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in q["flags"]:
        out.setdefault(f["kind"], []).append(f["text"])
    assert q["warnings"] == [f["text"] for f in q["flags"]]
    return out


def test_a_1_7_litre_gtv_is_flagged() -> None:
    gtv = _box(10, (60, 60, 60), (60, 60, 59))  # 212,400 voxels x 8 mm^3 = 1699 cc
    q = study_qa({"GTVp": gtv}, SP, phase_percents=PCTS)
    (text,) = _kinds(q)["volume_range"]
    assert text == "GTVp: 1699 cc in a phase, above the plausible 500 cc"
    assert q["structures"]["GTVp"]["volume_range_cc"] == [pytest.approx(1699.2)] * 2
    small = study_qa({"GTVp": _box(10, (20, 20, 20), (5, 5, 5))}, SP, phase_percents=PCTS)
    assert "volume_range" not in _kinds(small)


def test_heart_as_large_as_a_lung_is_flagged_and_overrides_apply() -> None:
    shape = (40, 80, 80)
    lung = _box(10, shape, (40, 40, 40))  # 512 cc
    heart = _box(10, shape, (40, 38, 40))  # 486 cc: 95 % of the lung
    q = study_qa({"Lung_L": lung, "Heart": heart}, SP, phase_percents=PCTS)
    assert _kinds(q)["volume_ratio"] == ["Heart: 486 cc, 95% of Lung_L (max 80%)"]
    relaxed = QAParams.with_overrides(volume_ratio_max={"Heart": {"Lung_L": 1.0}})
    assert "volume_ratio" not in _kinds(study_qa({"Lung_L": lung, "Heart": heart}, SP, params=relaxed))
    narrow = QAParams.with_overrides(volume_cc={"Heart": (600.0, 900.0), "Lung_L": None})
    kinds = _kinds(study_qa({"Lung_L": lung, "Heart": heart}, SP, params=narrow))
    assert kinds["volume_range"] == ["Heart: 486 cc in a phase, below the plausible 600 cc"]
    with pytest.raises(ValueError):
        QAParams.with_overrides(volume_cc={"GTVp": (5.0, 1.0)})


def test_jumping_and_vanished_phases_are_flagged() -> None:
    shifts = [0, 1, 2, 3, 4, 5, 4, 3, 2, 1]
    gtv = _box(10, (60, 20, 20), (4, 4, 4), z0=20, shifts=shifts)
    assert "jump" not in _kinds(study_qa({"GTVp": gtv}, SP, phase_percents=PCTS))
    gtv[3] = False
    gtv[3, 50:54, :4, :4] = True  # phase 30 % binned far off the path
    gtv[7] = False  # phase 70 % vanished
    kinds = _kinds(study_qa({"GTVp": gtv}, SP, phase_percents=PCTS))
    (jump,) = kinds["jump"]  # the neighbours, measured against the jumped phase, may be flagged too
    assert jump.startswith("GTVp: centroid jump in phase(s) ") and "30%" in jump and "artifact" in jump
    assert kinds["vanished"] == ["GTVp: empty in phase(s) 70%"]


def test_volume_variation_and_itv_vs_largest_phase() -> None:
    shape = (80, 20, 20)
    gtv = np.zeros((10, *shape), bool)
    for p in range(10):
        size = 4 if p != 4 else 8  # one phase twice the size of the others
        gtv[p, 6 * p : 6 * p + size, :4, :4] = True  # moving 12 mm per phase: a long ITV
    env = {"ITV": gtv.any(axis=0)}
    q = study_qa({"GTVp": gtv}, SP, envelopes=env, phase_percents=PCTS, envelope_sources={"ITV": "GTVp"})
    kinds = _kinds(q)
    assert kinds["variation"] == ["GTVp: volume varies 100% over the phases (max 50%)"]
    assert q["envelopes"]["ITV"]["source"] == "GTVp"
    assert q["envelopes"]["ITV"]["largest_phase_cc"] == pytest.approx(1.024)
    assert q["envelopes"]["ITV"]["ratio_to_largest_phase"] == pytest.approx(42 / 8)  # 42 slices in the union
    assert kinds["envelope"] == ["ITV: 5.2x the largest GTVp phase (max 5x)"]
    motion = q["structures"]["GTVp"]["motion_mm"]
    assert motion["SI"] > 100 and motion["AP"] == 0 and motion["LR"] == 0


def test_phases_used_vs_expected() -> None:
    q = study_qa({"GTVp": _box(3, (20, 20, 20), (4, 4, 4))}, SP, phase_percents=[0.0, 30.0, 60.0])
    cycle_qa(q, 3, 10, [10, 20, 40, 50, 70, 80, 90], released=True)
    assert q["phases"] == {"used": 3, "expected": 10, "missing_percents": [10, 20, 40, 50, 70, 80, 90],
                           "complete": False, "released": True}
    assert q["warnings"][0] == "ITV from 3 of 10 phases (missing 10%, 20%, 40%, 50%, 70%, 80%, 90%)"
    full = cycle_qa(study_qa({}, SP), 10, 10)
    assert full["phases"]["complete"] and full["warnings"] == []

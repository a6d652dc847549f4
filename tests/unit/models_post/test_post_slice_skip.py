"""SAM 3 runs only on slices that can hold a structure (models.engine.prompt_slices), reported in the QA."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.engine import SkipParams, prompt_slices, segment_volume
from models.phantom import Phantom, make_phantom
from models.phantom_spec import PhantomSpec
from models.post.temporal import TemporalParams
from models.structures import default_structures

from .conftest import OracleSegmenter

STRUCTURES = ("Lung_L", "Lung_R", "Heart", "GTVp")


class Tall:
    """A phantom whose scan reaches well below the lungs, with slices of air beyond the patient."""

    def __init__(self, ph: Phantom) -> None:
        self.shape, self.spacing = ph.shape, ph.spacing
        self.hu = ph.hu.copy()
        noise = np.random.default_rng(0).normal(0, 20, size=self.hu[:, -3:].shape)
        self.hu[:, -3:] = np.rint(-1000 + noise).astype(self.hu.dtype)  # no body on the last slices
        self.masks = {n: ph.masks[n].copy() for n in STRUCTURES}
        for m in self.masks.values():
            m[:, -3:] = False


@pytest.fixture(scope="module")
def tall() -> Tall:
    return Tall(make_phantom(PhantomSpec.sized(rows=96, slices=60, n_phases=3, slice_thickness=5.0, seed=4)))


def _oracle(t: Tall) -> OracleSegmenter:
    m = t.masks
    by_prompt = {"lung": m["Lung_L"] | m["Lung_R"], "heart": m["Heart"], "lung tumor": m["GTVp"]}
    return OracleSegmenter(t.hu, by_prompt)


def test_every_slice_with_a_structure_is_kept(tall: Tall) -> None:
    for p in range(tall.shape[0]):
        keep = prompt_slices(tall.hu[p], tall.spacing, SkipParams())
        assert not keep[-3:].any()  # air only
        for name in STRUCTURES:
            zs = np.flatnonzero(tall.masks[name][p].any(axis=(1, 2)))
            assert keep[zs].all(), (p, name)
        assert (~keep).sum() >= 5  # the air, and the abdomen more than 20 mm below the lungs, are skipped


def test_no_lungs_means_every_body_slice() -> None:
    hu = np.full((6, 40, 40), -1000, np.int16)
    hu[1:5, 5:35, 5:35] = 40  # a solid block of tissue, no air inside
    keep = prompt_slices(hu, (5.0, 1.0, 1.0), SkipParams())
    assert keep.tolist() == [False, True, True, True, True, False]


def test_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match="slice-skip"):
        SkipParams(margin_mm=-1)


def test_engine_masks_unchanged_and_skips_reported(tall: Tall) -> None:
    specs = default_structures()
    temporal = TemporalParams(min_phases=2)
    all_seg = _oracle(tall)
    everything = segment_volume(tall.hu, tall.spacing, specs, all_seg, temporal, skip=None)
    seg = _oracle(tall)
    skipping = segment_volume(tall.hu, tall.spacing, specs, seg, temporal)
    for name in (*STRUCTURES, "External"):
        assert np.array_equal(skipping.masks[name], everything.masks[name]), name
    assert np.array_equal(skipping.envelopes["ITV"], everything.envelopes["ITV"])
    n_ph, nz = tall.shape[:2]
    report = json.loads(json.dumps(skipping.qa["sam3_slices"]))
    assert report["rule"]["margin_mm"] == SkipParams().margin_mm
    for prompt in ("lung", "heart", "lung tumor"):
        r = report["prompts"][prompt]
        assert r["slices"] == n_ph * nz and r["run"] + r["skipped"] == r["slices"]
        assert r["skipped"] >= 3 * n_ph
        assert len(r["skipped_per_phase"]) == n_ph
    assert sum(n for n, _ in seg.calls) == report["prompts"]["lung"]["run"]
    assert sum(n for n, _ in all_seg.calls) == n_ph * nz
    assert everything.qa["sam3_slices"]["prompts"]["lung"]["skipped"] == 0

"""Fixtures of the post-processing tests: a 6-phase small phantom, injected artifacts and an oracle segmenter.

The oracle stands in for SAM 3 *only in these tests*: it answers ``predict`` with known masks (phantom truth
plus injected artifacts), looked up by the bytes of each HU slice, so that the engine's orchestration
(prompt batching, laterality split, filtering, envelope, QA) is tested against exact expectations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import ndimage as ndi

from models.phantom import Phantom, make_phantom
from models.phantom_spec import PhantomSpec

PROMPT_OF = {"Lung_L": "lung", "Lung_R": "lung", "Heart": "heart", "GTVp": "lung tumor"}


@pytest.fixture(scope="session")
def phantom6() -> Phantom:
    ph = make_phantom(PhantomSpec.small(n_phases=6, seed=3))
    ph.hu  # noqa: B018 - materialise
    return ph


@dataclass
class Injected:
    """Noisy per-ROI masks and, per ROI, the voxels of every injected single-phase artifact."""

    masks: dict[str, np.ndarray]
    artifacts: dict[str, np.ndarray]  # bool (P, Z, Y, X): blob and speck voxels that must disappear
    dropped: tuple[str, int]


def inject_artifacts(ph: Phantom, seed: int = 0, noise: float = 0.15, specks_per_phase: int = 4) -> Injected:
    """One-phase blobs inside and outside the body, boundary noise, isolated specks, a dropped phase."""
    rng = np.random.default_rng(seed)
    gt = ph.masks
    n_ph, nz, ny, nx = ph.shape
    masks = {k: gt[k].copy() for k in PROMPT_OF}
    artifacts = {k: np.zeros(ph.shape, bool) for k in PROMPT_OF}
    cross = ndi.generate_binary_structure(3, 1)
    anything = np.zeros(ph.shape, bool)
    for k in PROMPT_OF:
        anything |= gt[k]
    for k, m in masks.items():
        for p in range(n_ph):
            surf = m[p] & ~ndi.binary_erosion(m[p], cross)
            shell = ndi.binary_dilation(m[p], cross) & ~m[p]
            m[p] &= ~(surf & (rng.random(surf.shape) < noise))
            m[p] |= shell & (rng.random(shell.shape) < noise)
            # isolated specks 2-3 voxels off the surface (never touching it or any other structure)
            near = ndi.binary_dilation(gt[k][p], cross, iterations=3) & ~ndi.binary_dilation(
                anything[p], np.ones((3, 3, 3), bool), iterations=2)
            cand = np.argwhere(near)
            for z, y, x in cand[rng.choice(len(cand), size=min(specks_per_phase, len(cand)), replace=False)]:
                if not ndi.binary_dilation(m[p], np.ones((3, 3, 3), bool))[z, y, x]:
                    m[p, z, y, x] = True
                    artifacts[k][p, z, y, x] = True
    body = gt["External"]
    # a blob outside the body (in the air in front of the chest) for "heart" in phase 1
    ys = np.flatnonzero(body[1].any(axis=(0, 2)))
    y0 = max(int(ys[0]) - 6, 1)
    artifacts["Heart"][1, nz // 2:nz // 2 + 2, y0:y0 + 3, nx // 2 - 2:nx // 2 + 2] = True
    # a blob inside the body (soft tissue beside the spine) for "lung tumor" in phase 2
    soft = body[2] & ~ndi.binary_dilation(anything[2], np.ones((3, 3, 3), bool), iterations=3)
    zc, yc, xc = np.argwhere(soft)[len(np.argwhere(soft)) // 2]
    blob = np.zeros((nz, ny, nx), bool)
    blob[zc - 1:zc + 1, yc - 1:yc + 2, xc - 1:xc + 2] = True
    artifacts["GTVp"][2] |= blob & soft
    # a blob in the wrong lung for "lung tumor" in phase 4
    lz, ly, lx = np.argwhere(gt["Lung_L"][4])[len(np.argwhere(gt["Lung_L"][4])) // 2]
    artifacts["GTVp"][4, lz - 1:lz + 1, ly - 1:ly + 1, lx - 1:lx + 1] = True
    for k in PROMPT_OF:
        masks[k] |= artifacts[k]
    # the heart is missed completely in phase 3
    masks["Heart"][3] = False
    artifacts["Heart"][3] = False
    return Injected(masks, artifacts, ("Heart", 3))


class OracleSegmenter:
    """Answers ``predict`` with known masks per prompt, looked up by each HU slice's bytes (tests only)."""

    def __init__(self, hu: np.ndarray, by_prompt: Mapping[str, np.ndarray]) -> None:
        self.calls: list[tuple[int, tuple[str, ...]]] = []
        self._index: dict[bytes, tuple[int, int]] = {}
        for p in range(hu.shape[0]):
            for z in range(hu.shape[1]):
                key = hashlib.sha1(np.ascontiguousarray(hu[p, z]).tobytes()).digest()
                assert key not in self._index, "phantom slices must be unique for the oracle"
                self._index[key] = (p, z)
        self._by_prompt = {k: np.asarray(v, bool) for k, v in by_prompt.items()}

    def predict(self, slices_hu: np.ndarray, prompts: Sequence[str],
                score_threshold: float | Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
        self.calls.append((len(slices_hu), tuple(prompts)))
        out = {p: np.zeros(slices_hu.shape, np.float32) for p in prompts}
        for i, s in enumerate(slices_hu):
            p, z = self._index[hashlib.sha1(np.ascontiguousarray(s).tobytes()).digest()]
            for prompt in prompts:
                out[prompt][i] = self._by_prompt[prompt][p, z]
        return out


def oracle_for(ph: Phantom, masks: Mapping[str, np.ndarray]) -> OracleSegmenter:
    by_prompt = {"lung": masks["Lung_L"] | masks["Lung_R"], "heart": masks["Heart"],
                 "lung tumor": masks["GTVp"]}
    return OracleSegmenter(ph.hu, by_prompt)


@pytest.fixture(scope="session")
def injected(phantom6: Phantom) -> Injected:
    return inject_artifacts(phantom6)

"""Envelope over phases: the ITV (internal target volume) of a structure is the union of its cleaned phases.

The union is taken voxel-wise on the common grid of the 4DCT (all phases share one frame of reference
and slice positions; the assembler rejects studies where they differ). No margin is added: a margin
(ITV -> PTV) is a planning decision that belongs to the treatment planning system.
"""

from __future__ import annotations

import numpy as np

from models.post.labels import bounding_box


def envelope(masks: np.ndarray) -> np.ndarray:
    """Union over the phase axis of a bool (P, Z, Y, X) stack -> bool (Z, Y, X)."""
    masks = np.asarray(masks)
    if masks.ndim != 4:
        raise ValueError(f"masks must be (phases, z, y, x), got shape {masks.shape}")
    out = np.zeros(masks.shape[1:], dtype=bool)
    box = bounding_box(masks)  # the union only needs the structure's box: cheap for a small tumour
    if box is None:
        return out
    region = out[box]
    for phase in masks:
        region |= phase[box]
    return out


def envelope_phases(masks: np.ndarray, phases: list[int] | None = None) -> np.ndarray:
    """Union over a subset of phases (e.g. exhale-only gating windows); all phases when ``phases`` is None."""
    masks = np.asarray(masks)
    if phases is None:
        return envelope(masks)
    bad = [p for p in phases if not 0 <= p < masks.shape[0]]
    if bad:
        raise ValueError(f"phase indices {bad} outside 0..{masks.shape[0] - 1}")
    return envelope(masks[sorted(set(phases))])

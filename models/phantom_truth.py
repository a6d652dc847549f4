"""The phantom's ground truth on disk: ``ground_truth.npz`` (bit-packed masks, ITV, grid) and
``ground_truth.json`` (the human-readable half); format in docs/phantom.md."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.phantom import Phantom
from models.phantom_spec import HU_MAX, HU_MIN, STRUCTURES

log = logging.getLogger(__name__)

GROUND_TRUTH_FORMAT = 1


@dataclass
class GroundTruth:
    """Ground truth read back by :func:`load_ground_truth` (same attribute names as :class:`Phantom`)."""

    masks: dict[str, np.ndarray]
    itv: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    phase_percents: tuple[float, ...]
    shape: tuple[int, int, int, int]
    tumour_centres: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def ground_truth_meta(phantom: Phantom) -> dict[str, Any]:
    """The human-readable half of the ground truth (ground_truth.json)."""
    s = phantom.spec
    centres = phantom.tumour_centres
    return {
        "format": GROUND_TRUTH_FORMAT,
        "generator": "itvnode phantom (models/phantom.py)",
        "structures": list(STRUCTURES),
        "itv_of": "GTVp",
        "shape_pzyx": list(phantom.shape),
        "spacing_zyx_mm": list(phantom.spacing),
        "origin_xyz_mm": list(phantom.origin),
        "image_orientation": [1, 0, 0, 0, 1, 0],
        "patient_position": "HFS",
        "axes": "arrays are (phase, z, y, x); x -> patient Left, y -> Posterior, z -> Superior (LPS)",
        "phase_percents": list(phantom.phase_percents),
        "inhale_fraction": [round(float(v), 6) for v in phantom.inhale],
        "end_inhale_phase_percent": phantom.phase_percents[int(np.argmax(phantom.inhale))],
        "end_exhale_phase_percent": phantom.phase_percents[int(np.argmin(phantom.inhale))],
        "breathing_model": {"name": "Lujan cos^2n", "n": s.breathing_n, "phi_rad": s.breathing_phi,
                            "formula": "z(t) = z0 - b*cos^(2n)(pi*t/tau - phi), t/tau = percent/100"},
        "tumour": {
            "radius_mm": s.tumour_radius_mm,
            "amplitude_mm": {"LR": s.tumour_lr_mm, "AP": s.tumour_ap_mm, "SI": s.tumour_amplitude_mm},
            "sampled_range_mm": {ax: round(float(np.ptp(centres[:, i])), 4)
                                 for i, ax in enumerate(("LR", "AP", "SI"))},
            "centres_xyz_mm": [[round(float(v), 4) for v in c] for c in centres],
            "location": "right lower lobe",
        },
        "diaphragm_amplitude_mm": s.diaphragm_amplitude_mm,
        "chest_wall_ap_mm": s.chest_ap_mm,
        "noise_hu": s.noise_hu,
        "psf_sigma_mm": s.psf_sigma_mm,
        "hu_range": [HU_MIN, HU_MAX],
        "seed": s.seed,
        "spec": dataclasses.asdict(s),
        "spec_digest": s.digest(),
    }


def save_ground_truth(phantom: Phantom, path: str | Path) -> Path:
    """Write ``ground_truth.npz`` + ``ground_truth.json`` into directory ``path``; returns the npz path.

    Masks are stored bit-packed along x (``np.packbits(mask, axis=-1)``); see docs/phantom.md.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    p, z, y, x = phantom.shape
    xb = (x + 7) // 8
    packed = {k: np.empty((p, z, y, xb), dtype=np.uint8) for k in STRUCTURES}
    for i in range(p):
        ph = phantom.phase_masks_packed(i)
        for k in STRUCTURES:
            packed[k][i] = ph[k]
    itv = np.bitwise_or.reduce(packed["GTVp"], axis=0)
    arrays: dict[str, np.ndarray] = {f"mask_{k}": v for k, v in packed.items()}
    arrays.update(
        itv=itv,
        structures=np.array(STRUCTURES),
        shape=np.array(phantom.shape, dtype=np.int64),
        spacing=np.array(phantom.spacing, dtype=np.float64),
        origin=np.array(phantom.origin, dtype=np.float64),
        phase_percents=np.array(phantom.phase_percents, dtype=np.float64),
        tumour_centres=phantom.tumour_centres.astype(np.float64),
    )
    npz = out / "ground_truth.npz"
    tmp = out / "ground_truth.tmp.npz"
    np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(npz)
    meta = ground_truth_meta(phantom)
    meta["volumes_cc"] = {
        k: [round(float(np.unpackbits(packed[k][i]).sum()) * _voxel_cc(phantom.spacing), 4) for i in range(p)]
        for k in STRUCTURES
    }
    meta["itv_cc"] = round(float(np.unpackbits(itv).sum()) * _voxel_cc(phantom.spacing), 4)
    (out / "ground_truth.json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info("ground truth written to %s", out)
    return npz


def _voxel_cc(spacing: tuple[float, float, float]) -> float:
    return math.prod(spacing) / 1000.0


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read a directory written by :func:`save_ground_truth` (or its ``ground_truth.npz``)."""
    p = Path(path)
    npz = p / "ground_truth.npz" if p.is_dir() else p
    meta_path = npz.with_name("ground_truth.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    with np.load(npz, allow_pickle=False) as data:
        shape = tuple(int(v) for v in data["shape"])
        x = shape[3]
        names = [str(n) for n in data["structures"]]
        masks = {n: np.unpackbits(data[f"mask_{n}"], axis=-1, count=x).astype(bool) for n in names}
        itv = np.unpackbits(data["itv"], axis=-1, count=x).astype(bool)
        return GroundTruth(
            masks=masks,
            itv=itv,
            spacing=tuple(float(v) for v in data["spacing"]),  # type: ignore[arg-type]
            origin=tuple(float(v) for v in data["origin"]),  # type: ignore[arg-type]
            phase_percents=tuple(float(v) for v in data["phase_percents"]),
            shape=shape,  # type: ignore[arg-type]
            tumour_centres=np.array(data["tumour_centres"]),
            meta=meta,
        )

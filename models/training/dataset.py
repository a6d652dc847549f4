"""Annotated volumes -> 2D slice samples, one per (slice, structure prompt); patient-level split.

A *volume* is one 3D CT (one phase of a 4DCT counts as a volume) with boolean masks per structure. A
*target* is what the model learns for one text prompt: the union of one or more mask names (the prompt
``lung`` covers ``Lung_L`` and ``Lung_R``, which the engine splits by laterality afterwards). Every slice of
every volume gives one sample per target: *positive* when the target has at least ``min_pixels`` pixels on
that slice, *negative* (presence target 0) otherwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from models.structures import StructureSpec


@dataclass
class AnnotatedVolume:
    """One annotated 3D CT: HU (Z, Y, X), bool masks (Z, Y, X) per structure name, spacing (dz, dy, dx)."""

    name: str
    group: str  # patient (or any unit that must not straddle train / validation)
    hu: np.ndarray
    masks: dict[str, np.ndarray]
    spacing: tuple[float, float, float]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"volume {self.name}: hu must be (Z, Y, X), got shape {self.hu.shape}")
        for k, m in self.masks.items():
            if m.shape != self.hu.shape:
                raise ValueError(f"volume {self.name}: mask {k} has shape {m.shape}, hu {self.hu.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"volume {self.name}: spacing must be three positive values")

    def image_digest(self) -> str:
        """sha256 of the CT alone (:func:`image_digest`): the same image is a leak whatever its contours."""
        return image_digest(self.hu, self.spacing)

    def digest(self) -> str:
        """sha256 over HU, spacing and the masks (sorted by name): identifies the training data."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.hu).tobytes())
        h.update(repr(tuple(round(float(s), 6) for s in self.spacing)).encode())
        for k in sorted(self.masks):
            h.update(k.encode())
            h.update(np.packbits(np.asarray(self.masks[k], dtype=bool)).tobytes())
        return h.hexdigest()


def image_digest(hu: np.ndarray, spacing: Sequence[float]) -> str:
    """sha256 over one 3D CT's shape, HU values (as float32, so int16 and float readers agree) and spacing
    (rounded to 0.1 µm, so DS-formatted and computed spacings agree). ``training.json`` stores it per volume
    (``image_sha256``); ``itvnode evaluate`` uses it to find evaluation volumes that were trained on."""
    a = np.ascontiguousarray(np.asarray(hu, dtype=np.float32))
    h = hashlib.sha256()
    h.update(repr(a.shape).encode())
    h.update(a.tobytes())
    h.update(repr(tuple(round(float(s), 4) for s in spacing)).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Target:
    """What one text prompt must segment: the union of ``masks`` (structure names of the volumes)."""

    name: str
    prompt: str
    masks: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError(f"target {self.name}: empty prompt")
        if not self.masks:
            raise ValueError(f"target {self.name}: no mask names")

    def mask_of(self, volume: AnnotatedVolume) -> np.ndarray:
        missing = [m for m in self.masks if m not in volume.masks]
        if missing:
            raise KeyError(f"volume {volume.name} has no mask {missing} for target {self.name}")
        out = np.zeros(volume.hu.shape, dtype=bool)
        for m in self.masks:
            out |= np.asarray(volume.masks[m], dtype=bool)
        return out


def targets_from_specs(specs: Iterable[StructureSpec]) -> list[Target]:
    """One target per SAM 3 structure: a laterality-split spec learns the union of ``<name>_L``/``_R``."""
    out = []
    for s in specs:
        if s.method != "sam3":
            continue
        out.append(Target(s.name, s.prompt, s.output_names))
    return out


@dataclass(frozen=True)
class SliceSample:
    """One training example: slice ``z`` of volume ``volume`` with the prompt of target ``target``."""

    volume: int
    z: int
    target: int
    positive: bool


def build_samples(
    volumes: Sequence[AnnotatedVolume], targets: Sequence[Target], indices: Iterable[int], min_pixels: int = 1
) -> list[SliceSample]:
    """Samples of the volumes ``indices``: every slice x every target, positive or negative."""
    out: list[SliceSample] = []
    for v in indices:
        vol = volumes[v]
        for t, target in enumerate(targets):
            counts = target.mask_of(vol).sum(axis=(1, 2))
            for z in range(vol.hu.shape[0]):
                out.append(SliceSample(v, z, t, bool(counts[z] >= min_pixels)))
    return out


def split_by_group(
    volumes: Sequence[AnnotatedVolume],
    val_fraction: float = 0.2,
    seed: int = 0,
    val_groups: Sequence[str] | None = None,
) -> tuple[list[int], list[int]]:
    """(train, validation) volume indices; all volumes of one group land on the same side.

    ``val_groups`` names the validation groups explicitly; otherwise ``round(val_fraction * groups)`` groups
    (at least one when there are two or more groups and ``val_fraction > 0``) are drawn with ``seed``.
    """
    groups = sorted({v.group for v in volumes})
    if val_groups is not None:
        unknown = sorted(set(val_groups) - set(groups))
        if unknown:
            raise ValueError(f"validation groups {unknown} are not among the volumes' groups {groups}")
        val = set(val_groups)
    else:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n_val = int(round(val_fraction * len(groups)))
        if val_fraction > 0 and len(groups) >= 2:
            n_val = min(max(n_val, 1), len(groups) - 1)
        rng = np.random.default_rng(seed)
        val = {groups[i] for i in rng.permutation(len(groups))[:n_val]}
    train_idx = [i for i, v in enumerate(volumes) if v.group not in val]
    val_idx = [i for i, v in enumerate(volumes) if v.group in val]
    if not train_idx:
        raise ValueError("the split leaves no training volume")
    return train_idx, val_idx


def phantom_volumes(
    hu: np.ndarray,
    masks: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    phase_percents: Sequence[float],
    patient: str = "phantom",
    group_by: Literal["patient", "phase"] = "patient",
) -> list[AnnotatedVolume]:
    """Phases of a phantom (or any annotated 4DCT as arrays) as volumes.

    ``hu`` (P, Z, Y, X), ``masks`` name -> bool (P, Z, Y, X). ``group_by="phase"`` makes every phase its own
    split group (to hold out phases of one patient, as for the phantom); the default keeps a patient together.
    """
    if hu.ndim != 4:
        raise ValueError(f"hu must be (P, Z, Y, X), got {hu.shape}")
    sp = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    out = []
    for p in range(hu.shape[0]):
        label = f"P{phase_percents[p]:g}"
        group = patient if group_by == "patient" else f"{patient}/{label}"
        out.append(
            AnnotatedVolume(
                name=f"{patient}/{label}",
                group=group,
                hu=np.asarray(hu[p]),
                masks={k: np.asarray(m[p], dtype=bool) for k, m in masks.items()},
                spacing=sp,
                meta={"phase_percent": float(phase_percents[p])},
            )
        )
    return out

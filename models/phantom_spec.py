"""What the analytic phantom (models/phantom.py) is asked to be: :class:`PhantomSpec`, its structures and HU
range, and the Lujan breathing curve it moves with (:func:`lujan`, :func:`amplitude_bins`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

STRUCTURES: tuple[str, ...] = ("External", "Lung_L", "Lung_R", "Heart", "GTVp")
HU_MIN, HU_MAX = -1024, 3071  # what 12-bit unsigned storage with intercept -1024 can carry


@dataclass(frozen=True)
class PhantomSpec:
    """What to generate. All lengths in mm. ``shape`` is ``(slices, rows, columns)``."""

    n_phases: int = 10
    shape: tuple[int, int, int] = (120, 512, 512)
    pixel_spacing: tuple[float, float] = (500.0 / 512, 500.0 / 512)  # (row = dy, column = dx)
    slice_thickness: float = 2.5  # also the slice spacing
    origin: tuple[float, float, float] | None = None  # (x, y, z) of voxel 0; None: centred, off-grid
    z_center_mm: float | None = None  # None: whole thorax if it fits, else centred on the tumour path
    tumour_radius_mm: float = 12.0
    tumour_amplitude_mm: float = 15.0  # SI peak-to-peak, end-inhale to end-exhale
    tumour_ap_mm: float = 3.0  # anterior at inhale
    tumour_lr_mm: float = 1.0  # towards patient left at inhale
    diaphragm_amplitude_mm: float = 20.0
    chest_ap_mm: float = 6.0  # anterior chest wall excursion
    breathing_n: int = 2  # Lujan exponent n in cos^(2n)
    breathing_phi: float = 0.0  # radians
    noise_hu: float = 20.0  # Gaussian sigma
    psf_sigma_mm: float = 0.7  # in-plane blur before noise (0: none)
    arms: bool = False  # arms beside the torso (separate External components)
    vessels: int = 24  # pulmonary vessel segments per lung (HU texture only; 0: none)
    seed: int = 0  # noise and vessel pattern
    # "phase": phases at equal times t = 0, 100/P, ... % (0 % = end-inhale). "amplitude": Siemens-style
    # amplitude binning, phases at the times the breathing amplitude crosses 0, 200/P, ... 100 % (inhale,
    # from end-exhale) and back down (exhale), in that breathing order; P must be even (see amplitude_bins)
    sampling: str = "phase"

    def __post_init__(self) -> None:
        z, y, x = self.shape
        if self.n_phases < 1 or self.n_phases > 100:
            raise ValueError(f"n_phases must be 1-100, got {self.n_phases}")
        if self.sampling not in ("phase", "amplitude"):
            raise ValueError(f"sampling must be 'phase' or 'amplitude', got {self.sampling!r}")
        if self.sampling == "amplitude" and (self.n_phases < 2 or self.n_phases % 2):
            raise ValueError(f"amplitude sampling needs an even number of phases >= 2, got {self.n_phases}")
        if z < 1 or y < 8 or x < 8:
            raise ValueError(f"shape {self.shape} too small (need >= 1 slice and >= 8 x 8 pixels)")
        if min(self.pixel_spacing) <= 0 or self.slice_thickness <= 0:
            raise ValueError("pixel_spacing and slice_thickness must be positive")
        if not 2.0 <= self.tumour_radius_mm <= 30.0:
            raise ValueError(f"tumour_radius_mm must be 2-30 mm, got {self.tumour_radius_mm}")
        if not 0.0 <= self.tumour_amplitude_mm <= 30.0:
            raise ValueError(f"tumour_amplitude_mm must be 0-30 mm, got {self.tumour_amplitude_mm}")
        if abs(self.tumour_ap_mm) > 10 or abs(self.tumour_lr_mm) > 10:
            raise ValueError("tumour_ap_mm / tumour_lr_mm must be within +-10 mm")
        if not 0.0 <= self.diaphragm_amplitude_mm <= 40.0 or not 0.0 <= self.chest_ap_mm <= 20.0:
            raise ValueError("diaphragm_amplitude_mm must be 0-40 and chest_ap_mm 0-20")
        if self.breathing_n < 1:
            raise ValueError("breathing_n must be >= 1")
        if self.noise_hu < 0 or self.psf_sigma_mm < 0 or self.vessels < 0:
            raise ValueError("noise_hu, psf_sigma_mm and vessels must be >= 0")

    @classmethod
    def full(cls, **overrides: Any) -> PhantomSpec:
        """Clinical geometry: 10 phases x 120 slices x 512 x 512, 0.98 mm pixels, 2.5 mm slices."""
        return cls(**overrides)

    @classmethod
    def small(cls, **overrides: Any) -> PhantomSpec:
        """Fast tests: 4 phases x 24 slices x 96 x 96 (same 500 mm field of view, 5 mm slices)."""
        base: dict[str, Any] = dict(n_phases=4, shape=(24, 96, 96), pixel_spacing=(500 / 96, 500 / 96),
                                    slice_thickness=5.0)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def sized(cls, rows: int, slices: int, fov_mm: float = 500.0, **overrides: Any) -> PhantomSpec:
        """Square ``rows`` x ``rows`` images over ``fov_mm``; ``slices`` at the given slice_thickness."""
        d = fov_mm / rows
        return cls(**{"shape": (slices, rows, rows), "pixel_spacing": (d, d), **overrides})

    def digest(self) -> str:
        """Short stable hash of every field (default UID seed, cache keys)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]



def amplitude_bins(n_phases: int, n: int = 2, phi: float = 0.0) -> list[tuple[float, float, str]]:
    """Amplitude binning of the Lujan curve: ``(time percent, amplitude percent, "In" | "Ex")`` per phase in
    breathing order: inhale from end-exhale (amplitude 0) up to end-inhale (100) in steps of
    ``200 / n_phases``, then exhale back down (the end points are not repeated). Amplitude = inhale fraction.
    """
    step = 200.0 / n_phases
    half = n_phases // 2
    out: list[tuple[float, float, str]] = []
    for k in range(half + 1):  # In: 0, step, ... 100
        a = k * step
        t = 100.0 - 100.0 / np.pi * (float(np.arccos((a / 100.0) ** (1.0 / (2 * n)))) - phi)
        out.append((t % 100.0, a, "In"))
    for k in range(half - 1, 0, -1):  # Ex: 100 - step ... step
        a = k * step
        t = 100.0 / np.pi * (float(np.arccos((a / 100.0) ** (1.0 / (2 * n)))) + phi)
        out.append((t % 100.0, a, "Ex"))
    return out


def lujan(percent: float | np.ndarray, n: int = 2, phi: float = 0.0) -> np.ndarray:
    """Inhale fraction s = cos^(2n)(pi t/tau - phi) in [0, 1] (1: end-inhale) at phase ``percent``."""
    return np.asarray(np.cos(np.pi * np.asarray(percent, dtype=np.float64) / 100.0 - phi) ** (2 * n))


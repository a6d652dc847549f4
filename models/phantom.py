"""Analytic breathing-thorax phantom: a synthetic 4DCT with exact ground truth.

Every structure is a closed-form shape in patient coordinates (LPS, mm) and its mask is the voxel-centre
inside test, so the ground truth is exact; the HU volume is painted from those masks, blurred by a small
Gaussian PSF and given Gaussian noise. Breathing follows Lujan et al. (Med. Phys. 1999):
``z(t) = z0 - b * cos^(2n)(pi * t / tau - phi)``; with ``phi = 0`` phase 0 % is end-inhale (tumour and
diaphragm lowest) and 50 % end-exhale (``z = z0``).

Volumes are generated phase by phase on demand (a full 10 x 120 x 512 x 512 study never needs all HU phases
in memory); masks of every generated phase are kept bit-packed. Axes follow docs/internal-api.md:
``(phases, z, y, x)``, x towards patient Left, y towards Posterior, z towards Superior; ``origin`` is
``(x, y, z)`` of voxel ``(0, 0, 0)``.

The spec and breathing curve are models/phantom_spec.py, the ground-truth files models/phantom_truth.py. The
anatomy is one class whose methods share its coordinate grids, so it stays whole here (just over 400 lines).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from models.phantom_spec import HU_MAX, HU_MIN, STRUCTURES, PhantomSpec, amplitude_bins, lujan

log = logging.getLogger(__name__)

# Anatomy, mm, LPS. Body centred on x = 0; the back lies on the table at y = +100.
_BODY_AX = 165.0  # LR semi-axis of the torso
_BODY_POST = 110.0  # posterior end of the torso ellipse (cut flat by the table)
_TABLE_Y = 100.0
_BODY_ANT = -110.0  # anterior surface at end-exhale
_FAT = 12.0  # subcutaneous fat thickness
_RIB_IN = 22.0  # ribs lie between _FAT and _RIB_IN below the skin
_LUNG_IN = 30.0  # lungs start this far below the skin
_MEDIASTINUM = 25.0  # |x| below this is mediastinum
_LUNG_APEX = 125.0
_LUNG_TAPER = 40.0  # above this z the lung cross-section tapers to the apex
_DOME = {"R": (-75.0, -55.0), "L": (75.0, -65.0)}  # side: (x of dome top, z of dome top at end-exhale)
_DOME_K = 0.006  # mm^-1: how fast the diaphragm falls away from the dome top
_TUMOUR_XY = (-80.0, 30.0)  # right lower lobe, posterior
_TUMOUR_MARGIN = 8.0  # min gap between tumour and diaphragm
_HEART_C = (30.0, -25.0, -25.0)
_HEART_R = (58.0, 42.0, 45.0)
_AORTA = (20.0, 50.0, 11.0)  # x, y, radius (descending aorta)
_TRACHEA = (0.0, -5.0, 9.0, 30.0)  # x, y, radius, carina z
_SPINE = (0.0, 60.0, 16.0)  # vertebral body x, y, radius
_ARM = (208.0, 0.0, 34.0, 40.0)  # |x|, y, semi-axes

HU = {
    "air": -1000.0, "fat": -100.0, "soft": 40.0, "liver": 60.0, "abdomen": 35.0, "bone": 700.0,
    "cancellous": 420.0, "disc": 80.0, "sternum": 400.0, "csf": 15.0, "lung": -850.0, "blood": 45.0,
    "heart": 48.0, "tumour": 30.0,
}



@dataclass
class PhantomPhase:
    """One generated phase: ``hu`` int16 (Z, Y, X) and exact masks."""

    index: int
    percent: float
    hu: np.ndarray
    masks: dict[str, np.ndarray]



class Phantom:
    """A breathing thorax. Phases are generated on demand; ``hu``/``masks``/``itv`` materialise all phases."""

    def __init__(self, spec: PhantomSpec) -> None:
        self.spec = spec
        p = spec.n_phases
        z, y, x = spec.shape
        self.shape: tuple[int, int, int, int] = (p, z, y, x)
        self.spacing: tuple[float, float, float] = (
            float(spec.slice_thickness), float(spec.pixel_spacing[0]), float(spec.pixel_spacing[1]))
        if spec.sampling == "amplitude":
            self.phase_percents: tuple[float, ...] = tuple(
                round(t, 4) for t, _, _ in amplitude_bins(p, spec.breathing_n, spec.breathing_phi))
        else:
            self.phase_percents = tuple(round(100.0 * i / p, 4) for i in range(p))
        self.inhale = lujan(np.array(self.phase_percents), spec.breathing_n, spec.breathing_phi)
        self._tumour_z0 = self._tumour_exhale_z()
        self._vessel_tree = self._make_vessels()
        self.origin: tuple[float, float, float] = spec.origin or self._default_origin()
        dz, dy, dx = self.spacing
        ox, oy, oz = self.origin
        self._x = (ox + dx * np.arange(x)).astype(np.float64)
        self._y = (oy + dy * np.arange(y)).astype(np.float64)
        self._z = (oz + dz * np.arange(z)).astype(np.float64)
        self._packed: dict[int, dict[str, np.ndarray]] = {}
        self._hu_cache: dict[int, np.ndarray] = {}
        # keep every phase's HU when the whole 4D volume is small, else only the latest one
        self._hu_cache_all = p * z * y * x * 2 <= 64 * 1024**2
        self._hu_all: np.ndarray | None = None
        self._masks_all: dict[str, np.ndarray] | None = None

    # geometry ----------------------------------------------------------------------------------------------

    def _tumour_exhale_z(self) -> float:
        """Exhale z of the tumour centre: clear of the right dome by a margin in every phase."""
        s = self.spec
        tx, ty = _TUMOUR_XY
        dome = self._dome_z("R", tx, ty, 0.0)
        extra = max(0.0, s.tumour_amplitude_mm - s.diaphragm_amplitude_mm)
        return float(dome + _TUMOUR_MARGIN + s.tumour_radius_mm + extra)

    def _default_origin(self) -> tuple[float, float, float]:
        s = self.spec
        z, y, x = s.shape
        dz, dy, dx = self.spacing
        extent = z * dz
        if s.z_center_mm is not None:
            zc = s.z_center_mm
        elif extent >= 260.0:
            zc = -10.0  # lungs, diaphragm and upper abdomen
        else:
            zc = self._tumour_z0 - s.tumour_amplitude_mm / 2 - 0.25 * max(0.0, extent - 80.0)
        # off-grid by 0.3 mm, as scanners do
        return (-(x - 1) * dx / 2 - 0.3, -(y - 1) * dy / 2 - 0.3, zc - (z - 1) * dz / 2 - 0.3)

    def _dome_z(self, side: str, x: Any, y: Any, inhale: float) -> Any:
        xc, z0 = _DOME[side]
        return z0 - self.spec.diaphragm_amplitude_mm * inhale - _DOME_K * ((x - xc) ** 2 + y ** 2)

    def tumour_centre(self, phase: int) -> tuple[float, float, float]:
        """Tumour centre (x, y, z) in mm at ``phase``."""
        s = self.spec
        f = float(self.inhale[phase])
        return (_TUMOUR_XY[0] + s.tumour_lr_mm * f, _TUMOUR_XY[1] - s.tumour_ap_mm * f,
                self._tumour_z0 - s.tumour_amplitude_mm * f)

    @property
    def tumour_centres(self) -> np.ndarray:
        """(P, 3) tumour centres (x, y, z) in mm."""
        return np.array([self.tumour_centre(i) for i in range(self.spec.n_phases)])

    def slice_positions(self) -> np.ndarray:
        """(Z, 3) ImagePositionPatient of every slice."""
        ox, oy, _ = self.origin
        return np.stack([np.full_like(self._z, ox), np.full_like(self._z, oy), self._z], axis=1)

    # generation --------------------------------------------------------------------------------------------

    def phase(self, index: int) -> PhantomPhase:
        """Generate (or fetch) one phase."""
        if not 0 <= index < self.spec.n_phases:
            raise IndexError(f"phase {index} outside 0..{self.spec.n_phases - 1}")
        if self._hu_all is not None and self._masks_all is not None:
            return PhantomPhase(index, self.phase_percents[index], self._hu_all[index],
                                {k: v[index] for k, v in self._masks_all.items()})
        if index in self._hu_cache and index in self._packed:
            return PhantomPhase(index, self.phase_percents[index], self._hu_cache[index],
                                self._unpack_phase(index))
        hu, masks = self._generate(index)
        if not self._hu_cache_all:
            self._hu_cache.clear()
        self._hu_cache[index] = hu
        self._packed[index] = {k: np.packbits(v, axis=-1) for k, v in masks.items()}
        return PhantomPhase(index, self.phase_percents[index], hu, masks)

    def phase_hu(self, index: int) -> np.ndarray:
        """int16 HU (Z, Y, X) of one phase."""
        return self.phase(index).hu

    def phase_masks_packed(self, index: int) -> dict[str, np.ndarray]:
        """Bit-packed masks of one phase (``np.packbits(mask, axis=-1)``), generating it if needed."""
        if index not in self._packed:
            self.phase(index)
        return self._packed[index]

    def _unpack_phase(self, index: int) -> dict[str, np.ndarray]:
        x = self.shape[3]
        return {k: np.unpackbits(v, axis=-1, count=x).astype(bool) for k, v in self._packed[index].items()}

    @property
    def hu(self) -> np.ndarray:
        """int16 HU (P, Z, Y, X) of every phase (materialised on first use)."""
        self._materialise()
        assert self._hu_all is not None
        return self._hu_all

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Exact bool masks (P, Z, Y, X) per structure name in :data:`STRUCTURES`."""
        self._materialise()
        assert self._masks_all is not None
        return self._masks_all

    @property
    def itv(self) -> np.ndarray:
        """bool (Z, Y, X): union of GTVp over all phases (from packed masks; no 4D materialisation)."""
        acc: np.ndarray | None = None
        for i in range(self.spec.n_phases):
            g = self.phase_masks_packed(i)["GTVp"]
            acc = g.copy() if acc is None else np.bitwise_or(acc, g, out=acc)
        assert acc is not None
        return np.unpackbits(acc, axis=-1, count=self.shape[3]).astype(bool)

    def _materialise(self) -> None:
        if self._hu_all is not None:
            return
        hu = np.empty(self.shape, dtype=np.int16)
        masks = {k: np.empty(self.shape, dtype=bool) for k in STRUCTURES}
        for i in range(self.spec.n_phases):
            ph = self.phase(i)
            hu[i] = ph.hu
            for k in STRUCTURES:
                masks[k][i] = ph.masks[k]
        self._hu_all, self._masks_all = hu, masks
        self._hu_cache.clear()

    def _generate(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        s = self.spec
        f = float(self.inhale[index])
        z, y, x = s.shape
        X = self._x[None, :]
        Y = self._y[:, None]
        Z = self._z
        dz, dy, dx = self.spacing

        # torso (2D, the same on every slice): anterior wall moves forward at inhale
        ant = _BODY_ANT - s.chest_ap_mm * f
        cy = (ant + _BODY_POST) / 2
        ay = (_BODY_POST - ant) / 2

        def ell(inset: float) -> np.ndarray:
            ax_, ay_ = _BODY_AX - inset, ay - inset
            return np.asarray(((X / ax_) ** 2 + ((Y - cy) / ay_) ** 2 <= 1.0) & (Y <= _TABLE_Y - inset))

        body = ell(0.0)
        inner = ell(_FAT)
        rib_ring = inner & ~ell(_RIB_IN)
        arms = np.zeros((y, x), dtype=bool)
        humerus = np.zeros((y, x), dtype=bool)
        if s.arms:
            axa, aya = _ARM[2], _ARM[3]
            for sign in (-1.0, 1.0):
                cx = sign * _ARM[0]
                arms |= ((X - cx) / axa) ** 2 + ((Y - _ARM[1]) / aya) ** 2 <= 1.0
                humerus |= (X - cx) ** 2 + (Y - _ARM[1]) ** 2 <= 10.0 ** 2
        external2d = body | arms

        hu = np.full((z, y, x), HU["air"], dtype=np.float32)
        hu[:, external2d] = HU["fat"]
        hu[:, inner] = HU["soft"]
        if s.arms:
            arm_inner = np.zeros((y, x), dtype=bool)
            for sign in (-1.0, 1.0):
                cx = sign * _ARM[0]
                arm_inner |= ((X - cx) / (_ARM[2] - 8)) ** 2 + ((Y - _ARM[1]) / (_ARM[3] - 8)) ** 2 <= 1.0
            hu[:, arm_inner] = HU["soft"]
            hu[:, humerus] = HU["bone"]

        # abdomen below the diaphragm: liver on the right, softer organs on the left
        dome = np.where(X < 0, self._dome_z("R", X, Y, f), self._dome_z("L", X, Y, f))  # (Y, X)
        below = Z[:, None, None] < dome[None]
        abd = below & inner[None]
        hu[abd & (X < 0)[None]] = HU["liver"]
        hu[abd & (X >= 0)[None]] = HU["abdomen"]

        # ribs every 25 mm (8 mm high) over the chest, open at the sternum; sternum moves with the wall
        rib_z = ((Z - 3.0) % 25.0 < 8.0) & (Z > -110.0) & (Z < _LUNG_APEX + 10)
        rib2d = rib_ring & ~((np.abs(X) < 30) & (Y < cy))
        hu[rib_z[:, None, None] & rib2d[None]] = HU["bone"]
        sternum = ((X / 14.0) ** 2 + ((Y - (ant + _FAT + 8)) / 7.0) ** 2 <= 1.0) & inner
        hu[:, sternum] = HU["sternum"]

        # spine: vertebral body with discs, posterior elements around the canal
        sx, sy, sr = _SPINE
        vb = ((X - sx) ** 2 + (Y - sy) ** 2 <= sr ** 2) & inner
        post = (((X - sx) / 24.0) ** 2 + ((Y - (sy + 20)) / 8.0) ** 2 <= 1.0) & ~vb & inner
        canal = ((X - sx) ** 2 + (Y - (sy + 18)) ** 2 <= 6.0 ** 2) & inner
        disc_z = (Z % 30.0) < 6.0
        hu[:, vb] = HU["cancellous"]
        hu[disc_z[:, None, None] & vb[None]] = HU["disc"]
        hu[:, post] = HU["bone"]
        hu[:, canal] = HU["csf"]

        # lungs: torso inset by _LUNG_IN, tapering to the apex, above the diaphragm, outside the mediastinum
        lax, lay = _BODY_AX - _LUNG_IN, ay - _LUNG_IN
        q = (X / lax) ** 2 + ((Y - cy) / lay) ** 2  # (Y, X)
        taper = np.clip((Z - _LUNG_TAPER) / (_LUNG_APEX - _LUNG_TAPER), 0.0, 1.0)
        f2 = 1.0 - taper ** 2  # squared scale of the cross-section
        spine_zone = (np.abs(X) < 45.0) & (Y > 40.0)
        lung2d_ok = (np.abs(X) > _MEDIASTINUM) & ~spine_zone & (Y < _TABLE_Y - _LUNG_IN)
        lung = (q[None] <= f2[:, None, None]) & lung2d_ok[None] & ~below & (Z < _LUNG_APEX)[:, None, None]

        # mediastinal vessels/airway painted into soft tissue (never lung)
        axx, axy, ar = _AORTA
        aorta = (X - axx) ** 2 + (Y - axy) ** 2 <= ar ** 2
        tx_, ty_, tr, carina = _TRACHEA
        trachea2d = (X - tx_) ** 2 + (Y - ty_) ** 2 <= tr ** 2

        # heart: ellipsoid resting on the diaphragm, follows it by 30 %
        hx, hy, hz = _HEART_C
        hz = hz - 0.3 * s.diaphragm_amplitude_mm * f
        hrx, hry, hrz = _HEART_R
        heart = self._ellipsoid((hx, hy, hz), (hrx, hry, hrz))

        # tumour: sphere, moving along Lujan's curve
        tc = self.tumour_centre(index)
        r = s.tumour_radius_mm
        gtv = self._ellipsoid(tc, (r, r, r))

        lung_l = lung & (X > 0)[None] & ~heart & ~gtv
        lung_r = lung & (X < 0)[None] & ~heart & ~gtv

        # lung density: lower at inhale, a little higher posteriorly (gravity)
        lung_hu = (HU["lung"] - 40.0 * f + 40.0 * np.clip((Y - cy) / lay, -1, 1)).astype(np.float32)  # (Y, 1)
        lung_any = lung_l | lung_r
        hu[lung_any] = np.broadcast_to(lung_hu[None], hu.shape)[lung_any]
        self._paint_vessels(hu, lung_any, f)
        hu[:, aorta & inner] = HU["blood"]
        trach_z = Z > carina
        hu[trach_z[:, None, None] & trachea2d[None]] = HU["air"]
        # epicardial fat outlines the heart against the mediastinum, as on real CT
        shell = self._ellipsoid((hx, hy, hz), (hrx + 5.0, hry + 5.0, hrz + 5.0)) & ~lung_any & ~heart
        hu[shell] = HU["fat"]
        hu[heart] = HU["heart"]
        hu[gtv] = HU["tumour"]

        # scanner: in-plane PSF then noise, deterministic per (seed, phase)
        if s.psf_sigma_mm > 0:
            sig = (0.0, s.psf_sigma_mm / dy, s.psf_sigma_mm / dx)
            if max(sig) >= 0.2:
                hu = ndimage.gaussian_filter(hu, sigma=sig, mode="nearest", truncate=3.0)
        if s.noise_hu > 0:
            rng = np.random.default_rng([s.seed, index])
            noise = rng.standard_normal(hu.shape, dtype=np.float32)
            noise *= np.float32(s.noise_hu)
            hu += noise
            del noise
        np.clip(hu, HU_MIN, HU_MAX, out=hu)
        out = np.rint(hu).astype(np.int16)

        external = np.broadcast_to(external2d[None], (z, y, x)).copy()
        masks = {"External": external, "Lung_L": lung_l, "Lung_R": lung_r, "Heart": heart, "GTVp": gtv}
        log.debug("phantom phase %d (%.1f%%) generated", index, self.phase_percents[index])
        return out, masks

    def _make_vessels(self) -> np.ndarray:
        """(N, 7) segments ``x0 y0 z0 x1 y1 z1 radius`` at end-exhale, branching from each hilum."""
        s = self.spec
        rng = np.random.default_rng([s.seed, 1])
        segs: list[list[float]] = []
        for sign in (-1.0, 1.0):
            hilum = np.array([sign * 38.0, 0.0, -5.0])
            made = 0
            for _ in range(50 * max(1, s.vessels)):
                if made >= s.vessels:
                    break
                end = np.array([sign * rng.uniform(45, 125), rng.uniform(-60, 60), rng.uniform(-60, 95)])
                if not self._in_lung_exhale(end, margin=8.0):
                    continue
                mid = hilum + (end - hilum) * rng.uniform(0.35, 0.6) + rng.normal(0, 6, 3)
                r = rng.uniform(1.2, 2.6)
                segs.append([*hilum, *mid, r + 0.8])
                segs.append([*mid, *end, r])
                made += 1
        return np.array(segs, dtype=np.float64).reshape(-1, 7)

    def _in_lung_exhale(self, p: np.ndarray, margin: float) -> bool:
        x, y, z = (float(v) for v in p)
        cy, ay = (_BODY_ANT + _BODY_POST) / 2, (_BODY_POST - _BODY_ANT) / 2
        lax, lay = _BODY_AX - _LUNG_IN - margin, ay - _LUNG_IN - margin
        taper = min(max((z - _LUNG_TAPER) / (_LUNG_APEX - _LUNG_TAPER), 0.0), 1.0)
        dome = float(self._dome_z("R" if x < 0 else "L", x, y, 0.0))
        inside = (x / lax) ** 2 + ((y - cy) / lay) ** 2 <= 1.0 - taper ** 2
        return bool(inside and abs(x) > _MEDIASTINUM + margin and z > dome + margin
                    and not (abs(x) < 45 + margin and y > 40 - margin))

    def _paint_vessels(self, hu: np.ndarray, lung: np.ndarray, inhale: float) -> None:
        """Blood-density tubes inside the lungs, stretched with the diaphragm (HU only; masks unchanged)."""
        if not len(self._vessel_tree):
            return
        segs = self._vessel_tree.copy()
        dome_top = min(z for _, z in _DOME.values())
        for col in (2, 5):  # SI stretch: the apex is fixed, the base moves with the diaphragm
            w = np.clip((_LUNG_APEX - segs[:, col]) / (_LUNG_APEX - dome_top), 0.0, 1.0)
            segs[:, col] -= self.spec.diaphragm_amplitude_mm * inhale * w
        for x0, y0, z0, x1, y1, z1, r in segs:
            box = []
            for coords, a, b in ((self._z, z0, z1), (self._y, y0, y1), (self._x, x0, x1)):
                idx = np.nonzero((coords >= min(a, b) - r) & (coords <= max(a, b) + r))[0]
                if idx.size == 0:
                    break
                box.append(slice(int(idx[0]), int(idx[-1]) + 1))
            if len(box) < 3:
                continue
            pz = self._z[box[0]][:, None, None] - z0
            py = self._y[box[1]][None, :, None] - y0
            px = self._x[box[2]][None, None, :] - x0
            vz, vy, vx = z1 - z0, y1 - y0, x1 - x0
            t = np.clip((pz * vz + py * vy + px * vx) / (vz * vz + vy * vy + vx * vx), 0.0, 1.0)
            d2 = (pz - t * vz) ** 2 + (py - t * vy) ** 2 + (px - t * vx) ** 2
            sel = (d2 <= r * r) & lung[box[0], box[1], box[2]]
            hu[box[0], box[1], box[2]][sel] = HU["blood"]

    def _ellipsoid(self, c: tuple[float, float, float], r: tuple[float, float, float]) -> np.ndarray:
        """Voxel-centre inside test, evaluated only in the bounding box."""
        z, y, x = self.spec.shape
        out = np.zeros((z, y, x), dtype=bool)
        sl = []
        for coords, cc, rr in ((self._z, c[2], r[2]), (self._y, c[1], r[1]), (self._x, c[0], r[0])):
            idx = np.nonzero(np.abs(coords - cc) <= rr)[0]
            if idx.size == 0:
                return out
            sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
        zz = ((self._z[sl[0]] - c[2]) / r[2]) ** 2
        yy = ((self._y[sl[1]] - c[1]) / r[1]) ** 2
        xx = ((self._x[sl[2]] - c[0]) / r[0]) ** 2
        out[sl[0], sl[1], sl[2]] = zz[:, None, None] + yy[None, :, None] + xx[None, None, :] <= 1.0
        return out


def make_phantom(spec: PhantomSpec | None = None) -> Phantom:
    """The phantom for ``spec`` (default: full clinical size). Cheap: phases generate on first use."""
    return Phantom(spec or PhantomSpec())


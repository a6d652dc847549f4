"""NIfTI image + label map -> HU volume and boolean masks in the canonical axes of docs/internal-api.md.

The image is reoriented with nibabel to the closest canonical (RAS+) orientation, then flipped in x and y
and transposed so that the arrays are (Z, Y, X) with x towards patient Left, y towards Posterior and z
towards Superior (LPS, like service/dicomio/volume.py). Oblique affines are accepted only up to the closest
canonical orientation (a small residual rotation is ignored with a warning). Spacing comes from the
canonical affine's column norms. Label values map to structure names (``{1: "Lung_L", ...}``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class NiftiReadError(ValueError):
    """The file cannot be read as a 3D CT / label map on one grid."""


@dataclass
class NiftiVolume:
    hu: np.ndarray  # (Z, Y, X) float32 (int16 when integral)
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    origin: tuple[float, float, float]  # LPS (x, y, z) of voxel (0, 0, 0)


def _canonical(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img: Any = nib.load(str(path))
    except (OSError, ValueError) as exc:  # nibabel.filebasedimages.ImageFileError is a ValueError
        raise NiftiReadError(f"{path}: not a readable NIfTI file: {exc}") from exc
    img = nib.as_closest_canonical(img)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise NiftiReadError(f"{path}: expected a 3D image, got shape {data.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    rot = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    if not np.allclose(np.abs(rot), np.eye(3), atol=1e-3):
        log.warning("%s: oblique affine, using the closest canonical orientation", path)
    # RAS+ (i -> Right, j -> Anterior, k -> Superior) -> LPS canonical (x -> Left, y -> Posterior): flip i, j
    lps = np.ascontiguousarray(np.transpose(data[::-1, ::-1, :], (2, 1, 0)))
    return lps, affine


def read_nifti_image(path: str | Path) -> NiftiVolume:
    """HU volume (scl_slope / scl_inter applied by nibabel)."""
    data, affine = _canonical(path)
    arr = np.asarray(data)
    if (
        np.issubdtype(arr.dtype, np.floating)
        and np.all(np.mod(arr, 1) == 0)
        and arr.min() >= -32768
        and arr.max() <= 32767
    ):
        hu = arr.astype(np.int16)
    elif np.issubdtype(arr.dtype, np.integer):
        hu = arr.astype(np.int16)
    else:
        hu = arr.astype(np.float32)
    sx, sy, sz = (float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    nx, ny = data.shape[2], data.shape[1]
    # voxel (i=nx-1, j=ny-1, k=0) of the RAS grid is canonical voxel (0, 0, 0); RAS -> LPS negates x and y
    ras = affine @ np.array([nx - 1, ny - 1, 0, 1.0])
    return NiftiVolume(hu=hu, spacing=(sz, sy, sx), origin=(-float(ras[0]), -float(ras[1]), float(ras[2])))


def read_nifti_labels(
    path: str | Path,
    label_map: Mapping[int, str],
    shape: tuple[int, int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Structure name -> bool (Z, Y, X) from an integer label map; several labels may map to one name."""
    data, _ = _canonical(path)
    labels = np.rint(np.asarray(data)).astype(np.int64)
    if shape is not None and labels.shape != tuple(shape):
        raise NiftiReadError(f"{path}: label map shape {labels.shape} differs from the image {tuple(shape)}")
    out: dict[str, np.ndarray] = {}
    for value, name in label_map.items():
        m = labels == int(value)
        out[name] = out[name] | m if name in out else m
    unknown = sorted(set(np.unique(labels).tolist()) - {0} - {int(v) for v in label_map})
    if unknown:
        log.info("%s: label values %s are not mapped and ignored", path, unknown)
    return out


def read_nifti_pair(
    image: str | Path,
    labels: str | Path,
    label_map: Mapping[int, str],
) -> tuple[NiftiVolume, dict[str, np.ndarray]]:
    vol = read_nifti_image(image)
    return vol, read_nifti_labels(labels, label_map, vol.hu.shape)


def parse_label_map(text: str) -> dict[int, str]:
    """``"1=Lung_L,2=Lung_R,3=Heart"`` -> ``{1: "Lung_L", ...}``."""
    out: dict[int, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        value, sep, name = part.partition("=")
        if not sep or not name.strip() or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"label mapping {part!r} is not VALUE=NAME")
        out[int(value)] = name.strip()
    if not out:
        raise ValueError("empty label mapping")
    return out

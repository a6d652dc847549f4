"""CT slices in HU -> SAM 3 pixel values, and model masks -> the slice grid.

SAM 3 was trained on 8-bit RGB photographs. A CT slice becomes three channels, each one HU window mapped
linearly to the 0-255 range (kept as float: no 8-bit rounding), then resized to the model's square input
(1008 for facebook/sam3, ``image_size`` for the tiny test config) and normalised exactly like
``Sam3ImageProcessor`` (rescale by 1/255, then ``(x - mean) / std``). Masks come back from the model at a
lower resolution (288 for the full model); :func:`logits_to_grid` resizes the *logits* bilinearly to exactly
``(Y, X)`` so that thresholding at probability 0.5 happens on the slice grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Window:
    """A HU window mapped linearly to 0..255 (values outside are clipped)."""

    name: str
    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ValueError(f"window {self.name!r}: high ({self.high}) must exceed low ({self.low})")


DEFAULT_WINDOWS: tuple[Window, Window, Window] = (
    Window("lung", -1350.0, 150.0),
    Window("mediastinum", -160.0, 240.0),
    Window("wide", -1000.0, 1000.0),
)


def windows_from_pairs(pairs: Sequence[tuple[float, float] | Window]) -> tuple[Window, ...]:
    """``[(low, high)] * 3`` (as in ``settings.hu_windows``) -> validated :class:`Window` objects."""
    if len(pairs) != 3:
        raise ValueError(f"SAM 3 takes 3 channels: need 3 HU windows, got {len(pairs)}")
    names = [w.name for w in DEFAULT_WINDOWS]
    out: list[Window] = []
    for name, p in zip(names, pairs, strict=True):
        if isinstance(p, Window):
            out.append(p)
        else:
            low, high = p
            out.append(Window(name, float(low), float(high)))
    return tuple(out)


@dataclass(frozen=True)
class PixelNormalisation:
    """What the processor does to an RGB image after windowing: resize, rescale, normalise."""

    size: tuple[int, int]  # (height, width) the model expects
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1.0 / 255.0

    @classmethod
    def from_processor(cls, processor: Any) -> PixelNormalisation:
        """Read size / mean / std / rescale from a ``Sam3Processor`` (or its image processor)."""
        ip = getattr(processor, "image_processor", processor)
        size = ip.size
        height = int(size["height"] if isinstance(size, dict) else size.height)
        width = int(size["width"] if isinstance(size, dict) else size.width)
        mean = tuple(float(v) for v in ip.image_mean)
        std = tuple(float(v) for v in ip.image_std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"processor mean/std must have 3 channels, got {mean} / {std}")
        rescale = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0
        return cls(
            size=(height, width),
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            rescale_factor=rescale,
        )


def window_channels(
    slices_hu: np.ndarray | torch.Tensor,
    windows: Sequence[Window] = DEFAULT_WINDOWS,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(N, Y, X) or (Y, X) HU -> float32 (N, 3, Y, X) in [0, 255], one channel per window."""
    if len(windows) != 3:
        raise ValueError(f"SAM 3 takes 3 channels: need 3 windows, got {len(windows)}")
    hu = torch.as_tensor(slices_hu, device=device)
    if hu.ndim == 2:
        hu = hu[None]
    if hu.ndim != 3:
        raise ValueError(f"expected (N, Y, X) or (Y, X) slices, got shape {tuple(hu.shape)}")
    hu = hu.to(torch.float32)
    chans = [((hu - w.low) * (255.0 / (w.high - w.low))).clamp_(0.0, 255.0) for w in windows]
    return torch.stack(chans, dim=1)


def to_pixel_values(channels: torch.Tensor, norm: PixelNormalisation) -> torch.Tensor:
    """(N, 3, Y, X) in [0, 255] -> (N, 3, H, W) model input, matching ``Sam3ImageProcessor``.

    Bilinear with antialiasing (torchvision's tensor resize, which the processor uses); antialiasing only acts
    when shrinking.
    """
    x = channels.to(torch.float32)
    if tuple(x.shape[-2:]) != norm.size:
        x = F.interpolate(x, size=norm.size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(norm.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * norm.rescale_factor - mean) / std


def logits_to_grid(logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) mask logits -> (..., Y, X) float32 logits on the slice grid (bilinear, no corner align).

    Resizing the logits (not binary masks) and thresholding afterwards keeps boundaries sub-pixel accurate;
    the output is exactly ``shape``.
    """
    lead = logits.shape[:-2]
    flat = logits.reshape(-1, 1, *logits.shape[-2:]).to(torch.float32)
    if tuple(flat.shape[-2:]) != tuple(shape):
        flat = F.interpolate(flat, size=tuple(shape), mode="bilinear", align_corners=False)
    return flat.reshape(*lead, *shape)

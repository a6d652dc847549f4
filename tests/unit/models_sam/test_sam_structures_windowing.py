"""StructureSpec validation and HU windowing / resizing round trips."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.sam3.windowing import (
    DEFAULT_WINDOWS,
    PixelNormalisation,
    Window,
    logits_to_grid,
    to_pixel_values,
    window_channels,
)
from models.structures import StructureSpec, default_structures


def test_default_structures_mirror_settings() -> None:
    from service.structure_settings import default_structures as settings_defaults

    ours = {s.name: dataclasses.asdict(s) for s in default_structures()}
    theirs = {s.name: s.model_dump() for s in settings_defaults()}
    assert ours.keys() == theirs.keys()
    for name, fields in ours.items():
        for key, value in fields.items():
            other = theirs[name][key]
            assert (tuple(other) if isinstance(other, list | tuple) else other) == value, (name, key)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="Lung"), "needs a prompt"),
        (dict(name="External", method="threshold"), "needs hu_range"),
        (dict(name="X" * 17, prompt="x"), "1-16 characters"),
        (dict(name="Heart", prompt="heart", method="atlas"), "method"),
        (dict(name="Heart", prompt="heart", score_threshold=1.5), "score_threshold"),
        (dict(name="Body", method="threshold", hu_range=(100.0, -100.0)), "low < high"),
        (dict(name="LongerLungName1", prompt="lung", split_laterality=True), "exceeds"),
        (dict(name="GTVp", prompt="tumor", envelope_name="ITV"), "envelope is False"),
        (dict(name="Heart", prompt="heart", expected_components=0), "expected_components"),
        (dict(name="Heart", prompt="heart", color=(0, 0, 300)), "color"),
    ],
)
def test_structure_spec_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StructureSpec(**kwargs)


def test_structure_output_names() -> None:
    lung = StructureSpec(name="Lung", prompt="lung", split_laterality=True)
    assert lung.output_names == ("Lung_L", "Lung_R")
    assert StructureSpec(name="Heart", prompt="heart").output_names == ("Heart",)


def test_window_channels_values() -> None:
    hu = np.array([[[-2000, -1350, -400, 150, 240, 1000, 3000]]], dtype=np.int16)
    ch = window_channels(hu).numpy()
    assert ch.shape == (1, 3, 1, 7) and ch.dtype == np.float32
    lung, med, wide = ch[0, :, 0]
    np.testing.assert_allclose(lung, [0, 0, 161.5, 255, 255, 255, 255], atol=1e-4)
    np.testing.assert_allclose(med, [0, 0, 0, 197.625, 255, 255, 255], atol=1e-4)
    np.testing.assert_allclose(wide, [0, 0, 76.5, 146.625, 158.1, 255, 255], atol=1e-4)
    with pytest.raises(ValueError):
        Window("bad", 10, 10)
    with pytest.raises(ValueError, match="3 windows"):
        window_channels(hu, DEFAULT_WINDOWS[:2])


@pytest.mark.parametrize("shape", [(64, 60), (512, 512), (37, 91)])
@pytest.mark.parametrize("size", [56, 1008])
def test_resize_round_trip_exact_shapes(shape: tuple[int, int], size: int) -> None:
    norm = PixelNormalisation(size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    hu = np.zeros((2, *shape), dtype=np.int16)
    pv = to_pixel_values(window_channels(hu), norm)
    assert tuple(pv.shape) == (2, 3, size, size)
    mask_res = size * 4 // 14
    back = logits_to_grid(torch.zeros(2, 5, mask_res, mask_res), shape)
    assert tuple(back.shape) == (2, 5, *shape) and back.dtype == torch.float32


def test_logits_to_grid_keeps_a_square_where_it_was() -> None:
    """Bilinear on logits then threshold: a block at model resolution lands on the same slice region."""
    low = torch.full((1, 16, 16), -10.0)
    low[0, 4:12, 4:12] = 10.0
    grid = logits_to_grid(low, (64, 64))[0] > 0
    expected = np.zeros((64, 64), dtype=bool)
    expected[16:48, 16:48] = True
    expected[[16, 16, 47, 47], [16, 47, 16, 47]] = False  # bilinear rounds the corners off by one pixel
    assert (grid.numpy() == expected).all()


def test_preprocessing_matches_the_processor() -> None:
    """Our on-device path equals Sam3ImageProcessor on one 3-channel image (resize, rescale, normalise)."""
    from models.sam3.tiny import tiny_processor

    proc = tiny_processor(56)
    rng = np.random.default_rng(0)
    hu = rng.normal(-300, 500, (2, 64, 60)).astype(np.int16)
    ch = window_channels(hu)
    expected = proc.image_processor(
        images=[c.numpy() for c in ch], return_tensors="pt", input_data_format="channels_first"
    )["pixel_values"]
    ours = to_pixel_values(ch, PixelNormalisation.from_processor(proc))
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)

"""Training the tiny random SAM 3 on phantom phases lifts validation Dice on held-out phases, and the saved
adapter reloads to identical outputs. CPU, < 1 minute on 2 idle cores.

The tiny model is random-initialised: through LoRA alone it learns too slowly for this budget, so the test
also trains the mask decoder head and the presence / scoring heads in full (``train_modules``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.phantom import make_phantom
from models.phantom_spec import PhantomSpec
from models.training.config import TrainConfig
from models.training.dataset import Target, phantom_volumes, split_by_group
from models.training.losses import LossWeights
from models.training.trainer import Trainer

pytestmark = pytest.mark.slow

IMAGE = 56
HEADS = ("mask_embedder", "presence_head", "scoring", "pixel_decoder", "instance_projection")


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded, above all on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_lifts_validation_dice_and_adapter_reloads(tmp_path: Path, one_thread: None) -> None:
    from models.sam3.inference import Sam3Segmenter
    from models.sam3.loader import build_segmenter
    from models.sam3.lora import load_adapter
    from models.sam3.tiny import build_tiny_model, tiny_processor, write_tiny_model

    spec = PhantomSpec.small(
        n_phases=4, shape=(16, 64, 64), pixel_spacing=(500 / 64, 500 / 64), slice_thickness=7.5
    )
    ph = make_phantom(spec)
    vols = phantom_volumes(ph.hu, ph.masks, ph.spacing, ph.phase_percents, group_by="phase")
    train_idx, val_idx = split_by_group(
        vols, val_groups=[vols[1].group, vols[3].group]
    )  # hold out 25 %, 75 %
    targets = [Target("Lung", "lung", ("Lung_L", "Lung_R"))]
    cfg = TrainConfig(
        epochs=6,
        steps_per_epoch=25,
        batch_size=8,
        lr=3e-3,
        warmup_steps=5,
        max_grad_norm=0.0,
        train_modules=HEADS,
        mining_every=25,
        mining_pool=32,
        loss=LossWeights(dice=2.0, focal=1.0, hard_pixels=0.5),
    )
    out = tmp_path / "adapter"
    trainer = Trainer(
        build_tiny_model(0, IMAGE),
        tiny_processor(IMAGE),
        vols,
        targets,
        train_idx,
        val_idx,
        cfg,
        out,
        progress=False,
        base_identity={"model": "random-init tiny test model", "trained": False},
    )
    result = trainer.fit(resume=False)
    before, after = result.baseline["Lung"], result.final["Lung"]
    print(f"validation Dice Lung (held-out phases): untrained {before:.3f} -> trained {after:.3f}")
    assert before < 0.2
    assert after >= 0.6 and after - before >= 0.5

    manifest = json.loads((out / "training.json").read_text())
    assert manifest["validation"]["after"]["Lung"] == pytest.approx(after)
    assert [e["epoch"] for e in manifest["epochs"]] == list(range(1, 7))
    assert len(manifest["data"]["train"]) == 2 and len(manifest["data"]["validation"]) == 2
    assert all(len(v["sha256"]) == 64 for v in manifest["data"]["train"])
    assert manifest["mining"] and manifest["lora"]["fully_trained_modules"]

    # the saved adapter on a fresh copy of the base gives exactly the trained model's output
    slices = np.asarray(vols[val_idx[0]].hu)
    trained = Sam3Segmenter(result.model, tiny_processor(IMAGE)).predict(slices, ["lung"])["lung"]
    reloaded = Sam3Segmenter(load_adapter(build_tiny_model(0, IMAGE), out), tiny_processor(IMAGE))
    assert np.array_equal(reloaded.predict(slices, ["lung"])["lung"], trained)
    # ... and through the production loader (HF directory + adapter, merged for speed)
    base_dir = write_tiny_model(tmp_path / "tiny", seed=0, image_size=IMAGE)
    seg = build_segmenter(base_dir, out, device="cpu", hash_weights=False)
    assert seg.version_info()["adapter"]["sha256"] == manifest["adapter"]["sha256"]
    np.testing.assert_allclose(seg.predict(slices, ["lung"])["lung"], trained, atol=1e-4)

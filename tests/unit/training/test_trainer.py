"""Trainer mechanics on a tiny model and phantom: checkpoint + resume is exact, config validation, splits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.phantom import make_phantom
from models.phantom_spec import PhantomSpec
from models.structures import default_structures
from models.training.checkpoint import CHECKPOINT_DIR
from models.training.config import TrainConfig
from models.training.dataset import (
    AnnotatedVolume,
    Target,
    build_samples,
    phantom_volumes,
    split_by_group,
    targets_from_specs,
)
from models.training.trainer import Trainer

IMAGE = 28


@pytest.fixture(scope="module")
def volumes() -> list[AnnotatedVolume]:
    spec = PhantomSpec.small(
        n_phases=2, shape=(6, 32, 32), pixel_spacing=(500 / 32, 500 / 32), slice_thickness=10.0, vessels=0
    )
    ph = make_phantom(spec)
    return phantom_volumes(ph.hu, ph.masks, ph.spacing, ph.phase_percents, group_by="phase")


@pytest.fixture()
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(volumes: list[AnnotatedVolume], out: Path, **kw: Any) -> Trainer:
    from models.sam3.tiny import build_tiny_model, tiny_processor

    cfg = TrainConfig(
        **{
            "epochs": 2,
            "steps_per_epoch": 3,
            "batch_size": 2,
            "lr": 1e-3,
            "warmup_steps": 1,
            "mining_every": 2,
            "mining_pool": 6,
            "train_modules": ("mask_embedder",),
            **kw,
        }
    )
    return Trainer(
        build_tiny_model(0, IMAGE),
        tiny_processor(IMAGE),
        volumes,
        [Target("Lung", "lung", ("Lung_L", "Lung_R"))],
        [0],
        [1],
        cfg,
        out,
        progress=False,
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_resume_continues_exactly(volumes: list[AnnotatedVolume], tmp_path: Path, one_thread: None) -> None:
    full = _trainer(volumes, tmp_path / "a").fit(resume=False)
    part = _trainer(volumes, tmp_path / "b").fit(resume=False, stop_after=4)  # mid epoch 2, after mining
    assert part.manifest == {} and (tmp_path / "b" / CHECKPOINT_DIR / "state.pt").is_file()
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists()
    resumed_trainer = _trainer(volumes, tmp_path / "b")
    resumed = resumed_trainer.fit(resume=True)
    assert resumed_trainer.step == 6
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and any("lora_" in k for k in a) and any("mask_embedder" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [e["train_loss"] for e in resumed.history] == pytest.approx(
        [e["train_loss"] for e in full.history]
    )
    assert resumed.manifest["adapter"]["sha256"] == full.manifest["adapter"]["sha256"]


def test_checkpoint_of_other_config_refused(
    volumes: list[AnnotatedVolume], tmp_path: Path, one_thread: None
) -> None:
    _trainer(volumes, tmp_path).fit(resume=False, stop_after=1)
    with pytest.raises(ValueError, match="other data or hyper-parameters"):
        _trainer(volumes, tmp_path, lr=5e-4).fit(resume=True)


def test_base_is_frozen_and_unknown_module_rejected(volumes: list[AnnotatedVolume], tmp_path: Path) -> None:
    t = _trainer(volumes, tmp_path)
    trainable = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    with pytest.raises(ValueError, match="not modules of this model"):
        _trainer(volumes, tmp_path, train_modules=("no_such_module",))


def test_config_validation() -> None:
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"lora_dropout": 1.0}, {"steps_per_epoch": 0}, {"grad_accum": 0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)  # type: ignore[arg-type]


def test_samples_targets_and_patient_split(volumes: list[AnnotatedVolume]) -> None:
    targets = targets_from_specs(default_structures())
    assert [(t.name, t.prompt, t.masks) for t in targets][:2] == [
        ("Lung", "lung", ("Lung_L", "Lung_R")),
        ("Heart", "heart", ("Heart",)),
    ]
    samples = build_samples(volumes, targets[:1], [0, 1])
    assert len(samples) == 2 * volumes[0].hu.shape[0]
    lung = volumes[0].masks["Lung_L"] | volumes[0].masks["Lung_R"]
    assert [s.positive for s in samples[: lung.shape[0]]] == list(lung.any(axis=(1, 2)))
    many = [
        AnnotatedVolume(f"v{i}", f"patient{i // 3}", volumes[0].hu, {}, volumes[0].spacing) for i in range(12)
    ]
    tr, va = split_by_group(many, val_fraction=0.25, seed=3)
    assert {many[i].group for i in tr}.isdisjoint({many[i].group for i in va})
    assert len(va) == 3  # one patient of four, all three of its volumes
    assert split_by_group(many, val_groups=["patient2"])[1] == [6, 7, 8]
    assert np.array_equal(np.sort(tr + va), np.arange(12))

"""The LoRA training loop: weighted hard-negative sampling, gradient accumulation, bf16 autocast on CUDA,
checkpoint + resume (models.training.checkpoint), per-epoch validation Dice (models.training.validation),
adapter + ``training.json`` output (docs/training.md).

The base model is frozen; peft adds LoRA matrices to the chosen Linear layers (models/sam3/lora.py targets)
and, optionally, trains whole small modules (``train_modules``, peft ``modules_to_save``: e.g. the mask
embedder).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.sam3.inference import PAD_BOX_LABEL
from models.sam3.windowing import (
    DEFAULT_WINDOWS,
    PixelNormalisation,
    Window,
    to_pixel_values,
    window_channels,
)
from models.training.checkpoint import CHECKPOINT_DIR, fingerprint, read_checkpoint, write_checkpoint
from models.training.config import TrainConfig, apply_training_lora, resolve_train_modules
from models.training.dataset import AnnotatedVolume, SliceSample, Target, build_samples
from models.training.hard_negatives import MiningReport, mine, pixel_candidates
from models.training.losses import grouped_loss
from models.training.manifest import build_manifest, data_record, write_manifest
from models.training.sampler import HardNegativeSampler
from models.training.validation import validation_dice

log = logging.getLogger(__name__)


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (B, 3, H, W)
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    targets: list[torch.Tensor]  # per sample (Y, X) float
    candidates: list[torch.Tensor]  # per sample (Y, X) bool
    present: torch.Tensor  # (B,) bool


@dataclass
class TrainResult:
    out_dir: Path
    manifest: dict[str, Any]
    history: list[dict[str, Any]]
    baseline: dict[str, float]  # validation Dice of the untrained (LoRA-initialised = base) model
    final: dict[str, float]
    model: Any  # the trained peft model (unmerged)


class Trainer:
    """Holds the model, data and state of one training run; :meth:`fit` runs it."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        volumes: Sequence[AnnotatedVolume],
        targets: Sequence[Target],
        train_idx: Sequence[int],
        val_idx: Sequence[int],
        config: TrainConfig,
        out_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        windows: Sequence[Window] = DEFAULT_WINDOWS,
        base_identity: dict[str, Any] | None = None,
        data_sources: list[dict[str, Any]] | None = None,
        progress: bool = True,
    ) -> None:
        if not targets:
            raise ValueError("nothing to train: no SAM 3 targets")
        self.config = config
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.volumes, self.targets = list(volumes), list(targets)
        self.train_idx, self.val_idx = list(train_idx), list(val_idx)
        self.windows = tuple(windows)
        self.processor = processor
        self.norm = PixelNormalisation.from_processor(processor)
        self.base_identity = dict(base_identity or {"model": "unknown"})
        self.data_sources = data_sources or []
        self.progress = progress
        self.samples: list[SliceSample] = build_samples(self.volumes, self.targets, self.train_idx)
        if not any(s.positive for s in self.samples):
            raise ValueError("no training slice contains any of the targets: check the structure mapping")
        torch.manual_seed(config.seed)
        self.model, self.lora = apply_training_lora(model, config)
        self.model.to(self.device)
        tok = processor(text=[t.prompt for t in self.targets], return_tensors="pt")
        self.text_ids = tok["input_ids"].to(self.device)
        self.text_mask = tok["attention_mask"].to(self.device)
        self.sampler = HardNegativeSampler(
            [not s.positive for s in self.samples],
            seed=config.seed,
            mix=config.hard_mix,
            ema=config.hard_ema,
            power=config.hard_power,
            negative_fraction=config.negative_fraction,
        )
        self.rng = np.random.default_rng(config.seed + 1)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        per_epoch = config.steps_per_epoch or max(
            1, math.ceil(len(self.samples) / (config.batch_size * config.grad_accum))
        )
        self.steps_per_epoch = per_epoch
        self.total_steps = per_epoch * config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.mining: list[MiningReport] = []
        self.baseline: dict[str, float] = {}
        self.epoch_losses: list[float] = []  # optimizer-step losses of the current epoch (checkpointed)

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10 % of the peak."""
        warm = self.config.warmup_steps
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.total_steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    # -- data ------------------------------------------------------------------------------------------------
    def make_batch(self, indices: Sequence[int], samples: Sequence[SliceSample] | None = None) -> Batch:
        samples = samples if samples is not None else self.samples
        pix, tgts, cands, pres, tids = [], [], [], [], []
        for i in indices:
            s = samples[i]
            vol = self.volumes[s.volume]
            hu = np.asarray(vol.hu[s.z], dtype=np.float32)
            tgt = np.zeros(hu.shape, dtype=bool)
            for m in self.targets[s.target].masks:
                tgt |= np.asarray(vol.masks[m][s.z], dtype=bool)
            pix.append(to_pixel_values(window_channels(hu, self.windows, device=self.device), self.norm))
            tgts.append(torch.from_numpy(tgt.astype(np.float32)).to(self.device))
            cands.append(
                torch.from_numpy(pixel_candidates(hu, tgt, self.config.band_px, self.config.hu_tolerance)).to(
                    self.device
                )
            )
            pres.append(bool(tgt.any()))
            tids.append(s.target)
        t = torch.as_tensor(tids, device=self.device)
        return Batch(
            torch.cat(pix),
            self.text_ids[t],
            self.text_mask[t],
            tgts,
            cands,
            torch.as_tensor(pres, device=self.device),
        )

    def forward(self, batch: Batch) -> Any:
        n = batch.pixel_values.shape[0]
        boxes = torch.zeros(n, 1, 4, device=self.device)
        labels = torch.full((n, 1), PAD_BOX_LABEL, dtype=torch.long, device=self.device)
        with self._autocast():
            return self.model(
                pixel_values=batch.pixel_values,
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                input_boxes=boxes,
                input_boxes_labels=labels,
            )

    def loss(self, outputs: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Batch loss (mean), per-sample losses and term means."""
        return grouped_loss(
            outputs, batch.targets, batch.present, batch.candidates, self.config.loss, self.device
        )

    @torch.no_grad()
    def score(self, indices: Sequence[int]) -> np.ndarray:
        """Per-sample losses without gradients (mining)."""
        was_training = self.model.training
        self.model.eval()
        try:
            batch = self.make_batch(indices)
            _, per, _ = self.loss(self.forward(batch), batch)
        finally:
            self.model.train(was_training)
        return per.float().cpu().numpy()

    # -- validation ------------------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """3D Dice per target (mean over validation volumes) at the inference rule; ``mean`` over targets."""
        return validation_dice(
            self.model, self.processor, [self.volumes[v] for v in self.val_idx], self.targets,
            device=self.device, config=self.config, windows=self.windows, identity=self.base_identity,
        )

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        state = {
            "step": self.step,
            "fingerprint": fingerprint(self.config, self.volumes),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "history": json.dumps(self.history),
            "baseline": json.dumps(self.baseline),
            "mining": json.dumps([dataclasses.asdict(m) for m in self.mining]),
            "epoch_losses": json.dumps(self.epoch_losses),
        }
        ck = write_checkpoint(self.out_dir, self.model, state)
        log.info("checkpoint at step %d -> %s", self.step, ck)
        return ck

    def load_checkpoint(self) -> bool:
        """Resume from ``out_dir/checkpoint`` when present; the configuration and data must be the same."""
        state = read_checkpoint(self.out_dir, fingerprint(self.config, self.volumes), self.model, self.device)
        if state is None:
            return False
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.history = json.loads(state["history"])
        self.baseline = json.loads(state["baseline"])
        self.mining = [MiningReport(**m) for m in json.loads(state["mining"])]
        self.epoch_losses = json.loads(state["epoch_losses"])
        log.info("resumed from %s at step %d", self.out_dir / CHECKPOINT_DIR, self.step)
        return True

    # -- the loop --------------------------------------------------------------------------------------------
    def fit(
        self,
        resume: bool = True,
        stop_after: int | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> TrainResult:
        """Train to ``epochs``; ``stop_after`` steps ends early leaving a checkpoint (resume tests)."""
        from tqdm.auto import tqdm

        from models.sam3.lora import save_adapter

        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed = resume and self.load_checkpoint()
        if not resumed:
            self.baseline = self.validate()
            log.info("validation Dice before training: %s", _fmt(self.baseline))
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not self.progress,
            unit="step",
            desc="train",
            dynamic_ncols=True,
        )
        t_epoch, slices = time.perf_counter(), 0
        stopped = False
        while self.step < self.total_steps:
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                idx = self.sampler.sample(cfg.batch_size)
                batch = self.make_batch(idx.tolist())
                total, per, parts = self.loss(self.forward(batch), batch)
                (total / cfg.grad_accum).backward()
                self.sampler.update(idx, per.float().cpu().numpy())
                step_loss += float(total.detach()) / cfg.grad_accum
                slices += len(idx)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm
                )
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.epoch_losses.append(step_loss)
            elapsed = time.perf_counter() - t_epoch
            bar.update(1)
            bar.set_postfix(
                loss=f"{step_loss:.3f}",
                slices_s=f"{slices / max(elapsed, 1e-9):.1f}",
                lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
            )
            if cfg.mining_every and self.step % cfg.mining_every == 0 and self.step < self.total_steps:
                self.mining.append(
                    mine(
                        self.sampler,
                        self.score,
                        pool_size=cfg.mining_pool,
                        batch_size=cfg.batch_size,
                        rng=self.rng,
                        step=self.step,
                    )
                )
            if self.step % self.steps_per_epoch == 0:
                record: dict[str, Any] = {
                    "epoch": self.step // self.steps_per_epoch,
                    "step": self.step,
                    "train_loss": float(np.mean(self.epoch_losses)),
                    "lr": self.scheduler.get_last_lr()[0],
                    "seconds": round(time.perf_counter() - t_epoch, 2),
                    "slices_per_s": round(slices / max(time.perf_counter() - t_epoch, 1e-9), 2),
                    "val_dice": self.validate(),
                    "last_terms": parts,
                }
                self.history.append(record)
                log.info(
                    "epoch %d: loss %.4f, val Dice %s",
                    record["epoch"],
                    record["train_loss"],
                    _fmt(record["val_dice"]),
                )
                if on_epoch:
                    on_epoch(record)
                t_epoch, slices = time.perf_counter(), 0
                self.epoch_losses = []
                self.save_checkpoint()
            elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if stop_after is not None and self.step >= stop_after and self.step < self.total_steps:
                self.save_checkpoint()
                stopped = True
                break
        bar.close()
        final = self.history[-1]["val_dice"] if self.history else {}
        if stopped:
            return TrainResult(self.out_dir, {}, self.history, self.baseline, final, self.model)
        save_adapter(self.model, self.out_dir)
        manifest = build_manifest(
            base_model=self.base_identity,
            data=data_record(self.volumes, self.targets, self.samples, self.train_idx, self.val_idx,
                             self.data_sources),
            hyperparameters=cfg.as_dict(),
            epochs=self.history,
            lora={
                "adapted_modules": self.lora.adapted_modules,
                "trainable_params": self.lora.trainable_params,
                "total_params": self.lora.total_params,
                "by_component": self.lora.by_component,
                "fully_trained_modules": list(resolve_train_modules(cfg.train_modules)),
            },
            adapter_dir=self.out_dir,
            extra={
                "validation": {
                    "before": self.baseline,
                    "after": final,
                    "metric": "3D Dice at probability 0.5, instance score >= "
                    f"{cfg.score_threshold}, mean over validation volumes",
                },
                "mining": [dataclasses.asdict(m) for m in self.mining][-20:],
                "steps": self.step,
                "device": str(self.device),
            },
        )
        write_manifest(manifest, self.out_dir)
        log.info(
            "adapter written to %s (validation Dice %s -> %s)", self.out_dir, _fmt(self.baseline), _fmt(final)
        )
        return TrainResult(self.out_dir, manifest, self.history, self.baseline, final, self.model)

def _fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in d.items()) or "(no validation volumes)"

"""Training checkpoints: ``<out_dir>/checkpoint`` holds the adapter and ``state.pt`` (step, optimizer,
scheduler, sampler, RNGs, history). A new one is written beside and renamed into place, so that a crash leaves
the previous one; a checkpoint resumes only the run that made it (same configuration and data: its
fingerprint)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.training.config import TrainConfig
from models.training.dataset import AnnotatedVolume

CHECKPOINT_DIR = "checkpoint"


def fingerprint(config: TrainConfig, volumes: Sequence[AnnotatedVolume]) -> str:
    """What a checkpoint must have been made with to resume: the hyper-parameters and the data."""
    h = hashlib.sha256(json.dumps(config.as_dict(), sort_keys=True, default=str).encode())
    for v in volumes:
        h.update(v.digest().encode())
    return h.hexdigest()


def write_checkpoint(out_dir: Path, model: Any, state: dict[str, Any]) -> Path:
    """Write ``model``'s adapter and ``state`` as ``out_dir/checkpoint``, replacing the previous one."""
    ck = out_dir / CHECKPOINT_DIR
    tmp = out_dir / (CHECKPOINT_DIR + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp / "adapter", safe_serialization=True)
    torch.save(state, tmp / "state.pt")
    if ck.exists():
        old = out_dir / (CHECKPOINT_DIR + ".old")
        ck.replace(old)
        tmp.replace(ck)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.replace(ck)
    return ck


def read_checkpoint(
    out_dir: Path, expected_fingerprint: str, model: Any, device: torch.device
) -> dict[str, Any] | None:
    """The state of ``out_dir/checkpoint``, its adapter weights loaded into ``model``; None without one.

    Raises ValueError when it was made with other data or hyper-parameters.
    """
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    ck = out_dir / CHECKPOINT_DIR
    if not (ck / "state.pt").is_file():
        return None
    state: dict[str, Any] = torch.load(ck / "state.pt", map_location="cpu", weights_only=True)
    if state["fingerprint"] != expected_fingerprint:
        raise ValueError(
            f"checkpoint {ck} was made with other data or hyper-parameters; use a new output "
            "directory or delete the checkpoint"
        )
    set_peft_model_state_dict(model, load_peft_weights(str(ck / "adapter"), device=str(device)))
    return state

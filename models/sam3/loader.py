"""The one place that builds the production segmenter: SAM 3 from a local HF-format directory, plus a LoRA
adapter.

Never downloads: ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``. Loads strictly: a missing, unexpected
or mismatched weight is an error, not a warning. Device and autocast dtype are arguments. See docs/sam3.md
for what a site downloads (facebook/sam3, gated) and where it goes (``ITVNODE_SAM3_DIR``,
``ITVNODE_ADAPTER_DIR``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.sam3.inference import Sam3Segmenter
from models.sam3.model_files import (  # re-exported: the loader's public names
    ADAPTER_FILES,
    CONFIG_FILE,
    HELP,
    HF_REPO,
    PROCESSOR_FILES,
    TOKENIZER_ALTERNATIVES,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    ModelCause,
    Sam3LoadError,
    check_adapter_dir,
    check_model_files,
    check_sam3_dir,
    missing_sam3_files,
)
from models.sam3.windowing import DEFAULT_WINDOWS, windows_from_pairs

__all__ = [
    "ADAPTER_FILES", "CONFIG_FILE", "HELP", "HF_REPO", "IDENTITY_FILE", "PROCESSOR_FILES",
    "TOKENIZER_ALTERNATIVES", "WEIGHTS_FILE", "WEIGHTS_INDEX_FILE", "ModelCause", "Sam3LoadError",
    "adapter_identity", "build_segmenter",
    "check_adapter_dir", "check_model_files", "check_sam3_dir", "default_dtype", "load_sam3",
    "missing_sam3_files", "model_identity", "resolve_device",
]

log = logging.getLogger(__name__)

IDENTITY_FILE = "itvnode_model.json"  # optional {"model": name, "trained": bool}; by sam3.tiny
_HELP = HELP


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; an explicit CUDA device must exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Sam3LoadError(f"device {device!r} requested but CUDA is not available on this machine",
                            ModelCause.LOAD_ERROR)
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """Autocast dtype: bf16 on CUDA, fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _sha256(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _weights_sha256(sam3_dir: Path) -> str:
    single = sam3_dir / WEIGHTS_FILE
    if single.is_file():
        return _sha256(single)
    index = json.loads((sam3_dir / WEIGHTS_INDEX_FILE).read_text())
    h = hashlib.sha256()
    for shard in sorted(set(index["weight_map"].values())):
        h.update(_sha256(sam3_dir / shard).encode())
    return h.hexdigest()


def adapter_identity(adapter_dir: Path) -> dict[str, Any]:
    """Name, hash and LoRA hyper-parameters of an adapter directory (for provenance)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        h.update(_sha256(adapter_dir / name).encode())
    return {
        "name": adapter_dir.name,
        "sha256": h.hexdigest(),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "peft_type": cfg.get("peft_type"),
    }


def model_identity(sam3_dir: Path, hash_weights: bool = True) -> dict[str, Any]:
    """Model name (from ``itvnode_model.json`` when present, else facebook/sam3) and config/weights hashes."""
    marker = sam3_dir / IDENTITY_FILE
    meta: dict[str, Any] = json.loads(marker.read_text()) if marker.is_file() else {}
    info: dict[str, Any] = {
        "model": meta.get("model", HF_REPO),
        "trained": meta.get("trained", True),
        "config_sha256": _sha256(sam3_dir / CONFIG_FILE),
        "weights_sha256": _weights_sha256(sam3_dir) if hash_weights else None,
    }
    info.update({k: v for k, v in meta.items() if k not in info})
    return info


def _offline() -> None:
    # Belt and braces next to local_files_only=True: no code path below may reach the Hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_sam3(sam3_dir: str | Path | None, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Load ``Sam3Model`` and ``Sam3Processor`` from a local directory, strictly: ``(model, processor)``."""
    path = check_sam3_dir(sam3_dir)
    _offline()
    from transformers import Sam3Model, Sam3Processor

    try:
        loaded: Any = Sam3Model.from_pretrained(path, local_files_only=True, output_loading_info=True)
        model, info = loaded
        processor = Sam3Processor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise Sam3LoadError(f"cannot load SAM 3 from {path}: {exc}. {_HELP}", ModelCause.LOAD_ERROR) from exc
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    unexpected = [k for k in info.get("unexpected_keys", []) if not any(p.search(k) for p in ignored)]
    problems = {
        "missing": sorted(info.get("missing_keys", [])),
        "unexpected": sorted(unexpected),
        "mismatched": sorted(str(m) for m in info.get("mismatched_keys", [])),
        "errors": [str(e) for e in info.get("error_msgs", [])],
    }
    if any(problems.values()):
        detail = "; ".join(
            f"{k} ({len(v)}): {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
            for k, v in problems.items()
            if v
        )
        raise Sam3LoadError(f"weights in {path} do not match the SAM 3 architecture: {detail}. {_HELP}",
                            ModelCause.WEIGHTS_MISMATCH)
    return model.to(resolve_device(device)).eval(), processor


def build_segmenter(
    sam3_dir: str | Path | None,
    adapter_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 4,
    *,
    dtype: torch.dtype | None = None,
    score_threshold: float = 0.5,
    merge_adapter: bool = True,
    hash_weights: bool = True,
    windows: Sequence[tuple[float, float]] | None = None,
) -> Sam3Segmenter:
    """SAM 3 (+ LoRA adapter when ``adapter_dir`` is set) ready for :meth:`Sam3Segmenter.predict`.

    ``merge_adapter`` folds the LoRA weights into the base weights for inference speed (numerically equal to
    the unmerged model up to float rounding). ``hash_weights`` hashes model.safetensors for ``version_info``
    (a few seconds for the 3.4 GB file, once per process). ``windows``: three HU (low, high) pairs
    (``settings.hu_windows``), default :data:`models.sam3.windowing.DEFAULT_WINDOWS`.
    """
    dev = resolve_device(device)
    path = check_model_files(sam3_dir, adapter_dir)  # files, headers and adapter fit, before any load
    if path is None:
        path = check_sam3_dir(sam3_dir)  # raises: not configured
    adapter_path = check_adapter_dir(adapter_dir) if adapter_dir else None
    model, processor = load_sam3(path, dev)
    identity = model_identity(path, hash_weights=hash_weights)
    identity["adapter"] = None
    if adapter_path is not None:
        from models.sam3.lora import load_adapter

        try:
            model = load_adapter(model, adapter_path)
        except (ValueError, RuntimeError, OSError, KeyError, TypeError) as exc:
            raise Sam3LoadError(
                f"LoRA adapter {adapter_path} cannot be applied to the model in {path}: {exc}",
                ModelCause.ADAPTER_MISMATCH,
            ) from exc
        if merge_adapter:
            model = model.merge_and_unload()
        identity["adapter"] = adapter_identity(adapter_path)
    if identity.get("trained") is False:
        log.warning(
            "%s in %s is a RANDOM-INIT test model, NOT a trained SAM 3: its outputs mean nothing",
            identity["model"],
            path,
        )
    log.info(
        "SAM 3 ready: %s, adapter %s, device %s",
        identity["model"],
        identity["adapter"]["name"] if identity["adapter"] else "none",
        dev,
    )
    return Sam3Segmenter(
        model,
        processor,
        device=dev,
        dtype=dtype or default_dtype(dev),
        batch_size=batch_size,
        score_threshold=score_threshold,
        identity=identity,
        windows=windows_from_pairs(windows) if windows is not None else DEFAULT_WINDOWS,
    )

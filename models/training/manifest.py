"""``training.json``: what an adapter was trained from and how (base model, data, hyper-parameters, metrics).

The worker reads it next to the adapter (``ITVNODE_ADAPTER_DIR``) for provenance; ``itvnode evaluate``
reports it. Written atomically; numbers are plain JSON (no NaN/inf: they become null).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.training.dataset import AnnotatedVolume, SliceSample, Target

MANIFEST_NAME = "training.json"
SCHEMA = 1
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def adapter_sha256(adapter_dir: str | Path) -> str:
    """Same definition as ``models.sam3.loader.adapter_identity``: sha256 of the files' sha256 hex digests."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        h.update(_sha256_file(Path(adapter_dir) / name).encode())
    return h.hexdigest()


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def software_versions() -> dict[str, str]:
    import numpy
    import peft
    import torch
    import transformers

    from itvnode_version import __version__

    return {
        "itvnode": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def build_manifest(
    *,
    base_model: Mapping[str, Any],
    data: Mapping[str, Any],
    hyperparameters: Mapping[str, Any],
    epochs: Sequence[Mapping[str, Any]],
    lora: Mapping[str, Any],
    adapter_dir: str | Path,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest dict (see docs/training.md for the fields)."""
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": "itvnode LoRA adapter for SAM 3",
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "adapter": {
            "name": Path(adapter_dir).name,
            "sha256": adapter_sha256(adapter_dir),
            "files": list(ADAPTER_FILES),
        },
        "base_model": dict(base_model),
        "lora": dict(lora),
        "data": dict(data),
        "hyperparameters": dict(hyperparameters),
        "epochs": [dict(e) for e in epochs],
        "software": software_versions(),
    }
    if extra:
        out.update(extra)
    return _clean(out)  # type: ignore[no-any-return]


def write_manifest(manifest: Mapping[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(manifest), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The manifest next to an adapter, or None when the adapter has none (trained elsewhere)."""
    path = Path(adapter_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def training_hashes(manifest: Mapping[str, Any] | None) -> dict[str, str]:
    """Volume hash -> ``"train"`` / ``"validation"`` for every volume a ``training.json`` lists (both the
    CT-only ``image_sha256`` and the CT+masks ``sha256``; the training split wins over validation)."""
    out: dict[str, str] = {}
    data = (manifest or {}).get("data") or {}
    for split in ("validation", "train"):
        for v in data.get(split) or []:
            for key in ("image_sha256", "sha256"):
                if v.get(key):
                    out[str(v[key])] = split
    return out


def data_record(
    volumes: Sequence[AnnotatedVolume],
    targets: Sequence[Target],
    samples: Sequence[SliceSample],
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    sources: list[dict[str, Any]],
) -> dict[str, Any]:
    """The manifest's ``data``: sources, targets, the train and validation volumes (with digests), samples."""

    def vol(i: int) -> dict[str, Any]:
        v = volumes[i]
        return {
            "name": v.name,
            "group": v.group,
            "shape": list(v.hu.shape),
            "spacing": list(v.spacing),
            "sha256": v.digest(),
            "image_sha256": v.image_digest(),
        }

    n_pos = sum(s.positive for s in samples)
    return {
        "sources": sources,
        "targets": [{"name": t.name, "prompt": t.prompt, "masks": list(t.masks)} for t in targets],
        "train": [vol(i) for i in train_idx],
        "validation": [vol(i) for i in val_idx],
        "train_samples": {"positive": n_pos, "negative": len(samples) - n_pos},
    }

"""Checks of the SAM 3 model and LoRA adapter directories that need no torch and no weights in memory.

The worker runs them before it starts (``itvnode worker`` refuses to start when ``ITVNODE_SAM3_DIR`` or
``ITVNODE_ADAPTER_DIR`` is set but unusable) and the loader runs them before it loads. Every failure is a
:class:`Sam3LoadError` whose ``cause`` says what kind of problem it is (a stable word for metrics and
``/health``) and whose message names the missing files or the mismatching tensors.

Adapter fit is checked from the safetensors *headers* (a few kB read, no tensor data): every LoRA pair
``<module>.lora_A.weight`` (r, in) / ``<module>.lora_B.weight`` (out, r) must sit on a base weight
``<module>.weight`` of shape (out, in). An adapter trained on another model (another size, another
architecture) fails here with the first mismatches listed, instead of half-loading later.
"""

from __future__ import annotations

import json
import struct
from enum import StrEnum
from pathlib import Path
from typing import Any

HF_REPO = "facebook/sam3"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded checkpoints
PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json")
TOKENIZER_ALTERNATIVES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
_MAX_HEADER = 100 * 1024 * 1024  # a safetensors header larger than this is not a safetensors file

HELP = (
    f"A site downloads the Hugging Face model {HF_REPO} (gated: accept the licence on huggingface.co, then "
    f"`huggingface-cli download {HF_REPO} --local-dir /opt/itvnode/sam3`) and points ITVNODE_SAM3_DIR "
    "(setting "
    "sam3_dir) at that directory; it must hold config.json, model.safetensors, processor_config.json and the "
    "tokenizer files. See docs/sam3.md."
)


class ModelCause(StrEnum):
    """Why SAM 3 is unavailable (label of ``itvnode_structures_skipped`` and the manifest's record)."""

    NOT_CONFIGURED = "not_configured"  # ITVNODE_SAM3_DIR unset: a threshold-only node, by choice
    DIR_MISSING = "dir_missing"  # a configured directory does not exist
    FILE_MISSING = "file_missing"  # a required file is absent
    FILE_INVALID = "file_invalid"  # a file is there but unreadable (bad JSON, not safetensors)
    ADAPTER_MISMATCH = "adapter_mismatch"  # the adapter does not fit the base model
    WEIGHTS_MISMATCH = "weights_mismatch"  # the weights do not fit the SAM 3 architecture
    LOAD_ERROR = "load_error"  # anything else while loading (device, out of memory...)


#: causes that mean a site configured a model that does not work: /health is unhealthy while they last
BROKEN_CAUSES: frozenset[str] = frozenset(c.value for c in ModelCause if c is not ModelCause.NOT_CONFIGURED)


class Sam3LoadError(RuntimeError):
    """The model or adapter directory is missing, incomplete or does not match the model."""

    def __init__(self, message: str, cause: ModelCause | str = ModelCause.LOAD_ERROR) -> None:
        super().__init__(message)
        self.cause = ModelCause(cause)


def missing_sam3_files(sam3_dir: Path) -> list[str]:
    """Names of required files absent from ``sam3_dir`` (empty list: complete)."""
    missing = [f for f in (CONFIG_FILE, *PROCESSOR_FILES) if not (sam3_dir / f).is_file()]
    if not (sam3_dir / WEIGHTS_FILE).is_file():
        index = sam3_dir / WEIGHTS_INDEX_FILE
        if not index.is_file():
            missing.append(WEIGHTS_FILE)
        else:
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            missing += [s for s in shards if not (sam3_dir / s).is_file()]
    if not any(all((sam3_dir / f).is_file() for f in alt) for alt in TOKENIZER_ALTERNATIVES):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    return missing


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise Sam3LoadError(f"{path} is not readable JSON: {exc}", ModelCause.FILE_INVALID) from exc
    if not isinstance(data, dict):
        raise Sam3LoadError(f"{path} is not a JSON object", ModelCause.FILE_INVALID)
    return data


def safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (the tensor data is not read)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise ValueError(f"header claims {n} bytes")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise Sam3LoadError(f"{path} is not a safetensors file: {exc}", ModelCause.FILE_INVALID) from exc
    return {k: tuple(int(d) for d in v.get("shape", ())) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)}


def _base_shapes(sam3_dir: Path) -> dict[str, tuple[int, ...]]:
    single = sam3_dir / WEIGHTS_FILE
    if single.is_file():
        return safetensors_header(single)
    index = _read_json(sam3_dir / WEIGHTS_INDEX_FILE)
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(index.get("weight_map", {}).values())):
        shapes.update(safetensors_header(sam3_dir / shard))
    return shapes


def check_sam3_dir(sam3_dir: str | Path | None) -> Path:
    """Raise :class:`Sam3LoadError` naming every missing file, else return the directory."""
    if sam3_dir is None or str(sam3_dir) in ("", "."):
        raise Sam3LoadError(f"no SAM 3 model directory configured (ITVNODE_SAM3_DIR is unset). {HELP}",
                            ModelCause.NOT_CONFIGURED)
    path = Path(sam3_dir).expanduser()
    if not path.is_dir():
        raise Sam3LoadError(f"SAM 3 model directory {path} (ITVNODE_SAM3_DIR) does not exist or is not a "
                            f"directory. {HELP}", ModelCause.DIR_MISSING)
    missing = missing_sam3_files(path)
    if missing:
        raise Sam3LoadError(
            f"SAM 3 model directory {path} (ITVNODE_SAM3_DIR) is incomplete: missing {', '.join(missing)}. "
            f"{HELP}", ModelCause.FILE_MISSING)
    _read_json(path / CONFIG_FILE)
    return path


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """The adapter directory exists and holds both files with a LoRA config; else :class:`Sam3LoadError`."""
    path = Path(adapter_dir).expanduser()
    if not path.is_dir():
        raise Sam3LoadError(
            f"LoRA adapter directory {path} (ITVNODE_ADAPTER_DIR) does not exist; unset "
            "ITVNODE_ADAPTER_DIR to run zero-shot SAM 3, or point it at the output of `itvnode train`",
            ModelCause.DIR_MISSING)
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        raise Sam3LoadError(
            f"LoRA adapter directory {path} (ITVNODE_ADAPTER_DIR) is incomplete: "
            f"missing {', '.join(missing)} "
            "(an adapter is what `itvnode train` writes: adapter_config.json + "
            "adapter_model.safetensors)", ModelCause.FILE_MISSING)
    cfg = _read_json(path / ADAPTER_CONFIG)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise Sam3LoadError(f"{path / ADAPTER_CONFIG}: peft_type is {cfg.get('peft_type')!r}, not 'LORA'",
                            ModelCause.ADAPTER_MISMATCH)
    return path


def adapter_mismatches(sam3_dir: Path, adapter_dir: Path) -> list[str]:
    """Why the adapter's LoRA tensors do not fit the base weights (empty: they fit). Headers only."""
    base = _base_shapes(sam3_dir)
    adapter = safetensors_header(adapter_dir / ADAPTER_WEIGHTS)
    cfg = _read_json(adapter_dir / ADAPTER_CONFIG)
    problems: list[str] = []
    lora = 0
    for name, shape in sorted(adapter.items()):
        for part in (".lora_A.weight", ".lora_B.weight"):
            if not name.endswith(part):
                continue
            lora += 1
            module = name[: -len(part)].removeprefix("base_model.model.")
            target = base.get(f"{module}.weight")
            if target is None:
                problems.append(f"{module}: no such layer in the base model")
            elif len(target) != 2 or len(shape) != 2:
                problems.append(f"{module}: base weight {target} is not a Linear layer")
            elif part == ".lora_A.weight" and shape[1] != target[1]:
                problems.append(f"{module}: lora_A takes {shape[1]} inputs, the base layer {target[1]}")
            elif part == ".lora_B.weight" and shape[0] != target[0]:
                problems.append(f"{module}: lora_B gives {shape[0]} outputs, the base layer {target[0]}")
            elif cfg.get("r") and shape[0 if part == ".lora_A.weight" else 1] != int(cfg["r"]):
                problems.append(f"{module}: rank {shape} differs from r={cfg['r']} in {ADAPTER_CONFIG}")
    if lora == 0:
        problems.append(f"{ADAPTER_WEIGHTS} holds no LoRA tensors")
    return problems


def check_model_files(sam3_dir: str | Path | None, adapter_dir: str | Path | None) -> Path | None:
    """Everything that can be checked without loading: files, JSON, safetensors headers, adapter fit.

    Returns the model directory, or None when no model is configured (a threshold-only node; an adapter
    without a model is an error). Raises :class:`Sam3LoadError` with the cause.
    """
    unset = sam3_dir is None or str(sam3_dir) in ("", ".")
    adapter_unset = adapter_dir is None or str(adapter_dir) in ("", ".")
    if unset and adapter_unset:
        return None
    if unset:
        raise Sam3LoadError(f"ITVNODE_ADAPTER_DIR is set ({adapter_dir}) but ITVNODE_SAM3_DIR is not: an "
                            f"adapter needs its base model. {HELP}", ModelCause.DIR_MISSING)
    path = check_sam3_dir(sam3_dir)
    _base_shapes(path)  # readable weights header (a truncated download fails here)
    if not adapter_unset:
        assert adapter_dir is not None
        apath = check_adapter_dir(adapter_dir)
        problems = adapter_mismatches(path, apath)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise Sam3LoadError(
                f"LoRA adapter {apath} (ITVNODE_ADAPTER_DIR) does not fit the SAM 3 model in {path}: "
                f"{'; '.join(problems[:5])}{more}. "
                "An adapter fits only the base model it was trained on (`itvnode train` with this "
                "ITVNODE_SAM3_DIR)", ModelCause.ADAPTER_MISMATCH)
    return path

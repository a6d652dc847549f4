"""A configured but unusable SAM 3 / adapter directory: the real ``itvnode worker`` refuses to start, /health
is unhealthy while studies skip their SAM 3 structures for that reason, /metrics counts it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SAM 3 in the real layout (needs torch; the tests without a model run on a base install)."""
    pytest.importorskip("torch")
    from models.sam3.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_sam3"), seed=0)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("peft")
    from models.sam3.lora import apply_lora, save_adapter
    from models.sam3.tiny import build_tiny_model

    peft_model, _ = apply_lora(build_tiny_model(), r=4)
    return save_adapter(peft_model, tmp_path_factory.mktemp("adapter") / "adapter")


def _worker(tmp_path: Path, sam3_dir: Path | None,
            adapter: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
    env.update(ITVNODE_DATA_DIR=str(tmp_path / "data"), ITVNODE_SAM3_DIR=str(sam3_dir or ""),
               ITVNODE_ADAPTER_DIR=str(adapter or ""), ITVNODE_DEVICE="cpu")
    argv = [sys.executable, "-m", "itvnode.cli", "worker", "--queues", "inference", "--pool", "solo"]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_worker_refuses_missing_model_dir(tmp_path: Path) -> None:
    res = _worker(tmp_path, tmp_path / "no-such-sam3")
    assert res.returncode != 0
    assert "refusing to start" in res.stderr and "no-such-sam3" in res.stderr
    assert "does not exist" in res.stderr and "[dir_missing]" in res.stderr


def test_worker_refuses_dir_without_weights(tmp_path: Path, tiny_dir: Path) -> None:
    broken = shutil.copytree(tiny_dir, tmp_path / "sam3")
    (broken / "model.safetensors").unlink()
    res = _worker(tmp_path, broken)
    assert res.returncode != 0
    assert "refusing to start" in res.stderr and "missing model.safetensors" in res.stderr
    assert "[file_missing]" in res.stderr


def test_worker_refuses_truncated_weights(tmp_path: Path, tiny_dir: Path) -> None:
    broken = shutil.copytree(tiny_dir, tmp_path / "sam3")
    (broken / "model.safetensors").write_bytes(b"\x10")  # an interrupted download
    res = _worker(tmp_path, broken)
    assert res.returncode != 0 and "is not a safetensors file" in res.stderr
    assert "[file_invalid]" in res.stderr


def test_worker_refuses_adapter_config_not_matching(tmp_path: Path, tiny_dir: Path,
                                                    adapter_dir: Path) -> None:
    adapter = shutil.copytree(adapter_dir, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["r"] = 8  # the weights are rank 4
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    res = _worker(tmp_path, tiny_dir, adapter)
    assert res.returncode != 0
    assert "does not fit the SAM 3 model" in res.stderr and "r=8" in res.stderr
    assert "[adapter_mismatch]" in res.stderr


def test_worker_refuses_adapter_of_another_model(tmp_path: Path, tiny_dir: Path, adapter_dir: Path) -> None:
    from safetensors.numpy import load_file, save_file

    adapter = shutil.copytree(adapter_dir, tmp_path / "adapter")
    weights = load_file(adapter / "adapter_model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("lora_A.weight"))
    a = weights[name]
    weights[name] = a.repeat(2, axis=1)  # as if trained on a model twice as wide
    save_file(weights, adapter / "adapter_model.safetensors")
    res = _worker(tmp_path, tiny_dir, adapter)
    assert res.returncode != 0 and "[adapter_mismatch]" in res.stderr
    assert f"lora_A takes {a.shape[1] * 2} inputs, the base layer {a.shape[1]}" in res.stderr


def test_worker_refuses_missing_adapter_dir(tmp_path: Path, tiny_dir: Path) -> None:
    res = _worker(tmp_path, tiny_dir, tmp_path / "no-adapter")
    assert res.returncode != 0 and "no-adapter" in res.stderr and "[dir_missing]" in res.stderr


def test_good_model_and_adapter_pass_the_check(tiny_dir: Path, adapter_dir: Path) -> None:
    from models.sam3.model_files import check_model_files

    assert check_model_files(tiny_dir, adapter_dir) == tiny_dir
    assert check_model_files(None, None) is None  # a threshold-only node may start


def test_health_unhealthy_while_structures_skipped_for_broken_model(assembled: tuple[Path, str, Any],
                                                                   tmp_path: Path) -> None:
    from service.ops.health import check_health
    from service.ops.metrics import NodeCollector
    from service.settings import load_settings
    from worker.engine_settings import engine_config, load_segmenter
    from worker.pipeline import process_study

    data_dir, key, _ = assembled
    assert check_health(data_dir, None).checks["model"]["ok"]  # nothing segmented yet
    # the model directory vanished after the worker started (a broken mount): the study skips SAM 3
    cfg = engine_config(load_settings(sam3_dir=tmp_path / "gone", adapter_dir=None, device="cpu"))
    seg = load_segmenter(cfg)
    assert seg.segmenter is None and seg.unavailable_cause == "dir_missing"
    assert "does not exist" in (seg.unavailable_reason or "")
    process_study(key, data_dir, cfg, seg, [])
    m = json.loads((data_dir / "studies" / key / "manifest.json").read_text())
    rec = m["results"]["model"]
    assert rec["loaded"] is False and rec["broken"] is True and rec["cause"] == "dir_missing"
    assert "does not exist" in m["reason"] and "not configured" not in m["reason"]

    report = check_health(data_dir, None)
    assert not report.ok and not report.checks["model"]["ok"]
    assert "dir_missing" in report.checks["model"]["detail"] and key in report.checks["model"]["detail"]

    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(NodeCollector(data_dir, None))
    text = generate_latest(registry).decode()
    assert 'itvnode_model_loaded{cause="dir_missing"} 0.0' in text
    skipped = [line for line in text.splitlines()
               if line.startswith("itvnode_structures_skipped_total{") and 'cause="dir_missing"' in line]
    assert skipped and all(line.endswith(" 1.0") for line in skipped)


def test_health_ok_without_a_model_by_choice(assembled: tuple[Path, str, Any]) -> None:
    from service.ops.health import check_health
    from service.settings import load_settings
    from worker.engine_settings import engine_config, load_segmenter
    from worker.pipeline import process_study

    data_dir, key, _ = assembled
    cfg = engine_config(load_settings(sam3_dir=None, adapter_dir=None))
    seg = load_segmenter(cfg)
    assert seg.unavailable_cause == "not_configured"
    process_study(key, data_dir, cfg, seg, [])
    check = check_health(data_dir, None).checks["model"]
    assert check["ok"] and "not_configured" in check["detail"]

"""bench/gpu_infer.py keeps working: on a CPU it runs the tiny smoke version, labelled as not a GPU figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_gpu_bench_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_infer.py"),
            "--cpu",
            "--slices",
            "4",
            "--repeats",
            "1",
            "--prompts",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NOT A GPU FIGURE" in proc.stdout
    result = json.loads(out.read_text())
    assert result["gpu_figure"] is False and result["batch_size"] == 4
    assert result["vision_slices_per_s"] > 0 and result["study_projection_s"]["cached_vision"] > 0

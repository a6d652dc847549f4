"""bench/itv_motion.py keeps running, and the default rule keeps meeting its goal on the quick grid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_itv_motion_bench_quick() -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "itv_motion.py"), "--quick"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "RESULT: NEW meets the goal in 8/8 cells" in run.stdout
    assert "old " in run.stdout and "centroid " in run.stdout  # the old rules are measured in the same run

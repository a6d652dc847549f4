"""``itvnode`` processes keep numpy from asking for transparent huge pages (itvnode/cli.py): with THP defrag
at "madvise" every first touch of a study's large arrays could stall on memory compaction. An admin's own
``NUMPY_MADVISE_HUGEPAGE`` still wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# numpy's switch returns its previous state: what the process ran with
PROBE = "import itvnode.cli, numpy._core.multiarray as m; print(m._set_madvise_hugepage(True))"


@pytest.mark.parametrize(("setting", "expected"), [(None, "False"), ("1", "True"), ("0", "False")])
def test_itvnode_processes_do_not_madvise_huge_pages(setting: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if setting is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == expected, out.stderr

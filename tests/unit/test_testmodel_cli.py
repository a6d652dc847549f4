"""``itvnode testmodel DIR``: the random tiny SAM 3 in a real model's layout, loudly marked; ``--help`` of
train / evaluate shows the defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "itvnode.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_testmodel_writes_a_loadable_marked_random_model(tmp_path: Path) -> None:
    from models.sam3.loader import build_segmenter, missing_sam3_files

    out = tmp_path / "tiny"
    r = _cli("testmodel", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RANDOM-INIT" in r.stdout and "RANDOM-INIT" in r.stderr  # printed and logged
    assert missing_sam3_files(out) == []  # config.json, model.safetensors, processor + tokenizer files
    assert "NOT SAM 3" in (out / "RANDOM_WEIGHTS_NOT_A_TRAINED_MODEL.txt").read_text()
    assert json.loads((out / "itvnode_model.json").read_text())["trained"] is False
    seg = build_segmenter(out, device="cpu", hash_weights=False)  # the production loader takes it
    assert seg.version_info()["trained"] is False
    again = _cli("testmodel", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_help_shows_defaults() -> None:
    train = _cli("train", "--help")
    assert train.returncode == 0
    text = " ".join(train.stdout.split())
    assert "--lr LR lr (default: 0.0002)" in text and "--epochs EPOCHS epochs (default: 10)" in text
    assert "(default: None)" not in text
    ev = " ".join(_cli("evaluate", "--help").stdout.split())
    assert "--label LABEL variant name of the --predicted contours (default: predicted)" in ev
    assert "--include-training" in ev and "(default: None)" not in ev

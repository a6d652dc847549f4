"""``itvnode testmodel DIR``: write a tiny, RANDOM-INITIALISED SAM 3 in the layout of a real model directory.

config.json, model.safetensors, processor_config.json and the tokenizer files, exactly what
``ITVNODE_SAM3_DIR`` / ``--sam3-dir`` expect, so that ``itvnode train``, ``evaluate`` and ``segment`` can be
tried end to end without the gated weights (docs/training.md). It has never been trained: its outputs are
noise. It says so everywhere: ``itvnode_model.json`` (``"trained": false``, read by the loader), a
``RANDOM_WEIGHTS_NOT_A_TRAINED_MODEL.txt`` marker, a warning whenever it is loaded, the adapter's
``training.json`` and ``training.png``, and the banner of every evaluation report.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from itvnode.commands import DefaultsHelpFormatter

log = logging.getLogger("itvnode.testmodel")

MARKER = "RANDOM_WEIGHTS_NOT_A_TRAINED_MODEL.txt"
MARKER_TEXT = """THIS IS NOT SAM 3. It is a tiny model with RANDOM weights (itvnode testmodel).

It exists so that `itvnode train`, `itvnode evaluate` and `itvnode segment` can be tried without the gated
facebook/sam3 weights. Its contours, Dice values and adapters mean nothing clinically. Never point a
clinical node's ITVNODE_SAM3_DIR at this directory.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument("dir", metavar="DIR", help="output directory (created)")
    parser.add_argument("--seed", type=int, default=0, help="random initialisation seed")
    parser.add_argument(
        "--image-size", type=int, default=56, help="model input size in pixels (multiple of 14)"
    )
    parser.add_argument("--force", action="store_true", help="write into a non-empty directory")


def run(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"itvnode testmodel: {out} is not empty (use --force)", file=sys.stderr)
        return 2
    from models.sam3.tiny import write_tiny_model

    try:
        write_tiny_model(out, seed=args.seed, image_size=args.image_size)
    except ValueError as exc:
        print(f"itvnode testmodel: {exc}", file=sys.stderr)
        return 2
    (out / MARKER).write_text(MARKER_TEXT)
    log.warning(
        "wrote a RANDOM-INIT tiny SAM 3 (seed %d) to %s: NOT a trained model, for trying the tools only",
        args.seed,
        out,
    )
    print(f"{out}: RANDOM-INIT test model (not SAM 3, outputs mean nothing); try it with --sam3-dir {out}")
    return 0

"""Peak GPU memory of one LoRA training step of the full-size SAM 3 at 1008 x 1008 (goal: <= 24 GB).

On CUDA: the full-size architecture (``--sam3-dir`` loads real weights; otherwise default ``Sam3Config()``
with random weights: memory is the same, the outputs mean nothing) wrapped as ``itvnode train`` wraps it
(models.training.config.apply_training_lora with the default TrainConfig: LoRA r=16, alpha=32 on
q/k/v/o_proj + fc1/fc2 of the ViT, text encoder, DETR and mask decoder), bf16 autocast, AdamW. It runs warm-up
steps, then measures ``torch.cuda.max_memory_allocated`` over one full step (forward, loss with hard-pixel
mining, backward, optimizer step) for each batch size, and the peer in the same run: one inference forward of
the same model (no gradients). Prints a table, the ratio training/inference, and the verdict against the goal.

Without CUDA it says so and exits 0; ``--tiny`` then times one step of the tiny random model on the CPU (a
smoke test of the code path, not a memory figure). The full-size LoRA parameter count is printed either
way (meta device, no memory).

    .venv/bin/python -m bench.train_memory [--batch-sizes 1,2,4] [--sam3-dir DIR] [--tiny] [--dry-run]
                                           [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

GOAL_GB = 24.0


def _volume(rows: int, slices: int) -> Any:
    from models.phantom import make_phantom
    from models.phantom_spec import PhantomSpec
    from models.training.dataset import phantom_volumes

    ph = make_phantom(PhantomSpec.sized(rows, slices, n_phases=1, slice_thickness=20.0))
    return phantom_volumes(ph.hu, ph.masks, ph.spacing, ph.phase_percents)


def _trainer(model: Any, processor: Any, vols: list[Any], device: torch.device, out: Path, batch: int) -> Any:
    from models.training.config import TrainConfig
    from models.training.dataset import Target
    from models.training.trainer import Trainer

    cfg = TrainConfig(batch_size=batch, mining_every=0)  # default LoRA settings
    targets = [Target("Lung", "lung", ("Lung_L", "Lung_R"))]
    return Trainer(model, processor, vols, targets, [0], [], cfg, out, device=device, progress=False)


def _step(t: Any, idx: list[int]) -> float:
    t0 = time.perf_counter()
    t.optimizer.zero_grad(set_to_none=True)
    batch = t.make_batch(idx)
    total, _, _ = t.loss(t.forward(batch), batch)
    total.backward()
    t.optimizer.step()
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    return time.perf_counter() - t0


def _positives(t: Any, n: int) -> list[int]:
    pos = [i for i, s in enumerate(t.samples) if s.positive]
    return (pos * n)[:n]


def measure(args: argparse.Namespace, device: torch.device, tiny: bool = False) -> dict[str, Any]:
    """Peak memory per batch size on ``device`` (CUDA). ``tiny`` builds the tiny random model instead: a dry
    run of this exact code path (on CPU the memory columns are 0: no allocator statistics)."""
    import tempfile

    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    from models.sam3.tiny import build_tiny_model, tiny_processor, tiny_tokenizer

    cuda = device.type == "cuda"
    if tiny:
        model, processor, weights = build_tiny_model(0, 56), tiny_processor(56), "tiny random model (dry run)"
    elif args.sam3_dir:
        from models.sam3.loader import load_sam3

        model, processor = load_sam3(args.sam3_dir, "cpu")
        weights = f"weights from {args.sam3_dir}"
    else:
        torch.manual_seed(0)
        model = Sam3Model(Sam3Config())
        processor = Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=tiny_tokenizer())
        weights = "random weights (memory identical to the trained model; outputs meaningless)"
    vols = _volume(64 if tiny else 512, 4)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    results: dict[str, Any] = {
        "device": name,
        "weights": weights,
        "image_size": 56 if tiny else 1008,
        "slice": "phantom slice",
        "rows": [],
    }

    def peak() -> int:
        return torch.cuda.max_memory_allocated(device) if cuda else 0

    def reset() -> None:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    with tempfile.TemporaryDirectory() as tmp:
        t = _trainer(model, processor, vols, device, Path(tmp), 1)
        results["lora"] = str(t.lora)
        t.model.train()
        for b in args.batch_sizes:
            idx = _positives(t, b)
            try:
                _step(t, idx)  # warm-up (allocator, cuBLAS workspaces, optimizer state)
                reset()
                base = torch.cuda.memory_allocated(device) if cuda else 0
                secs = _step(t, idx)
                train_peak = peak()
                reserved = torch.cuda.max_memory_reserved(device) if cuda else 0
                reset()  # the peer, same run: one inference forward of the same model
                t.model.eval()
                with torch.no_grad():
                    t.forward(t.make_batch(idx))
                if cuda:
                    torch.cuda.synchronize(device)
                infer_peak = peak()
                t.model.train()
                results["rows"].append(
                    {
                        "batch": b,
                        "train_peak_gb": train_peak / 1e9,
                        "train_reserved_gb": reserved / 1e9,
                        "resident_gb": base / 1e9,
                        "step_s": secs,
                        "inference_peak_gb": infer_peak / 1e9,
                        "train_over_inference": train_peak / max(infer_peak, 1),
                    }
                )
            except torch.cuda.OutOfMemoryError:
                results["rows"].append({"batch": b, "oom": True})
                reset()
    return results


def measure_tiny() -> dict[str, Any]:
    import tempfile

    from models.sam3.tiny import build_tiny_model, tiny_processor

    vols = _volume(64, 4)
    with tempfile.TemporaryDirectory() as tmp:
        t = _trainer(build_tiny_model(0, 56), tiny_processor(56), vols, torch.device("cpu"), Path(tmp), 4)
        t.model.train()
        idx = _positives(t, 4)
        _step(t, idx)
        times = [_step(t, idx) for _ in range(5)]
    return {
        "tiny_step_s_median": float(np.median(times)),
        "batch": 4,
        "note": "CPU smoke test, not a GPU figure",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,2,4")
    parser.add_argument("--sam3-dir", help="real SAM 3 directory (default: random full-size weights)")
    parser.add_argument("--tiny", action="store_true", help="without CUDA: time the tiny model's step")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run the measurement code with the tiny model (on CPU without CUDA)",
    )
    args = parser.parse_args()
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]

    from models.sam3.lora import count_trainable_full_size
    from models.training.config import TrainConfig, training_lora_config

    # the LoRA of the training path (default TrainConfig), not a second description of it
    full_size = count_trainable_full_size(lora=training_lora_config(TrainConfig()))
    report: dict[str, Any] = {"goal_gb": GOAL_GB, "full_size_lora": str(full_size)}
    print(report["full_size_lora"])
    if not torch.cuda.is_available():
        print(
            "no GPU: CUDA is not available on this machine; the full-size 1008 x 1008 measurement needs one "
            "(run this script on the GPU worker)."
        )
        report["cuda"] = False
        if args.dry_run:
            report["dry_run"] = measure(args, torch.device("cpu"), tiny=True)
            print(f"dry run of the measurement code on CPU (tiny model): {report['dry_run']['rows']}")
        if args.tiny:
            report["tiny"] = measure_tiny()
            print(
                f"tiny random model, CPU: one training step (batch 4, 56 px) "
                f"{report['tiny']['tiny_step_s_median'] * 1000:.0f} ms (smoke test only)"
            )
    else:
        report["cuda"] = True
        report.update(measure(args, torch.device("cuda"), tiny=args.dry_run))
        print(f"{report['device']}, {report['weights']}")
        head = ("batch", "train peak GB", "reserved GB", "inference GB", "ratio", "step s")
        print(" ".join(f"{h:>{w}}" for h, w in zip(head, (5, 14, 12, 13, 6, 7), strict=True)))
        for r in report["rows"]:
            if r.get("oom"):
                print(f"{r['batch']:>5} out of memory")
                continue
            print(
                f"{r['batch']:>5} {r['train_peak_gb']:>14.2f} {r['train_reserved_gb']:>12.2f} "
                f"{r['inference_peak_gb']:>13.2f} {r['train_over_inference']:>6.2f} {r['step_s']:>7.2f}"
            )
        first = next((r for r in report["rows"] if not r.get("oom")), None)
        if first:
            ok = first["train_peak_gb"] <= GOAL_GB
            print(
                f"batch {first['batch']}: {first['train_peak_gb']:.2f} GB peak vs goal {GOAL_GB:.0f} GB -> "
                f"{'MEETS' if ok else 'MISSES'} the goal"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

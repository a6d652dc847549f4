"""SAM 3 inference throughput: vision encoder and per-prompt decoding, projected to a 4DCT study.

On CUDA: the full-size architecture (default ``Sam3Config()``, random weights: timing only, outputs
meaningless) with bf16 autocast and the batch size the product ships
(``settings.batch_size`` default). It measures
  * vision encoder slices/s (``get_vision_features``),
  * per-prompt slices/s with cached vision features (geometry + DETR encoder/decoder + mask decoder),
  * ``Sam3Segmenter.predict`` end to end on 512 x 512 slices (windowing, resize, masks back to the grid,
    copy to host) with every instance kept (worst case for the post-processing),
  * the peer: the plain ``Sam3Model(pixel_values=..., input_ids=...)`` call per prompt, which recomputes the
    vision features for every prompt,
and prints the projected time for a 1,500-slice, 4-prompt study and the ratio against the peer.

Without CUDA it runs the same measurements on the tiny random model (or, with ``--full-cpu``, the full model
on 1 slice) and says clearly that the figures are NOT GPU figures.

    .venv/bin/python -m bench.gpu_infer [--slices 32] [--prompts 4] [--batch-size N] [--full-cpu] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STUDY_SLICES = 1500
STUDY_PROMPTS = 4
PROMPTS = ["lung", "heart", "lung tumor", "esophagus", "spinal cord", "trachea", "liver", "body"]


def shipped_batch_size() -> int:
    from service.settings import Settings

    return int(Settings.model_fields["batch_size"].default)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def build(full: bool, device: torch.device, batch_size: int) -> tuple[Any, str]:
    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    from models.sam3.inference import Sam3Segmenter
    from models.sam3.tiny import build_tiny_segmenter, tiny_tokenizer

    if not full:
        return build_tiny_segmenter(device=device, batch_size=batch_size), "tiny random-init SAM 3 (56 px)"
    torch.manual_seed(0)
    with torch.device(device):
        model = Sam3Model(Sam3Config())
    processor = Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=tiny_tokenizer())
    seg = Sam3Segmenter(
        model,
        processor,
        device=device,
        batch_size=batch_size,
        identity={"model": "random-init full-size SAM 3 (timing only)", "trained": False},
    )
    return seg, "full-size random-init SAM 3 (1008 px, 840 M parameters)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    full = cuda or args.full_cpu
    batch = args.batch_size or shipped_batch_size()
    if not cuda and args.full_cpu:
        batch = 1
    n_slices = args.slices if args.slices else (32 if cuda else (batch if full else 16))
    n_slices = max(n_slices, batch)
    prompts = PROMPTS[: args.prompts]
    seg, label = build(full, device, batch)
    rng = np.random.default_rng(0)
    slices = rng.normal(-300, 400, (n_slices, 512, 512)).astype(np.int16)
    batch_hu = slices[:batch]
    reps = args.repeats if args.repeats else (5 if cuda else 2)

    with torch.inference_mode():
        pv = seg.pixel_values(batch_hu)
        t_vision = timed(lambda: seg.vision_features(pv), device, reps)
        vision = seg.vision_features(pv)
        text = seg.encode_prompt(prompts[0])
        t_prompt = timed(lambda: seg.decode(vision, text, batch), device, reps)
        t_text = timed(lambda: seg.encode_prompt(prompts[0]), device, reps)
        ids = seg.processor(text=prompts[0], return_tensors="pt")
        ids_t, mask_t = (
            ids["input_ids"].to(device).expand(batch, -1),
            ids["attention_mask"].to(device).expand(batch, -1),
        )

        def peer_call() -> Any:
            with seg._autocast():
                return seg.model(pixel_values=pv, input_ids=ids_t, attention_mask=mask_t)

        t_peer = timed(peer_call, device, reps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_predict = timed(lambda: seg.predict(slices, prompts, score_threshold=0.0), device, 1 if not cuda else 2)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    vision_sps = batch / t_vision
    prompt_sps = batch / t_prompt
    predict_sps = n_slices / t_predict  # slices/s with all prompts
    study_ours = (
        STUDY_SLICES / vision_sps + STUDY_PROMPTS * STUDY_SLICES / prompt_sps + STUDY_PROMPTS * t_text
    )
    study_peer = STUDY_PROMPTS * STUDY_SLICES * t_peer / batch
    study_predict = STUDY_SLICES / predict_sps  # with len(prompts) prompts (default 4)
    return {
        "gpu_figure": cuda,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "model": label,
        "autocast": str(seg.dtype).removeprefix("torch."),
        "batch_size": batch,
        "slices_measured": n_slices,
        "prompts": len(prompts),
        "vision_slices_per_s": vision_sps,
        "prompt_slices_per_s": prompt_sps,
        "text_encode_s": t_text,
        "peer_slices_per_s_per_prompt": batch / t_peer,
        "predict_slices_per_s_all_prompts": predict_sps,
        "study_projection_s": {
            "cached_vision": study_ours,
            "predict_end_to_end": study_predict,
            "peer_recompute_vision": study_peer,
        },
        "ratio_peer_over_ours": study_peer / study_ours,
        "peak_gpu_gib": peak,
    }


def report(r: dict[str, Any]) -> str:
    lines = []
    if not r["gpu_figure"]:
        lines.append(
            "*** CPU SMOKE RUN: NOT A GPU FIGURE. No CUDA device; numbers below only show the code path "
            "works. Run on a GPU machine for real throughput. ***"
        )
    lines += [
        f"model: {r['model']}  device: {r['device']}  autocast: {r['autocast']}  batch: {r['batch_size']}",
        f"vision encoder:            {r['vision_slices_per_s']:9.2f} slices/s",
        f"per prompt (cached vision): {r['prompt_slices_per_s']:8.2f} slices/s   text encode "
        f"{1000 * r['text_encode_s']:.1f} ms/prompt",
        f"predict() end to end:      {r['predict_slices_per_s_all_prompts']:9.2f} slices/s for "
        f"{r['prompts']} prompts "
        f"(512x512, all instances kept, {r['slices_measured']} slices)",
        f"peer (forward per prompt, vision recomputed): {r['peer_slices_per_s_per_prompt']:.2f} "
        "slices/s per prompt",
    ]
    s = r["study_projection_s"]
    lines.append(
        f"projected {STUDY_SLICES}-slice, {STUDY_PROMPTS}-prompt study: {s['cached_vision']:.1f} s "
        f"(model only), {s['predict_end_to_end']:.1f} s (predict end to end, {r['prompts']} prompts); peer "
        f"{s['peer_recompute_vision']:.1f} s; ratio peer/ours = {r['ratio_peer_over_ours']:.2f}x"
    )
    if r["peak_gpu_gib"] is not None:
        lines.append(f"peak GPU memory during predict: {r['peak_gpu_gib']:.2f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=0, help="slices for the predict() measurement")
    p.add_argument("--prompts", type=int, default=STUDY_PROMPTS, choices=range(1, len(PROMPTS) + 1))
    p.add_argument("--batch-size", type=int, default=0, help="default: the shipped settings.batch_size")
    p.add_argument("--repeats", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="ignore CUDA even when present")
    p.add_argument(
        "--full-cpu", action="store_true", help="without CUDA: full-size model on 1 slice (minutes)"
    )
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

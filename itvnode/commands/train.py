"""``itvnode train --out DIR``: fine-tune a LoRA adapter for SAM 3 on annotated volumes (docs/training.md).

Data (any mix, each option repeatable): ``--phantom DIR`` (written by ``itvnode phantom``: ground truth + the
spec to regenerate the HU), ``--dicom DIR`` (CT series + RTSTRUCT, ROI names mapped by ``--roi-map`` / the
``roi_map`` setting), ``--nifti IMAGE:LABELS`` (label values mapped by ``--labels 1=Lung_L,...``).
Each phase of a 4DCT counts as one volume; the validation split never separates a patient's volumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from itvnode.commands import DefaultsHelpFormatter

log = logging.getLogger("itvnode.train")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--phantom",
        action="append",
        default=[],
        metavar="DIR",
        help="phantom written by `itvnode phantom` (its folder or ground_truth/)",
    )
    parser.add_argument(
        "--dicom",
        action="append",
        default=[],
        metavar="DIR",
        help="folder with CT series and RTSTRUCT(s) drawn on them",
    )
    parser.add_argument(
        "--nifti", action="append", default=[], metavar="IMAGE:LABELS", help="NIfTI CT and its label map"
    )
    parser.add_argument("--labels", metavar="MAP", help="NIfTI label values, e.g. 1=Lung_L,2=Lung_R,3=Heart")
    parser.add_argument(
        "--roi-map",
        metavar="YAML",
        help="RTSTRUCT ROI name (regex) -> structure name mapping (default: setting roi_map)",
    )


class TrainHelpFormatter(DefaultsHelpFormatter):
    """``--help`` shows every default; an unset hyper-parameter uses ``TrainConfig``'s, read only when help is
    printed (so that building the CLI never imports torch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None and action.dest in train_defaults():
            value = train_defaults()[action.dest]
            return f"{text} (default: {str(value).replace('%', '%%')})"
        return super()._get_help_string(action)


def train_defaults() -> dict[str, Any]:
    """``TrainConfig`` field defaults as ``--help`` shows them (tuples comma-separated)."""
    import dataclasses

    from models.training.config import TrainConfig

    out: dict[str, Any] = {}
    for k, v in dataclasses.asdict(TrainConfig()).items():
        out[k] = ",".join(map(str, v)) if isinstance(v, list | tuple) else v
    out["loss"] = json.dumps(out["loss"])
    if out.get("steps_per_epoch") is None:
        out["steps_per_epoch"] = "one pass over the training slices"
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = TrainHelpFormatter
    parser.add_argument("--out", required=True, metavar="DIR", help="adapter + training.json + checkpoint")
    add_data_arguments(parser)
    parser.add_argument("--sam3-dir", metavar="DIR", help="base SAM 3 (HF format; default: setting sam3_dir)")
    parser.add_argument(
        "--structures", metavar="NAMES", help="comma-separated SAM 3 structures (default: all)"
    )
    parser.add_argument(
        "--group-by-phase",
        action="store_true",
        help="phantom: each phase its own split group (hold out phases of one patient)",
    )
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of patients held out")
    parser.add_argument("--val-groups", metavar="NAMES", help="comma-separated validation groups")
    g = parser.add_argument_group("hyper-parameters (defaults: models.training.trainer.TrainConfig)")
    for name, typ in (
        ("epochs", int),
        ("steps-per-epoch", int),
        ("batch-size", int),
        ("grad-accum", int),
        ("lr", float),
        ("weight-decay", float),
        ("warmup-steps", int),
        ("lora-r", int),
        ("lora-alpha", int),
        ("lora-dropout", float),
        ("seed", int),
        ("mining-every", int),
        ("mining-pool", int),
        ("hard-mix", float),
        ("negative-fraction", float),
        ("max-grad-norm", float),
        ("checkpoint-every", int),
        ("band-px", int),
        ("hu-tolerance", float),
        ("score-threshold", float),
    ):
        g.add_argument(f"--{name}", type=typ, help=name.replace("-", " "))
    g.add_argument("--lora-targets", metavar="NAMES", help="Linear layer names, e.g. q_proj,v_proj")
    g.add_argument("--lora-components", metavar="NAMES", help="vision,text,detr,mask,geometry")
    g.add_argument(
        "--train-modules",
        metavar="NAMES",
        help="modules trained in full, e.g. mask_embedder,presence_head (aliases in docs/training.md)",
    )
    g.add_argument("--loss", metavar="JSON", help='loss weights, e.g. {"dice": 2, "focal": 1}')
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: setting device)")
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _csv(text: str | None) -> tuple[str, ...] | None:
    return tuple(p.strip() for p in text.split(",") if p.strip()) if text else None


def read_roi_map(path: str | None, settings: Any) -> dict[str, str]:
    if not path:
        return dict(settings.roi_map)
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of ROI name patterns to structure names")
    return {str(k): str(v) for k, v in data.items()}


def phantom_arrays(folder: str | Path) -> tuple[Any, Any, dict[str, Any], str]:
    """(hu (P,Z,Y,X), ground truth, meta, patient name) of a phantom folder; HU regenerated from its spec."""
    import numpy as np

    from models.phantom import make_phantom
    from models.phantom_spec import PhantomSpec
    from models.phantom_truth import load_ground_truth

    p = Path(folder)
    gt_dir = p / "ground_truth" if (p / "ground_truth").is_dir() else p
    if not (gt_dir / "ground_truth.npz").is_file():
        raise ValueError(f"{folder}: not a phantom folder (no ground_truth/ground_truth.npz)")
    truth = load_ground_truth(gt_dir)
    spec_d = truth.meta.get("spec")
    if not spec_d:
        raise ValueError(f"{gt_dir}: ground_truth.json has no phantom spec to regenerate the CT from")
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in spec_d.items()}
    spec = PhantomSpec(**fields)
    phantom = make_phantom(spec)
    if tuple(phantom.shape) != tuple(truth.shape):
        raise ValueError(f"{gt_dir}: the spec regenerates {phantom.shape}, the ground truth is {truth.shape}")
    hu = np.stack([phantom.phase_hu(i) for i in range(spec.n_phases)])
    return hu, truth, truth.meta, f"phantom-{spec.digest()[:8]}"


def load_volumes(
    args: argparse.Namespace, settings: Any, group_by_phase: bool = False
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Annotated volumes from every ``--phantom`` / ``--dicom`` / ``--nifti`` and their provenance."""
    from models.training.dataset import AnnotatedVolume, phantom_volumes
    from service.dicomio.nifti_read import parse_label_map, read_nifti_pair
    from service.dicomio.rtstruct_read import load_annotated_series

    volumes: list[AnnotatedVolume] = []
    sources: list[dict[str, Any]] = []
    for folder in args.phantom:
        hu, truth, meta, name = phantom_arrays(folder)
        vols = phantom_volumes(
            hu,
            truth.masks,
            truth.spacing,
            truth.phase_percents,
            patient=name,
            group_by="phase" if group_by_phase else "patient",
        )
        volumes += vols
        sources.append(
            {
                "kind": "phantom",
                "path": str(folder),
                "spec_digest": meta.get("spec_digest"),
                "volumes": len(vols),
            }
        )
    roi_map = read_roi_map(args.roi_map, settings)
    for folder in args.dicom:
        series = load_annotated_series(folder, roi_map)
        if not series:
            raise ValueError(f"{folder}: no CT series with an RTSTRUCT drawn on it")
        for s in series:
            volumes.append(
                AnnotatedVolume(
                    name=f"{s.patient_key}/{s.series_description or s.series_instance_uid}",
                    group=s.patient_key,
                    hu=s.hu,
                    masks=s.masks,
                    spacing=s.spacing,
                    meta={"series_instance_uid": s.series_instance_uid},
                )
            )
        sources.append({"kind": "dicom", "path": str(folder), "volumes": len(series), "roi_map": roi_map})
    if args.nifti:
        if not args.labels:
            raise ValueError("--nifti needs --labels VALUE=NAME,...")
        label_map = parse_label_map(args.labels)
        for pair in args.nifti:
            image, sep, labels = pair.partition(":")
            if not sep:
                raise ValueError(f"--nifti {pair!r} is not IMAGE:LABELS")
            vol, masks = read_nifti_pair(image, labels, label_map)
            stem = Path(image).name.split(".")[0]
            volumes.append(
                AnnotatedVolume(name=stem, group=stem, hu=vol.hu, masks=masks, spacing=vol.spacing)
            )
        sources.append(
            {"kind": "nifti", "pairs": list(args.nifti), "labels": {str(k): v for k, v in label_map.items()}}
        )
    if not volumes:
        raise ValueError("no annotated data: give --phantom, --dicom or --nifti")
    return volumes, sources


def _config(args: argparse.Namespace) -> Any:
    from models.training.config import TrainConfig
    from models.training.losses import LossWeights

    kw: dict[str, Any] = {}
    for name in (
        "epochs",
        "steps_per_epoch",
        "batch_size",
        "grad_accum",
        "lr",
        "weight_decay",
        "warmup_steps",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "seed",
        "mining_every",
        "mining_pool",
        "hard_mix",
        "negative_fraction",
        "max_grad_norm",
        "checkpoint_every",
        "band_px",
        "hu_tolerance",
        "score_threshold",
    ):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    for name in ("lora_targets", "lora_components", "train_modules"):
        v = _csv(getattr(args, name, None))
        if v is not None:
            kw[name] = v
    if args.loss:
        kw["loss"] = LossWeights(**json.loads(args.loss))
    if args.no_amp:
        kw["amp"] = False
    return TrainConfig(**kw)


def run(args: argparse.Namespace) -> int:
    import torch

    from models.sam3.loader import Sam3LoadError, load_sam3, model_identity, resolve_device
    from models.sam3.windowing import windows_from_pairs
    from models.training.dataset import split_by_group, targets_from_specs
    from models.training.trainer import Trainer
    from service.settings import load_settings
    from worker.engine_settings import engine_config

    settings = load_settings()
    engine = engine_config(settings)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = _config(args)
        volumes, sources = load_volumes(args, settings, args.group_by_phase)
        targets = targets_from_specs(engine.structures)
        wanted = _csv(args.structures)
        if wanted:
            unknown = sorted(set(wanted) - {t.name for t in targets})
            if unknown:
                raise ValueError(f"--structures {unknown} are not SAM 3 structures in the settings")
            targets = [t for t in targets if t.name in wanted]
        usable = [t for t in targets if all(all(m in v.masks for m in t.masks) for v in volumes)]
        for t in targets:
            if t not in usable:
                log.warning(
                    "structure %s is not annotated (%s) in every volume: not trained",
                    t.name,
                    "+".join(t.masks),
                )
        if not usable:
            raise ValueError("no structure is annotated in every volume; check --roi-map / --labels")
        train_idx, val_idx = split_by_group(volumes, args.val_fraction, config.seed, _csv(args.val_groups))
    except (ValueError, KeyError, OSError) as exc:
        print(f"itvnode train: {exc}", file=sys.stderr)
        return 2
    sam3_dir = args.sam3_dir or engine.sam3_dir
    try:
        device = resolve_device(args.device or engine.device)
        model, processor = load_sam3(sam3_dir, device)
        identity = model_identity(Path(str(sam3_dir)))
        if identity.get("trained") is False:
            log.warning("the base model is a RANDOM-INIT test model (%s): this adapter will mean nothing",
                        identity.get("model"))
    except Sam3LoadError as exc:
        print(f"itvnode train: {exc}", file=sys.stderr)
        return 2
    log.info(
        "training on %d volume(s) (%d groups), validating on %d; structures %s",
        len(train_idx),
        len({volumes[i].group for i in train_idx}),
        len(val_idx),
        ", ".join(t.name for t in usable),
    )
    trainer = Trainer(
        model,
        processor,
        volumes,
        usable,
        train_idx,
        val_idx,
        config,
        args.out,
        device=device,
        windows=windows_from_pairs(settings.hu_windows),
        base_identity=identity,
        data_sources=sources,
        progress=not args.no_progress,
    )
    result = trainer.fit(resume=not args.no_resume)
    if result.manifest:
        from models.evaluation.figures import plot_training

        png = plot_training(result.manifest, Path(args.out) / "training.png")
        log.info("training curves: %s", png)
    before = result.baseline.get("mean")
    after = result.final.get("mean")
    print(
        json.dumps(
            {
                "adapter_dir": str(result.out_dir),
                "steps": trainer.step,
                "val_dice_before": result.baseline,
                "val_dice_after": result.final,
            },
            indent=1,
        )
    )
    if before is not None and after is not None:
        log.info("validation mean Dice %.3f -> %.3f", before, after)
    return 0

"""``itvnode evaluate --out DIR``: Dice / HD95 / MSD of contours against annotated 4DCTs (docs/training.md).

Two ways to get the contours scored:

- the node's own engine (SAM 3, zero-shot next to adapted): studies from ``--phantom DIR`` (written by
  ``itvnode phantom``) or ``--dicom DIR`` (a 4DCT whose phases are detected exactly as the node does, with
  RTSTRUCT ground truth; ROI names via ``--roi-map``);
- ``--dicom TRUTH --predicted PRED``: RTSTRUCTs from any source (this node's output, another system, a second
  observer) drawn on the same CT series as TRUTH's; no model is loaded.

Per structure x phase and for the envelopes (ITV = union over phases): ``metrics.csv`` (``structure, phase,
dice, hd95, msd``, …), median [IQR] tables (CSV, Markdown, printed), volumes and centroids per phase
(``volumes.csv``), motion amplitude (``motion.csv``) and figures: box plots with the infinite values counted,
the worst slice per structure, volume curves, motion, envelope. Volumes whose hashes are in the adapter's
``training.json`` are flagged and left out of the summary unless ``--include-training``.

Long (~430 lines) because it is the command's orchestration: the scoring, shapes and figures are
models.evaluation's; the study readers lean on the CLI's own (``train.phantom_arrays``, ``read_roi_map``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itvnode.commands import DefaultsHelpFormatter

if TYPE_CHECKING:
    from worker.engine_settings import EngineConfig

log = logging.getLogger("itvnode.evaluate")

RANDOM_BANNER = (
    "RANDOM-INIT TEST MODEL (itvnode testmodel): NOT a trained SAM 3; these numbers mean nothing clinically"
)
PAPER_NOTE = (
    "Reference (the method's paper, LoRA SAM 3 on seven annotated volumes): median Dice 0.968 lungs, "
    "0.910 heart; zero-shot SAM 3 gave severe false positives. Compare Lung_L / Lung_R and Heart above."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument("--out", required=True, metavar="DIR", help="report directory")
    parser.add_argument("--phantom", action="append", default=[], metavar="DIR", help="phantom study")
    parser.add_argument(
        "--dicom", action="append", default=[], metavar="DIR", help="4DCT folder with RTSTRUCT ground truth"
    )
    parser.add_argument(
        "--predicted",
        metavar="DIR",
        help="RTSTRUCTs to score (any source) drawn on the --dicom CT series; no model is run",
    )
    parser.add_argument("--label", default="predicted", help="variant name of the --predicted contours")
    parser.add_argument("--roi-map", metavar="YAML", help="ROI name (regex) -> structure (default: setting)")
    parser.add_argument("--sam3-dir", metavar="DIR", help="base SAM 3 (default: setting sam3_dir)")
    parser.add_argument(
        "--adapter",
        metavar="DIR",
        help="LoRA adapter (default: setting adapter_dir); its training.json finds leaked volumes",
    )
    parser.add_argument(
        "--include-training",
        action="store_true",
        help="keep volumes listed in the adapter's training.json in the summary (they are flagged anyway)",
    )
    parser.add_argument("--no-zero-shot", action="store_true", help="only the adapted model")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: setting device)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


@dataclass
class Study:
    name: str
    hu: Any  # (P, Z, Y, X)
    spacing: tuple[float, float, float]
    percents: list[float]
    truth: dict[str, Any]  # name -> bool (P, Z, Y, X)
    predicted: dict[str, Any] | None = None  # --predicted: name -> bool (P, Z, Y, X)
    predicted_missing: list[int] = field(default_factory=list)  # phases no predicted RTSTRUCT draws on
    z_mm: list[float] | None = None  # slice positions (patient z)


def _phantom_study(folder: str) -> Study:
    from itvnode.commands.train import phantom_arrays

    hu, truth, _, name = phantom_arrays(folder)
    return Study(name, hu, truth.spacing, list(truth.phase_percents), dict(truth.masks))


def _dicom_studies(folder: str, roi_map: dict[str, str], settings: Any, predicted: str | None = None) -> list[
    Study
]:
    """The 4DCTs of ``folder`` with their RTSTRUCT truth and, with ``predicted``, the RTSTRUCTs to score from
    that folder (any source, drawn on the same CT series), both read by the one contour reader
    (service.dicomio.rtstruct_read.read_phase_contours: per-phase or combined layout)."""
    from service.dicomio.rtstruct_read import RTStructReadError, read_phase_contours, split_rtstructs
    from service.dicomio.volume import read_phases
    from service.intake.folder import assemble_folder
    from service.store.manifest import iter_manifests
    from service.store.state import StudyState

    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    rts, others, series = split_rtstructs(files)
    pred_rts: list[Path] = []
    if predicted:
        pred_rts, _, _ = split_rtstructs(sorted(p for p in Path(predicted).rglob("*") if p.is_file()))
        if not pred_rts:
            raise ValueError(f"{predicted}: no RTSTRUCT files")
    out = []
    with tempfile.TemporaryDirectory(prefix="itvnode-evaluate-") as tmp:
        work = Path(tmp)
        assemble_folder(
            others, work, expected_phases=settings.expected_phases, phase_rules=settings.phase_rules
        )
        for _, m in iter_manifests(work):
            if m.state != StudyState.COMPLETE:
                log.warning("study %s not evaluated: %s (%s)", m.study_key, m.state, m.reason)
                continue
            hu, geoms = read_phases(m, work)
            percents = [float(ph.percent) for ph in m.phases]
            try:
                contours = read_phase_contours(
                    rts, geoms, percents, roi_map, folder_series=series, only_mapped=False
                )
            except RTStructReadError as exc:
                log.warning("study %s: no RTSTRUCT ground truth: %s", m.study_key, exc)
                continue
            truth = {k: v for k, v in contours.masks.items() if v.any()}
            if not truth:
                log.warning("study %s: no RTSTRUCT contours on its phases", m.study_key)
                continue
            pred: dict[str, Any] = {}
            missing: list[int] = []
            if predicted:
                try:
                    pred = read_phase_contours(pred_rts, geoms, percents, roi_map, folder_series=series,
                                               only_mapped=False).masks
                except RTStructReadError as exc:  # nothing usable: every structure scored as not produced
                    log.warning("study %s: predicted RTSTRUCTs not used: %s", m.study_key, exc)
                drawn = [any(v[p].any() for v in pred.values()) for p in range(len(percents))]
                missing = [p for p, d in enumerate(drawn) if not d]
            out.append(Study(m.study_key, hu, geoms[0].spacing, percents, truth, pred if predicted else None,
                             missing, list(geoms[0].slice_positions)))
    if not out:
        raise ValueError(f"{folder}: no complete 4DCT with RTSTRUCT ground truth")
    return out


def _leak_flags(st: Study, hashes: dict[str, str]) -> list[str]:
    """Per phase: ``train`` / ``validation`` when the phase's CT (or CT + masks) is in training.json."""
    if not hashes:
        return [""] * len(st.percents)
    from models.training.dataset import AnnotatedVolume, image_digest

    flags = []
    for p in range(len(st.percents)):
        flag = hashes.get(image_digest(st.hu[p], st.spacing), "")
        if not flag:
            vol = AnnotatedVolume(name=st.name, group=st.name, hu=st.hu[p],
                                  masks={k: v[p] for k, v in st.truth.items()}, spacing=st.spacing)
            flag = hashes.get(vol.digest(), "")
        flags.append(flag)
    return flags


def _apply_flags(rows: list[Any], st: Study, flags: list[str]) -> list[Any]:
    by_phase = {f"P{pct:g}": f for pct, f in zip(st.percents, flags, strict=True)}
    env_flag = next((f for f in flags if f), "")
    missing = {f"P{st.percents[p]:g}" for p in st.predicted_missing}
    out = []
    for r in rows:
        flag = env_flag if r.phase == "envelope" else by_phase.get(r.phase, "")
        note = r.note
        if r.phase in missing:
            note = "; ".join(x for x in (note, "no predicted RTSTRUCT on this phase") if x)
        out.append(dataclasses.replace(r, training=flag, note=note))
    return out


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from itvnode.commands.train import read_roi_map
    from models.engine import output_structures
    from models.evaluation.scores import MetricRow, evaluate_study
    from models.evaluation.shapes import ShapeRow, shape_rows
    from models.evaluation.worst_slices import ErrorSlice, keep_worst, worst_error_slice
    from models.training.manifest import read_manifest, training_hashes
    from service.dicomio.rtstruct_read import RTStructReadError
    from service.settings import load_settings
    from worker.engine_settings import engine_config

    settings = load_settings()
    out = Path(args.out)
    engine = engine_config(settings)  # the structures and temporal rule production uses
    specs = list(engine.structures)
    outputs = output_structures(specs)
    produced = {o.name for o in outputs}
    envelope_of = {o.name: o.envelope_name for o in outputs if o.envelope_name}
    envelope_names = set(envelope_of.values())
    if args.predicted and (args.phantom or not args.dicom):
        print("itvnode evaluate: --predicted scores RTSTRUCTs against --dicom TRUTH (not --phantom)",
              file=sys.stderr)
        return 2
    try:
        studies = [_phantom_study(f) for f in args.phantom]
        roi_map = read_roi_map(args.roi_map, settings)
        for folder in args.dicom:
            studies += _dicom_studies(folder, roi_map, settings, args.predicted)
    except (ValueError, OSError, RTStructReadError) as exc:
        print(f"itvnode evaluate: {exc}", file=sys.stderr)
        return 2
    if not studies:
        print("itvnode evaluate: no studies: give --phantom or --dicom", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    adapter = args.adapter or engine.adapter_dir
    context: dict[str, Any] = {"studies": ", ".join(s.name for s in studies)}
    variants: list[tuple[str, Path | None]] = []
    if args.predicted:
        variants.append((args.label, None))
        context["contours scored"] = f"RTSTRUCTs in {args.predicted} ({args.label}); no model run"
    else:
        if not args.no_zero_shot:
            variants.append(("zero-shot", None))
        if adapter:
            variants.append(("adapted", Path(str(adapter))))
    if not variants:
        print("itvnode evaluate: nothing to evaluate (--no-zero-shot without an adapter)", file=sys.stderr)
        return 2
    manifest = read_manifest(adapter) if adapter and Path(str(adapter)).is_dir() else None
    hashes = training_hashes(manifest)
    if manifest:
        context["adapter trained"] = (
            f"{manifest.get('steps')} steps, validation Dice "
            f"{manifest.get('validation', {}).get('before', {}).get('mean')} -> "
            f"{manifest.get('validation', {}).get('after', {}).get('mean')}"
        )
    flags = {st.name: _leak_flags(st, hashes) for st in studies}
    banner = ""
    rows: list[MetricRow] = []
    shapes: list[ShapeRow] = []
    worst: dict[str, ErrorSlice] = {}
    for st in studies:  # truth: once per study
        keep = {k: v for k, v in st.truth.items() if k not in envelope_names}
        if not args.predicted:
            keep = {k: v for k, v in keep.items() if k in produced}
        st.truth = keep
        env = {envelope_of[k]: v.any(axis=0) for k, v in keep.items() if k in envelope_of}
        shapes += shape_rows(st.name, "truth", keep, st.spacing, st.percents, env, flags[st.name])
    for vi, (variant, adapter_dir) in enumerate(variants):
        seg = None
        if not args.predicted:
            seg = _segmenter(args, engine, adapter_dir)
            if seg is None:
                return 2
            info = seg.version_info()
            context[f"model ({variant})"] = info.get("version")
            if info.get("trained") is False:
                banner = RANDOM_BANNER
                log.warning("%s", RANDOM_BANNER)
        for st in studies:
            t0 = time.perf_counter()
            truth = st.truth
            if st.predicted is not None:
                pred = {k: st.predicted[k] for k in truth if k in st.predicted}
                skipped = {k: f"no ROI mapped to {k} in {args.predicted}" for k in truth if k not in pred}
                pred_env = {envelope_of[k]: v.any(axis=0) for k, v in pred.items() if k in envelope_of}
            else:
                from models.engine import segment_volume

                res = segment_volume(st.hu, st.spacing, specs, seg, engine.temporal,
                                     phase_percents=st.percents, study_key=st.name)
                pred, pred_env, skipped = res.masks, res.envelopes, res.skipped
            truth_env = {envelope_of[k]: v.any(axis=0) for k, v in truth.items() if k in envelope_of}
            rows += _apply_flags(
                evaluate_study(st.name, variant, pred, truth, st.spacing, st.percents, pred_env, truth_env,
                                  skipped),
                st,
                flags[st.name],
            )
            shapes += shape_rows(
                st.name, variant, {k: pred.get(k, np.zeros_like(v)) for k, v in truth.items()}, st.spacing,
                st.percents, {k: pred_env.get(k, np.zeros_like(v)) for k, v in truth_env.items()},
                flags[st.name],
            )
            if vi == len(variants) - 1:
                for name, gt in truth.items():
                    pm = pred.get(name, np.zeros_like(gt))
                    for p, pct in enumerate(st.percents):
                        if flags[st.name][p] and not args.include_training:
                            continue
                        keep_worst(worst, worst_error_slice(
                            name, st.name, variant, f"P{pct:g}", st.hu[p], pm[p], gt[p], st.spacing, st.z_mm))
            log.info("%s %s: evaluated in %.1f s", st.name, variant, time.perf_counter() - t0)
    _write_report(args, out, rows, shapes, worst, context, banner, flags, studies)
    return 0


def _segmenter(args: argparse.Namespace, engine: EngineConfig, adapter_dir: Path | None) -> Any:
    import torch

    from models.sam3.loader import Sam3LoadError, build_segmenter

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return build_segmenter(
            args.sam3_dir or engine.sam3_dir,
            adapter_dir,
            device=args.device or engine.device,
            batch_size=engine.batch_size,
            windows=engine.hu_windows,
        )
    except Sam3LoadError as exc:
        print(f"itvnode evaluate: {exc}", file=sys.stderr)
        return None


def _write_report(
    args: argparse.Namespace,
    out: Path,
    rows: list[Any],
    shapes: list[Any],
    worst: dict[str, Any],
    context: dict[str, Any],
    banner: str,
    flags: dict[str, list[str]],
    studies: list[Study],
) -> None:
    import numpy as np

    from models.evaluation.figures import (
        envelope_figure,
        motion_figure,
        plot_boxplots,
        plot_worst_slices,
        save_figure,
        volumes_figure,
    )
    from models.evaluation.scores import (
        ENVELOPE_PHASE,
        markdown_report,
        summarise,
        write_rows_csv,
        write_summary_csv,
    )
    from models.evaluation.shapes import motion_amplitudes, write_motion_csv, write_shape_csv
    from models.evaluation.worst_slices import write_worst_csv
    include = bool(args.include_training)
    summary = summarise(rows, include_training=include)
    used_rows = [r for r in rows if include or not r.training]
    used_shapes = [s for s in shapes if include or not s.training]
    write_rows_csv(rows, out / "metrics.csv")
    write_summary_csv(summary, out / "summary.csv")
    write_shape_csv(shapes, out / "volumes.csv")
    motion = motion_amplitudes(used_shapes)
    write_motion_csv(motion, out / "motion.csv")
    figures = []
    if used_rows:
        figures.append(plot_boxplots(used_rows, out / "boxplots.png", banner).name)
    if worst:
        items = sorted(worst.values(), key=lambda w: w.structure)
        figures.append(plot_worst_slices(items, out / "worst_slices.png", banner).name)
        write_worst_csv(items, out / "worst_slices.csv")
    if used_shapes:
        figures.append(save_figure(volumes_figure(used_shapes, banner), out / "volumes.png").name)
        figures.append(save_figure(motion_figure(motion, banner), out / "motion.png").name)
        if any(s.phase == ENVELOPE_PHASE for s in used_shapes):
            figures.append(save_figure(envelope_figure(used_shapes, used_rows, banner), out / "itv.png").name)
    notes = []
    leaked = [
        f"{st.name} P{pct:g} ({f})"
        for st in studies
        for pct, f in zip(st.percents, flags[st.name], strict=True)
        if f
    ]
    if leaked:
        notes.append(
            f"**Training data:** {len(leaked)} volume(s) are listed in the adapter's training.json and are "
            + ("INCLUDED in the summary (--include-training): " if include else "EXCLUDED from the summary "
               "and the figures (flagged in metrics.csv): ")
            + ", ".join(leaked)
        )
    missing = [f"{st.name} P{st.percents[p]:g}" for st in studies for p in st.predicted_missing]
    if missing:
        notes.append("**No predicted RTSTRUCT** on: " + ", ".join(missing) + " (scored as empty predictions)")
    notes.append(PAPER_NOTE)
    md = markdown_report(summary, "itvnode evaluation", context, figures, banner=banner, notes=notes)
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(
        json.dumps(
            {
                "warning": banner or None,
                "context": context,
                "training_volumes": leaked,
                "training_volumes_included": include,
                "summary": [
                    {
                        "variant": s.variant,
                        "structure": s.structure,
                        "n": s.n,
                        "stats": {
                            m: [None if not np.isfinite(x) else x for x in v] for m, v in s.stats.items()
                        },
                    }
                    for s in summary
                ],
            },
            indent=1,
        )
        + "\n"
    )
    table = md.split("\n\n")
    print("\n\n".join(t for t in table if t.startswith(("|", "> **WARNING"))))
    print(PAPER_NOTE)
    if leaked and not include:
        print(f"{len(leaked)} training volume(s) excluded from the summary (see report.md)")
    print(f"report written to {out / 'report.md'}")


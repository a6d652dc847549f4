"""``itvnode evaluate --out DIR``: run the engine on annotated 4DCTs and report Dice / HD95 / MSD.

Per structure x phase and for the envelopes (ITV = union of the ground truth over phases), zero-shot SAM 3 (no
adapter) next to the adapted model; median [IQR] tables as CSV and Markdown, box plots and overlays of the
worst slices as PNG. Studies: ``--phantom DIR`` (written by ``itvnode phantom``) or ``--dicom DIR`` (a 4DCT
whose phases are detected exactly as the node does, with RTSTRUCT ground truth; ROI names via ``--roi-map``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("itvnode.evaluate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="report directory")
    parser.add_argument("--phantom", action="append", default=[], metavar="DIR", help="phantom study")
    parser.add_argument(
        "--dicom", action="append", default=[], metavar="DIR", help="4DCT folder with RTSTRUCT ground truth"
    )
    parser.add_argument("--roi-map", metavar="YAML", help="ROI name (regex) -> structure (default: setting)")
    parser.add_argument("--sam3-dir", metavar="DIR", help="base SAM 3 (default: setting sam3_dir)")
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter (default: setting adapter_dir)")
    parser.add_argument("--no-zero-shot", action="store_true", help="only the adapted model")
    parser.add_argument("--worst", type=int, default=8, help="worst slices to draw (default 8)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: setting device)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


@dataclass
class Study:
    name: str
    hu: Any  # (P, Z, Y, X)
    spacing: tuple[float, float, float]
    percents: list[float]
    truth: dict[str, Any]  # name -> bool (P, Z, Y, X)


def _phantom_study(folder: str) -> Study:
    from itvnode.commands.train import phantom_arrays

    hu, truth, _, name = phantom_arrays(folder)
    return Study(name, hu, truth.spacing, list(truth.phase_percents), dict(truth.masks))


def _dicom_studies(folder: str, roi_map: dict[str, str], settings: Any) -> list[Study]:
    from service.assembler import assemble_folder
    from service.manifest import iter_manifests
    from service.rtstruct_read import RTStructReadError, read_phase_contours, split_rtstructs
    from service.volume import read_phases

    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    rts, others, series = split_rtstructs(files)
    out = []
    with tempfile.TemporaryDirectory(prefix="itvnode-evaluate-") as tmp:
        work = Path(tmp)
        assemble_folder(
            others, work, expected_phases=settings.expected_phases, phase_rules=settings.phase_rules
        )
        for _, m in iter_manifests(work):
            if m.state != "complete":
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
            out.append(Study(m.study_key, hu, geoms[0].spacing, percents, truth))
    if not out:
        raise ValueError(f"{folder}: no complete 4DCT with RTSTRUCT ground truth")
    return out


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from itvnode.commands.train import read_roi_map
    from models import evaluation as ev
    from models.engine import output_structures, segment_volume
    from models.sam3_loader import Sam3LoadError, build_segmenter
    from models.training.manifest import read_manifest
    from service.settings import load_settings
    from worker.engine_settings import engine_config, temporal_params

    settings = load_settings()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = engine_config(settings)  # the structures and temporal rule production uses
    specs = list(engine.structures)
    outputs = output_structures(specs)
    produced = {o.name for o in outputs}
    envelope_of = {o.name: o.envelope_name for o in outputs if o.envelope_name}
    try:
        studies = [_phantom_study(f) for f in args.phantom]
        roi_map = read_roi_map(args.roi_map, settings)
        for folder in args.dicom:
            studies += _dicom_studies(folder, roi_map, settings)
    except (ValueError, OSError) as exc:
        print(f"itvnode evaluate: {exc}", file=sys.stderr)
        return 2
    if not studies:
        print("itvnode evaluate: no studies: give --phantom or --dicom", file=sys.stderr)
        return 2
    sam3_dir = args.sam3_dir or settings.sam3_dir
    adapter = args.adapter or settings.adapter_dir
    variants: list[tuple[str, Path | None]] = []
    if not args.no_zero_shot:
        variants.append(("zero-shot", None))
    if adapter:
        variants.append(("adapted", Path(str(adapter))))
    if not variants:
        print("itvnode evaluate: nothing to evaluate (--no-zero-shot without an adapter)", file=sys.stderr)
        return 2
    temporal = temporal_params(engine)
    rows: list[ev.MetricRow] = []
    context: dict[str, Any] = {"studies": ", ".join(s.name for s in studies)}
    overlays: list[tuple[str, Any, Any, Any]] = []
    for variant, adapter_dir in variants:
        try:
            seg = build_segmenter(
                sam3_dir,
                adapter_dir,
                device=args.device or settings.device,
                batch_size=settings.batch_size,
                windows=settings.hu_windows,
            )
        except Sam3LoadError as exc:
            print(f"itvnode evaluate: {exc}", file=sys.stderr)
            return 2
        info = seg.version_info()
        context[f"model ({variant})"] = info.get("version")
        if info.get("trained") is False:
            context[f"note ({variant})"] = (
                "the base model is a RANDOM-INIT test model: numbers mean nothing clinically"
            )
        if adapter_dir is not None:
            manifest = read_manifest(adapter_dir)
            if manifest:
                context["adapter trained"] = (
                    f"{manifest.get('steps')} steps, validation Dice "
                    f"{manifest.get('validation', {}).get('before', {}).get('mean')} -> "
                    f"{manifest.get('validation', {}).get('after', {}).get('mean')}"
                )
        for st in studies:
            t0 = time.perf_counter()
            res = segment_volume(
                st.hu, st.spacing, specs, seg, temporal, phase_percents=st.percents, study_key=st.name
            )
            truth = {k: v for k, v in st.truth.items() if k in produced}
            truth_env = {envelope_of[k]: v.any(axis=0) for k, v in truth.items() if k in envelope_of}
            rows += ev.evaluate_study(
                st.name,
                variant,
                res.masks,
                truth,
                st.spacing,
                st.percents,
                res.envelopes,
                truth_env,
                res.skipped,
            )
            log.info("%s %s: evaluated in %.1f s", st.name, variant, time.perf_counter() - t0)
            if variant == variants[-1][0]:
                worst: list[tuple[float, str, int, int]] = []
                for name, gt in truth.items():
                    pred = res.masks.get(name, np.zeros_like(gt))
                    for p in range(gt.shape[0]):
                        for z, d in ev.worst_slices(st.hu[p], pred[p], gt[p], 1):
                            worst.append((d, name, p, z))
                worst.sort()
                for d, name, p, z in worst[: args.worst]:
                    pred = res.masks.get(name, np.zeros_like(st.truth[name]))
                    overlays.append(
                        (
                            f"{st.name} {name} P{st.percents[p]:g} z{z} Dice {d:.2f}",
                            st.hu[p, z],
                            st.truth[name][p, z],
                            pred[p, z],
                        )
                    )
    summary = ev.summarise(rows)
    ev.write_rows_csv(rows, out / "metrics.csv")
    ev.write_summary_csv(summary, out / "summary.csv")
    figures = [ev.plot_boxplots(rows, out / "boxplots.png").name]
    if overlays:
        figures.append(ev.plot_overlays(overlays, out / "worst_slices.png").name)
    (out / "report.md").write_text(ev.markdown_report(summary, "itvnode evaluation", context, figures))
    (out / "report.json").write_text(
        json.dumps(
            {
                "context": context,
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
    print(f"report written to {out / 'report.md'}")
    return 0

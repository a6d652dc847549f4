"""``itvnode itv DICOM_DIR --out DIR``: the node's post-processing on per-phase contours a site already has.

``DICOM_DIR`` holds a 4DCT's phase series and RTSTRUCT(s) drawn on them: one RTSTRUCT per phase series (the
TCIA 4D-Lung layout) or one referencing every phase with per-phase ROI names (our combined layout,
``GTVp^P40``). ROI names map to structures through the ``roi_map`` setting (``--roi-map YAML`` replaces it).
The phases are detected exactly as ``itvnode segment`` does (:mod:`itvnode.commands.offline`); then
:func:`worker.contours.process_contours` places the contours on their phases and runs the engine's
post-processing (temporal filter, connectivity, envelopes: the GTV's is ``ITV``, QA) and writes the
RTSTRUCT(s) (``--layout`` or the setting), ``qa.json`` and the QA report (``report/``, ``DOC.<uid>.dcm``:
as ``itvnode segment``) into ``DIR``.

Exit status: 0 written; 1 nothing usable (no phases, no RTSTRUCT, no ROI matching ``roi_map``, an RTSTRUCT
referencing a series that is not in the folder); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dicom_dir", metavar="DICOM_DIR", help="4DCT phase series and RTSTRUCT(s) (searched recursively)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="where RTSTRUCT(s) and qa.json go")
    parser.add_argument(
        "--roi-map", metavar="YAML", help="ROI name (regex) -> structure (default: setting roi_map)"
    )
    parser.add_argument(
        "--layout", choices=["combined", "per-series"], help="output RTSTRUCT layout (default: setting)"
    )
    parser.add_argument("--work-dir", help="keep the working data directory here (default: a temporary one)")


def run(args: argparse.Namespace) -> int:
    from itvnode.commands.offline import intake, publish, target_dir, work_dir
    from itvnode.commands.train import read_roi_map
    from service.dicomio.rtstruct_read import split_rtstructs
    from service.settings import load_settings
    from worker.contours import process_contours
    from worker.engine_settings import engine_config
    from worker.stages import PipelineError

    src = Path(args.dicom_dir)
    if not src.is_dir():
        print(f"itvnode itv: {src} is not a directory", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {"layout": args.layout} if args.layout else {}
    settings = load_settings(**overrides)
    try:
        roi_map = read_roi_map(args.roi_map, settings)
    except (OSError, ValueError) as exc:
        print(f"itvnode itv: --roi-map: {exc}", file=sys.stderr)
        return 2
    cfg = engine_config(settings)
    out = Path(args.out)

    files = sorted(p for p in src.rglob("*") if p.is_file())
    rtstructs, others, series = split_rtstructs(files)
    if not rtstructs:
        print(f"itvnode itv: no RTSTRUCT in {src} ({len(files)} files)", file=sys.stderr)
        return 1
    with work_dir(args.work_dir, "itv") as work:
        manifests = intake("itv", src, others, work, settings)
        if not manifests:
            return 1
        status = 0
        for path, m in manifests:
            try:
                outcome = process_contours(
                    m.study_key, work, cfg, rtstructs, roi_map, folder_series=sorted(series)
                )
            except PipelineError as exc:
                print(f"itvnode itv: study {m.study_key}: {exc}", file=sys.stderr)
                status = 1
                continue
            target = target_dir(out, manifests, m.study_key)
            qa_file = outcome.files[0].parent / "qa.json"
            qa = publish(outcome.files, qa_file, path, src, target, m.reason, outcome.report_files)
            used = ", ".join(sorted({r["structure"] for r in qa["rois"]}))
            print(
                f"study {m.study_key}: {len(qa['phases'])} phases, {len(qa['rtstructs'])} RTSTRUCT(s), "
                f"structures {used} -> " + ", ".join(str(target / f.name) for f in outcome.files)
            )
            for w in outcome.warnings:
                print(f"  WARNING: {w}", file=sys.stderr)
            if qa["unmapped_rois"]:
                print("  not used (no roi_map match): " + ", ".join(qa["unmapped_rois"]), file=sys.stderr)
            print("  timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in outcome.timings.items()))
        return status

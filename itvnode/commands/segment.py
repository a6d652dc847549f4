"""``itvnode segment DICOM_DIR --out DIR``: the whole pipeline on a folder; no network, no queue.

The folder is read exactly as the node would receive it: every DICOM file goes through the same header checks
and into a private spool (a temporary data directory), the assembler's phase detection builds the manifest,
and :func:`worker.pipeline.process_study` runs on it. Results: ``RS.<uid>.dcm`` file(s), ``qa.json``, the QA
report (``report/report.pdf`` + ``report/page-N.png``, and ``DOC.<uid>.dcm``, its Encapsulated PDF, with
``send_qa_report``) in ``DIR`` (one sub-folder per study key when the folder holds several 4D sets).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dicom_dir", metavar="DICOM_DIR", help="folder with the 4DCT (searched recursively)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where RTSTRUCT(s) and qa.json go")
    parser.add_argument(
        "--layout", choices=["combined", "per-series"], help="RTSTRUCT layout (default: setting)"
    )
    parser.add_argument("--work-dir", help="keep the working data directory here (default: a temporary one)")


def run(args: argparse.Namespace) -> int:
    from itvnode.commands.offline import intake, publish, qa_summary_lines, target_dir, work_dir
    from service.settings import load_settings
    from worker.engine_settings import engine_config, load_segmenter
    from worker.pipeline import process_study
    from worker.result_files import QA_FILE, results_dir
    from worker.stages import PipelineError
    from worker.study_inputs import RUNNABLE_STATES

    src = Path(args.dicom_dir)
    if not src.is_dir():
        print(f"itvnode segment: {src} is not a directory", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {"layout": args.layout} if args.layout else {}
    settings = load_settings(**overrides)
    cfg = engine_config(settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with work_dir(args.work_dir, "segment") as work:
        files = sorted(p for p in src.rglob("*") if p.is_file())
        manifests = intake("segment", src, files, work, settings)
        if not manifests:
            return 1
        seg = load_segmenter(cfg)
        status = 0
        for path, m in manifests:
            if m.state not in RUNNABLE_STATES:  # done/failed in a kept --work-dir: re-send / re-run
                print(f"study {m.study_key}: {m.state}: {m.reason}", file=sys.stderr)
                status = 1
                continue
            try:
                outcome = process_study(m.study_key, work, cfg, seg, [])
            except PipelineError as exc:
                print(f"study {m.study_key}: failed: {exc}", file=sys.stderr)
                status = 1
                continue
            target = target_dir(out, manifests, m.study_key)
            qa_file = results_dir(work, m.study_key) / QA_FILE
            qa = publish(outcome.files, qa_file, path, src, target, m.reason, outcome.report_files)
            print(
                f"study {m.study_key}: {len(qa['phases'])} phases -> "
                + ", ".join(str(target / f.name) for f in outcome.files)
            )
            for name, why in outcome.skipped.items():
                print(f"  WARNING: {name} not contoured: {why}", file=sys.stderr)
            print("  timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in outcome.timings.items()))
            report = target / "report" if outcome.report_files else None
            print("\n".join(qa_summary_lines(qa, report)))
        return status

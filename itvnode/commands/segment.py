"""``itvnode segment DICOM_DIR --out DIR``: the whole pipeline on a folder; no network, no queue.

The folder is read exactly as the node would receive it: every DICOM file goes through the same header checks
and into a private spool (a temporary data directory), the assembler's phase detection builds the manifest,
and :func:`worker.pipeline.process_study` runs on it. Results: ``RS.<uid>.dcm`` file(s) and ``qa.json`` in
``DIR`` (one sub-folder per study key when the folder holds several 4D sets).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
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
    import logging

    from service.assembler import assemble_folder
    from service.manifest import iter_manifests, load_manifest
    from service.settings import load_settings
    from worker.engine_settings import engine_config, load_segmenter
    from worker.pipeline import RUNNABLE_STATES, PipelineError, process_study, results_dir

    log = logging.getLogger("itvnode.segment")
    src = Path(args.dicom_dir)
    if not src.is_dir():
        print(f"itvnode segment: {src} is not a directory", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {"layout": args.layout} if args.layout else {}
    settings = load_settings(**overrides)
    cfg = engine_config(settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="itvnode-segment-")
        work = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        files = sorted(p for p in src.rglob("*") if p.is_file())
        stored, skipped_files = assemble_folder(
            files, work, expected_phases=settings.expected_phases, phase_rules=settings.phase_rules
        )
        log.info(
            "read %d DICOM instance(s) from %s in %.1f s%s",
            stored,
            src,
            time.perf_counter() - t0,
            f"; ignored {skipped_files}" if skipped_files else "",
        )
        manifests = list(iter_manifests(work))
        if not manifests:
            print(
                f"itvnode segment: no respiratory-phase series found in {src} ({stored} DICOM instances)",
                file=sys.stderr,
            )
            return 1
        seg = load_segmenter(cfg)
        status = 0
        for path, m in manifests:
            target = out if len(manifests) == 1 else out / m.study_key
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
            target.mkdir(parents=True, exist_ok=True)
            for f in outcome.files:
                shutil.copy2(f, target / f.name)
            qa = json.loads((results_dir(work, m.study_key) / "qa.json").read_text())
            final = load_manifest(path)
            qa["study_instance_uid"] = final.study_instance_uid
            qa["phases"] = [
                {
                    "percent": p.percent,
                    "series_instance_uid": p.series_instance_uid,
                    "series_description": p.series_description,
                    "slices": p.slices,
                }
                for p in final.phases
            ]
            qa["references"] = [
                {"kind": r.kind, "series_instance_uid": r.series_instance_uid} for r in final.references
            ]
            qa["assembly"] = m.reason
            qa["source"] = str(src.resolve())
            (target / "qa.json").write_text(json.dumps(qa, indent=1) + "\n")
            print(
                f"study {m.study_key}: {len(final.phases)} phases -> "
                + ", ".join(str(target / f.name) for f in outcome.files)
            )
            for name, why in outcome.skipped.items():
                print(f"  WARNING: {name} not contoured: {why}", file=sys.stderr)
            print("  timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in outcome.timings.items()))
        return status
    finally:
        if tmp is not None:
            tmp.cleanup()

"""What the offline commands (``itvnode segment``, ``itvnode itv``) share: a DICOM folder read exactly as the
node would receive it, and the result folder handed to the user.

:func:`intake` puts every file through the SCP's header checks into a private spool (a temporary data
directory unless ``--work-dir``) and lets the assembler's phase detection build the manifests
(:func:`service.intake.folder.assemble_folder`); :func:`publish` copies one study's result files and
writes its ``qa.json`` with the phases, references and assembly note of its manifest.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("itvnode.offline")


@contextmanager
def work_dir(keep: str | None, command: str) -> Iterator[Path]:
    """``keep`` (created, kept) or a temporary data directory removed afterwards."""
    if keep:
        work = Path(keep)
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix=f"itvnode-{command}-") as tmp:
        yield Path(tmp)


def intake(
    command: str, src: Path, files: Sequence[Path], work: Path, settings: Any
) -> list[tuple[Path, Any]]:
    """Assemble ``files`` into manifests under ``work``; ``[(manifest path, Manifest)]``, empty (after
    printing why) when no respiratory-phase series was found."""
    from service.intake.folder import assemble_folder
    from service.store.manifest import iter_manifests

    t0 = time.perf_counter()
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
            f"itvnode {command}: no respiratory-phase series found in {src} ({stored} DICOM instances)",
            file=sys.stderr,
        )
    return manifests


def target_dir(out: Path, manifests: Sequence[tuple[Path, Any]], study_key: str) -> Path:
    """``out`` itself for one study, ``out/<study key>`` when the folder held several."""
    return out if len(manifests) == 1 else out / study_key


def publish(
    files: Sequence[Path], qa_file: Path, manifest: Path, src: Path, target: Path, assembly: str | None,
    report_files: Sequence[Path] = (),
) -> dict[str, Any]:
    """Copy ``files`` into ``target`` and write ``target/qa.json``: ``qa_file`` plus the study's identity,
    phases and references (from the manifest) and where it came from. ``report_files``: the QA report's
    PDF and pages go to ``target/report/``, its Encapsulated PDF (``DOC.*.dcm``) beside the RTSTRUCT.
    Returns that QA dict."""
    from service.store.manifest import load_manifest

    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, target / f.name)
    for f in report_files:
        dest = target / f.name if f.suffix == ".dcm" else target / "report" / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    qa = json.loads(qa_file.read_text())
    final = load_manifest(manifest)
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
    qa["assembly"] = assembly
    qa["source"] = str(src.resolve())
    (target / "qa.json").write_text(json.dumps(qa, indent=1) + "\n")
    return qa


def qa_summary_lines(qa: dict[str, Any], report_dir: Path | None) -> list[str]:
    """The short QA summary ``segment`` and ``itv`` print at the end: phases, per-structure volume and
    motion, envelopes, warnings, where the report is."""
    inner = qa.get("qa") or {}
    ph = inner.get("phases") or {}
    lines = [f"QA: ITV from {ph.get('used', '?')} of {ph.get('expected', '?')} phases"]
    for name, s in (inner.get("structures") or {}).items():
        if s.get("absent"):
            lines.append(f"  {name}: empty in every phase")
            continue
        mo = s.get("motion_mm") or {}
        motion = " ".join(f"{a} {mo.get(a, 0) or 0:.1f}" for a in ("SI", "AP", "LR"))
        lines.append(f"  {name}: median {s.get('volume_median_cc', 0) or 0:.1f} cc, motion mm {motion}")
    for name, e in (inner.get("envelopes") or {}).items():
        lines.append(f"  {name}: {e.get('volume_cc', 0) or 0:.1f} cc (envelope of {e.get('source', '?')})")
    for name, why in (qa.get("skipped") or {}).items():
        lines.append(f"  skipped {name}: {why}")
    warnings = inner.get("warnings") or []
    lines.append(f"  warnings: {len(warnings)}" + "".join(f"\n    - {w}" for w in warnings))
    if report_dir is not None:
        lines.append(f"  report: {report_dir / 'report.pdf'} (review before clinical use)")
    return lines

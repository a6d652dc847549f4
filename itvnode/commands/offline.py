"""What the offline commands (``itvnode segment``, ``itvnode itv``) share: a DICOM folder read exactly as the
node would receive it, and the result folder handed to the user.

:func:`intake` puts every file through the SCP's header checks into a private spool (a temporary data
directory unless ``--work-dir``) and lets the assembler's phase detection build the manifests
(:func:`service.assembler.assemble_folder`); :func:`publish` copies one study's result files and writes its
``qa.json`` with the phases, references and assembly note of its manifest.
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
    from service.assembler import assemble_folder
    from service.manifest import iter_manifests

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
    files: Sequence[Path], qa_file: Path, manifest: Path, src: Path, target: Path, assembly: str | None
) -> dict[str, Any]:
    """Copy ``files`` into ``target`` and write ``target/qa.json``: ``qa_file`` plus the study's identity,
    phases and references (from the manifest) and where it came from. Returns that QA dict."""
    from service.manifest import load_manifest

    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, target / f.name)
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

"""The result files of one run, kept with the study in ``studies/<key>/results/``: the RTSTRUCT(s), the DICOM
SEGs (setting ``write_seg``) and ``qa.json``, swapped in at once; the result's content key and version number.

Output UIDs derive from the inputs used (service.dicomio.uids); the version counts distinct results of a study
(``results.versions``: one record per content key, never reset), so a late phase or a late AVG gives a new
version next to the earlier one at the receiver.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.store.durable import DIR_MODE
from service.store.layout import DataLayout
from service.store.manifest import Manifest
from worker.engine_settings import EngineConfig, roi_styles
from worker.stages import Stages
from worker.study_inputs import phases_note

log = logging.getLogger(__name__)

QA_FILE = "qa.json"


def results_dir(data_dir: Path, study_key: str) -> Path:
    return DataLayout(data_dir).results(study_key)


def write_results(
    study_key: str,
    data_dir: Path,
    m: Manifest,
    geoms: Sequence[Any],
    references: dict[str, Any],
    result: Any,
    skipped: dict[str, str],
    config: EngineConfig,
    algorithm: Any,
    qa_extra: dict[str, Any],
    stages: Stages,
    uid_prefix: str | None,
) -> tuple[list[Path], dict[str, Any]]:
    """The ``rtstruct`` stage: RTSTRUCT(s) (and SEGs with ``write_seg``) of an engine result and ``qa.json``
    (the engine's QA, ``skipped``, timings, layout, files, the result version, then ``qa_extra``), swapped
    into the study's results folder at once. Output UIDs derive from the inputs used (service.dicomio.uids);
    the version counts distinct results of this study. Returns the result files and the version record."""
    from service.dicomio.rtstruct import build_rtstructs, inputs_note, result_content_key, write_rtstruct
    from service.dicomio.uids import settings_digest
    from service.store.spool_index import SpoolIndexReader

    with stages.stage("rtstruct"):
        key = result_content_key(
            study_key=study_key, geometries=geoms, references=references, algorithm=algorithm,
            layout=config.layout, settings_digest=settings_digest(config),
            revisions=SpoolIndexReader(DataLayout(data_dir).spool_index).revisions(m.study_instance_uid),
        )
        version = result_version(m, key)
        record = {
            "version": version,
            "content_key": key,
            "phases": [p.percent for p in m.phases],
            "phase_labels": [p.label for p in m.phases],
            "phase_series": [p.series_instance_uid for p in m.phases],
            "references": sorted(references),
        }
        log.info("study %s: result version %d (content key %s, %s)", study_key, version, key,
                 inputs_note([p.percent for p in m.phases], list(references), [p.label for p in m.phases]))
        datasets = build_rtstructs(
            study_key=study_key,
            identifiers=m.identifiers,
            geometries=geoms,
            phase_percents=[p.percent for p in m.phases],
            phase_labels=[p.label for p in m.phases],
            masks=result.masks,
            envelopes=result.envelopes,
            styles=roi_styles(config),
            algorithm=algorithm,
            layout=config.layout,
            references=references,
            skipped=skipped,
            uid_prefix=uid_prefix or config.uid_root,
            holes=config.rtstruct_holes,
            content_key=key,
            version=version,
            qa_notes=_qa_notes(result.qa),
            phases_note=phases_note(m),
        )
        out_dir = results_dir(data_dir, study_key)
        for stale in out_dir.parent.glob(f".{out_dir.name}.*"):  # left by a worker killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        staging = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}")
        staging.mkdir(DIR_MODE, parents=True)
        try:
            files = [write_rtstruct(ds, staging) for ds in datasets]
            if config.write_seg:
                files += _write_segs(
                    study_key, data_dir, m, geoms, result, config, algorithm, uid_prefix, staging,
                    key, version,
                )
            qa = {
                "study_key": study_key,
                "qa": _jsonable(result.qa),
                "skipped": skipped,
                "timings": stages.timings,
                "layout": config.layout,
                "files": [f.name for f in files],
                "version": record,
                **_jsonable(qa_extra),
            }
            (staging / QA_FILE).write_text(json.dumps(qa, indent=1) + "\n")
            if out_dir.exists():
                shutil.rmtree(out_dir)
            staging.rename(out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return [out_dir / f.name for f in files], record


def result_version(m: Manifest, key: str) -> int:
    """The version number of the result with content key ``key``: its earlier number when this content was
    already produced (a re-run replaces it), else one more than the highest so far (1 for the first)."""
    versions = [v for v in m.results.get("versions") or [] if isinstance(v, dict)]
    for v in versions:
        if v.get("content_key") == key:
            return int(v["version"])
    return max((int(v.get("version", 0)) for v in versions), default=0) + 1


def _qa_notes(qa: dict[str, Any]) -> list[str]:
    """QA warnings for the RTSTRUCT description; the phases one is said by
    :func:`worker.study_inputs.phases_note`."""
    return [str(f.get("text")) for f in qa.get("flags") or [] if f.get("kind") != "phases"]


def qa_summary(qa: dict[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of the QA for ``status`` and ``/metrics`` (qa.json has everything)."""
    motion = {name: s.get("motion_mm") for name, s in (qa.get("structures") or {}).items()
              if any(e.get("source") == name for e in (qa.get("envelopes") or {}).values())}
    return {
        "phases": qa.get("phases"),
        "warnings": list(qa.get("warnings") or []),
        "flag_kinds": [f.get("kind", "") for f in qa.get("flags") or []],
        "envelopes": {k: {kk: v.get(kk) for kk in ("volume_cc", "source", "ratio_to_largest_phase")}
                      for k, v in (qa.get("envelopes") or {}).items()},
        "motion_mm": motion,
    }


def _write_segs(
    study_key: str,
    data_dir: Path,
    m: Manifest,
    geoms: Sequence[Any],
    result: Any,
    config: EngineConfig,
    algorithm: Any,
    uid_prefix: str | None,
    out_dir: Path,
    content_key: str,
    version: int,
) -> list[Path]:
    """Setting ``write_seg``: one binary DICOM SEG per phase series (that phase's ROIs and the envelopes).

    SEG is optional next to the RTSTRUCT: a phase it cannot be built for is logged and left out.
    """
    from service.dicomio.rtstruct import roi_name

    try:
        from service.dicomio.seg import build_seg, write_seg
    except ImportError as exc:  # pragma: no cover - highdicom is the optional extra "seg"
        log.warning("study %s: write_seg is set but DICOM SEG needs highdicom (extra 'seg'): %s",
                    study_key, exc)
        return []
    out: list[Path] = []
    for p, (phase, g) in enumerate(zip(m.phases, geoms, strict=True)):
        segments = {roi_name(n, phase.percent, phase.label): v[p] for n, v in result.masks.items()}
        segments.update(result.envelopes)
        try:
            ds = build_seg(
                study_key=study_key,
                source_files=[data_dir / f for f in phase.files],
                geometry=g,
                segments=segments,
                styles=roi_styles(config),
                algorithm=algorithm,
                uid_prefix=uid_prefix or config.uid_root,
                content_key=content_key,
                series_number=951 + 100 * (version - 1),
            )
        except (ImportError, ValueError) as exc:
            log.warning("study %s: no DICOM SEG for phase %g: %s", study_key, phase.percent, exc)
            continue
        out.append(write_seg(ds, out_dir))
    return out


def _jsonable(obj: Any) -> Any:
    """QA numbers as plain JSON (numpy scalars/arrays converted)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def outcome_uids(files: Sequence[Path]) -> list[str]:
    """The SOP Instance UIDs of the result files (``results.rtstruct_sop_instance_uids``)."""
    from pydicom.filereader import read_file_meta_info

    return [str(read_file_meta_info(f).MediaStorageSOPInstanceUID) for f in files]

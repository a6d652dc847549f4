"""A study's inputs for the engine: its manifest (which states may run, opened, changed in place) and its
phases read into one 4D HU volume with their geometry and the reference series (AVG, MIP) on the same grid."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.store.manifest import Manifest, load_manifest, manifest_path, update_manifest
from service.store.state import StudyState
from worker.stages import PipelineError, Stages

log = logging.getLogger(__name__)

#: states in which a study has been assembled, so the pipeline may run on it
RUNNABLE_STATES: frozenset[StudyState] = frozenset({
    StudyState.COMPLETE, StudyState.QUEUED, StudyState.PROCESSING, StudyState.FAILED, StudyState.EXPORTING,
    StudyState.DONE,
})


def open_study(data_dir: Path, study_key: str) -> tuple[Path, Manifest]:
    """The path and contents of the study's manifest; :class:`PipelineError` when there is none."""
    path = manifest_path(data_dir, study_key)
    if not path.is_file():
        raise PipelineError(f"study {study_key}: no manifest at {path}")
    return path, load_manifest(path)


def not_runnable(m: Manifest) -> str | None:
    """Why the pipeline may not run on ``m`` (``state is 'held' (reason)``); None when it may."""
    if m.state in RUNNABLE_STATES:
        return None
    return f"state is '{m.state}'{f' ({m.reason})' if m.reason else ''}"


def change_manifest(path: Path, fn: Callable[[Manifest], None]) -> Manifest:
    """Apply ``fn`` to the manifest at ``path`` under its lock and write it back."""

    def apply(m: Manifest) -> Manifest:
        fn(m)
        return m

    return update_manifest(path, apply)


def open_phases(m: Manifest, data_dir: Path, stages: Stages) -> Any:
    """Part of the ``load`` stage: every phase's headers scanned, one grid checked, the 4D array allocated
    (a :class:`service.dicomio.volume.PhaseReader`; :meth:`read_phase` fills it phase by phase)."""
    from service.dicomio.geometry import VolumeError
    from service.dicomio.volume import PhaseReader

    if not m.phases:
        raise PipelineError("the manifest lists no phases")
    with stages.stage("load"):
        try:
            return PhaseReader(m, data_dir)
        except VolumeError as exc:
            raise PipelineError(f"phases rejected: {exc}") from exc


def read_phase(reader: Any, p: int) -> Any:
    """Phase ``p`` read into its slot of ``reader.hu``; :class:`PipelineError` for an unreadable file."""
    from service.dicomio.geometry import VolumeError

    try:
        return reader.read(p)
    except VolumeError as exc:
        raise PipelineError(f"phases rejected: {exc}") from exc


def read_references(
    study_key: str, data_dir: Path, m: Manifest, grid: Any
) -> tuple[dict[str, Any], tuple[str, Any] | None]:
    """``(reference geometries by kind, (kind, HU volume) of the QA report's reference series (AVG, else MIP;
    None without one on the phases' ``grid``))``."""
    from service.dicomio.geometry import VolumeError
    from service.dicomio.volume import read_geometry, read_series

    references: dict[str, Any] = {}
    ref_volume: tuple[str, Any] | None = None
    for ref in m.references:
        try:
            g = read_geometry([data_dir / f for f in ref.files])  # referenced: geometry only
        except VolumeError as exc:
            log.warning("study %s: reference series %s (%s) not used: %s", study_key, ref.kind,
                        ref.series_instance_uid, exc)
            continue
        if g.same_grid(grid):
            references[ref.kind] = g
            if ref.kind == "AVG" or (ref.kind == "MIP" and ref_volume is None):
                ref_volume = (ref.kind, ref.files)
        else:
            log.warning("study %s: reference series %s is on another grid: not referenced", study_key,
                        ref.kind)
    if ref_volume is not None:  # the QA report draws on it: the one reference read in full
        kind, files = ref_volume
        try:
            ref_volume = (kind, read_series([data_dir / f for f in files])[0])
        except VolumeError as exc:
            log.warning("study %s: %s not readable for the QA report: %s", study_key, kind, exc)
            ref_volume = None
    return references, ref_volume


def load_phases(
    study_key: str, data_dir: Path, m: Manifest, stages: Stages
) -> tuple[Any, list[Any], dict[str, Any], tuple[str, Any] | None]:
    """The whole ``load`` stage at once (no overlap): ``(hu (P, Z, Y, X), phase geometries, reference
    geometries by kind, the QA report's reference volume or None)``."""
    reader = open_phases(m, data_dir, stages)
    with stages.stage("load"):
        for p in range(reader.n_phases):
            read_phase(reader, p)
        references, ref_volume = read_references(study_key, data_dir, m, reader.geoms[0])
    log.info("study %s: volume %s, spacing %s mm", study_key, reader.hu.shape, reader.geoms[0].spacing)
    return reader.hu, reader.geoms, references, ref_volume


def add_cycle_qa(qa: dict[str, Any], m: Manifest) -> None:
    """Phases used vs expected (the manifest's cycle, decided by the assembler) into the QA numbers."""
    from models.post.qa import cycle_qa

    if m.cycle is not None:
        cycle_qa(qa, m.cycle.used, m.cycle.expected, m.cycle.missing, released=m.released is not None)
    else:  # a manifest written before cycles were recorded
        cycle_qa(qa, len(m.phases), len(m.phases))


def phases_note(m: Manifest) -> str:
    """What the envelopes are built from, for the RTSTRUCT: ``ITV from 3 of 10 phases: 10 %, ... missing``."""
    if m.cycle is None:
        return f"ITV from {len(m.phases)} of {len(m.phases)} phases"
    if m.cycle.complete:
        return f"ITV from {m.cycle.summary()}"
    how = "released by admin" if m.released else "processed as set by incomplete_cycle"
    return f"ITV from {m.cycle.describe()} ({how})"

"""``itvnode itv`` (:func:`process_contours`): the pipeline on contours from existing RTSTRUCTs, not SAM 3.

Nothing is queued or sent and no state changes: the result files and the QA report are written into the
study's results folder, as :func:`worker.pipeline.process_study` writes them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.engine_settings import EngineConfig
from worker.report_output import report_data, write_report
from worker.result_files import QA_FILE, results_dir, write_results
from worker.stages import PipelineError, Stages
from worker.study_inputs import add_cycle_qa, load_phases, not_runnable, open_study


@dataclass
class ContourOutcome:
    """What :func:`process_contours` wrote and found."""

    study_key: str
    files: list[Path]
    qa: dict[str, Any]
    warnings: list[str]
    timings: dict[str, float]
    report_files: list[Path] = field(default_factory=list)  # report.pdf, page PNGs, the DOC instance


def process_contours(
    study_key: str,
    data_dir: Path,
    config: EngineConfig,
    rtstructs: Sequence[Path],
    roi_map: dict[str, str],
    *,
    folder_series: Sequence[str] = (),
    uid_prefix: str | None = None,
) -> ContourOutcome:
    """``itvnode itv``: the pipeline of :func:`worker.pipeline.process_study` with contours from RTSTRUCTs
    instead of SAM 3.

    manifest -> 4D HU volume + geometry (:func:`worker.study_inputs.load_phases`) -> the ROIs ``roi_map``
    maps, placed on their phases (service.dicomio.rtstruct_read.read_phase_contours) -> temporal filter,
    connectivity, envelopes, QA (models.engine.postprocess_volume, the engine's own post-processing) ->
    RTSTRUCT(s) + qa.json (:func:`worker.result_files.write_results`). Nothing is queued or sent. Output
    UIDs derive from the study key and a digest of the CT instances (manifest fingerprint) and the bytes of
    the RTSTRUCTs used, so different input contours give new objects. Raises :class:`PipelineError` with a
    message for the user.
    """
    import hashlib

    from models.engine import output_structures, postprocess_volume
    from service.dicomio.output import Algorithm
    from service.dicomio.rtstruct import roi_name
    from service.dicomio.rtstruct_read import RTStructReadError, read_phase_contours

    data_dir = Path(data_dir)
    _path, m = open_study(data_dir, study_key)
    if (why := not_runnable(m)) is not None:
        raise PipelineError(why)
    stages = Stages(study_key)
    hu, geoms, references, ref_volume = load_phases(study_key, data_dir, m, stages)
    percents = [p.percent for p in m.phases]
    wanted = [o.name for o in output_structures(list(config.structures))]
    with stages.stage("contours"):
        try:
            pc = read_phase_contours(
                rtstructs, geoms, percents, roi_map, folder_series=set(folder_series), structures=wanted
            )
        except RTStructReadError as exc:
            raise PipelineError(str(exc)) from exc
    with stages.stage("filter"):
        result = postprocess_volume(
            pc.masks,
            hu,
            geoms[0].spacing,
            list(config.structures),
            config.temporal,
            phase_percents=percents,
            study_key=study_key,
            qa_params=config.qa,
        )
    add_cycle_qa(result.qa, m)
    no_contour_note = {k: "no input contour on phase(s) " + ", ".join(f"{p:g} %" for p in v)
                       for k, v in pc.missing.items()}
    report = report_data(
        study_key, hu, geoms, m, result, ref_volume, no_contour_note,
        {"model": "input contours", "model_version": f"{len(pc.files)} RTSTRUCT(s)",
         "adapter_version": "none"},
        config,
    )
    del hu, ref_volume
    warnings = [f"{k}: {why}" for k, why in no_contour_note.items()]
    removed: dict[str, dict[str, int]] = {}
    for k, sq in result.qa["structures"].items():
        rep = sq.get("cleanup") or {}
        rm = {f"{percents[i]:g}": int(n) for i, n in enumerate(rep.get("removed_temporal") or []) if n}
        if rm:
            removed[k] = rm
            warnings.append(
                f"{k}: temporal filter removed "
                + ", ".join(f"{n} component(s) on phase {p} %" for p, n in rm.items())
            )
    digest = hashlib.sha256((m.fingerprint or "").encode())
    for f in sorted(pc.files):
        digest.update(hashlib.sha256(Path(f).read_bytes()).digest())
    algorithm = Algorithm(
        model="input contours",
        model_version=f"{len(pc.files)} RTSTRUCT(s) {digest.hexdigest()[:12]}",
        adapter_version="none",
        generation="SEMIAUTOMATIC",
    )
    no_contour = {roi_name(k, p): "no input contour" for k, v in pc.missing.items() for p in v}
    files, _record = write_results(
        study_key, data_dir, m, geoms, references, result, no_contour, config, algorithm,
        {
            "algorithm": {
                "model": algorithm.model,
                "model_version": algorithm.model_version,
                "generation": algorithm.generation,
            },
            "rtstructs": [Path(f).name for f in pc.files],
            "roi_map": roi_map,
            "rois": pc.rois,
            "unmapped_rois": pc.unmapped,
            "ignored_rtstructs": pc.ignored,
            "missing": pc.missing,
            "removed_temporal": removed,
            "warnings": warnings,
        },
        stages, uid_prefix,
    )
    qa = json.loads((results_dir(data_dir, study_key) / QA_FILE).read_text())
    report_files = write_report(study_key, data_dir, report, config, uid_prefix=uid_prefix)
    return ContourOutcome(study_key, files, qa, warnings, stages.timings, report_files)

"""Settings -> the plain engine configuration the pipeline takes, and the per-process segmenter cache.

Only entry points (Celery task, ``itvnode segment``) read :class:`service.settings.Settings`; they call
:func:`engine_config` once and pass the result down. The segmenter (SAM 3 + LoRA) is expensive to build, so
:func:`get_segmenter` keeps one per process and per (model dir, adapter dir, device, batch size).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.post.qa import QAParams
from models.post.temporal import TemporalParams
from models.structures import StructureSpec
from service.settings import TemporalSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the pipeline needs to know about the engine and the output, as plain values."""

    structures: tuple[StructureSpec, ...]
    sam3_dir: Path | None = None
    adapter_dir: Path | None = None
    device: str = "auto"
    batch_size: int = 4
    temporal: TemporalParams = field(default_factory=TemporalParams)  # the phase-coherence rule
    layout: str = "combined"  # combined | per-series
    write_seg: bool = False
    send_qa_report: bool = True  # the QA report as an Encapsulated PDF to the destinations too
    envelope_types: dict[str, str] = field(default_factory=dict)  # structure name -> its envelope's type
    uid_root: str | None = None  # site UID root for output UIDs (None: pydicom's)
    rtstruct_holes: str = "keyhole"  # keyhole | xor (service.dicomio.rtstruct)
    hu_windows: tuple[tuple[float, float], ...] | None = None  # SAM 3 input channels (None: default)
    qa: QAParams = field(default_factory=QAParams)  # thresholds of the QA flags (models/post/qa.py)

    @property
    def needs_sam3(self) -> bool:
        return any(s.method == "sam3" for s in self.structures)


@dataclass
class LoadedSegmenter:
    """The segmenter of this process, or why there is none (then SAM 3 structures are skipped, loudly)."""

    segmenter: Any | None
    unavailable_reason: str | None = None
    #: ``models.sam3.model_files.ModelCause`` value when there is no segmenter (``not_configured``,
    #: ``dir_missing``, ``file_missing``, ``adapter_mismatch``...): recorded per study for /health, /metrics
    unavailable_cause: str | None = None
    version_info: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0


def structure_spec(setting: Any) -> StructureSpec:
    """``service.settings.StructureSetting`` -> ``models.structures.StructureSpec`` (same field names)."""
    hu = tuple(setting.hu_range) if setting.hu_range is not None else None
    return StructureSpec(
        name=setting.name,
        prompt=setting.prompt,
        method=setting.method,
        score_threshold=setting.score_threshold,
        hu_range=hu,  # type: ignore[arg-type]
        split_laterality=setting.split_laterality,
        envelope=setting.envelope,
        envelope_name=setting.envelope_name,
        expected_components=setting.expected_components,
        min_volume_cc=setting.min_volume_cc,
        color=tuple(setting.color),  # type: ignore[arg-type]
        interpreted_type=setting.interpreted_type,
    )


def _dir(value: Any) -> Path | None:
    """An unset or empty setting (``ITVNODE_SAM3_DIR=`` parses as ``.``) means no directory."""
    return None if value is None or str(value) in ("", ".") else Path(value)


def engine_config(settings: Any) -> EngineConfig:
    """Build the :class:`EngineConfig` from :class:`service.settings.Settings`."""
    return EngineConfig(
        structures=tuple(structure_spec(s) for s in settings.structures),
        sam3_dir=_dir(settings.sam3_dir),
        adapter_dir=_dir(settings.adapter_dir),
        device=settings.device,
        batch_size=settings.batch_size,
        temporal=temporal_params(settings),
        layout=settings.layout,
        write_seg=settings.write_seg,
        send_qa_report=getattr(settings, "send_qa_report", True),
        envelope_types={s.name: getattr(s, "envelope_interpreted_type", "") for s in settings.structures},
        uid_root=getattr(settings, "uid_root", None),
        rtstruct_holes=getattr(settings, "rtstruct_holes", "keyhole"),
        hu_windows=tuple((float(lo), float(hi)) for lo, hi in settings.hu_windows),
        qa=qa_params(settings),
    )


def temporal_params(settings: TemporalSettings) -> TemporalParams:
    """The ``temporal_*`` settings as :class:`models.post.temporal.TemporalParams` (setting ``temporal_<f>``
    is field ``f``, so a new field needs only its setting)."""
    prefix = "temporal_"
    return TemporalParams(**{name.removeprefix(prefix): getattr(settings, name)
                             for name in TemporalSettings.model_fields})


def qa_params(settings: Any) -> QAParams:
    """The ``qa_*`` settings over the defaults of :class:`models.post.qa.QAParams`."""
    return QAParams.with_overrides(
        volume_cc=settings.qa_volume_cc,
        volume_ratio_max=settings.qa_volume_ratio_max,
        volume_variation_max=settings.qa_volume_variation_max,
        envelope_ratio_max=settings.qa_envelope_ratio_max,
        jump_mm=settings.qa_jump_mm,
    )


def roi_styles(cfg: EngineConfig) -> dict[str, Any]:
    """``service.dicomio.rtstruct.RoiStyle`` for every ROI name the engine emits, the one naming rule
    (``models.engine.output_structures``: split sides ``Lung_L``, envelopes ``ITV`` / ``<name>^ENV``, a split
    structure's envelope per side ``ITV_L``); production, tests and bench/rtstruct.py all style ROIs here."""
    from models.engine import output_structures
    from service.dicomio.output import RoiStyle

    styles: dict[str, Any] = {}
    for out in output_structures(list(cfg.structures)):
        styles[out.name] = RoiStyle(out.spec.color, out.spec.interpreted_type)
        if out.envelope_name:
            styles[out.envelope_name] = RoiStyle(out.spec.color, cfg.envelope_types.get(out.spec.name, ""))
    return styles


_cache: dict[tuple[Any, ...], LoadedSegmenter] = {}
_cache_lock = threading.Lock()


def load_segmenter(cfg: EngineConfig) -> LoadedSegmenter:
    """Build the SAM 3 segmenter for ``cfg`` (no cache). A missing model is not an error: the node still
    produces the threshold structures, and every SAM 3 structure is reported as skipped with this reason."""
    import time

    if not cfg.needs_sam3:
        return LoadedSegmenter(None, "no structure uses SAM 3", "unused")
    from models.sam3.loader import Sam3LoadError, build_segmenter

    t0 = time.monotonic()
    try:
        seg = build_segmenter(
            cfg.sam3_dir,
            cfg.adapter_dir,
            device=cfg.device,
            batch_size=cfg.batch_size,
            windows=cfg.hu_windows,
        )
    except Sam3LoadError as exc:
        log.warning("SAM 3 unavailable (%s), SAM 3 structures will be SKIPPED: %s", exc.cause, exc)
        # first sentence only: it goes into the RTSTRUCT description and the manifest reason
        return LoadedSegmenter(None, "SAM 3 unavailable: " + re.split(r"\.\s+(?=[A-Z])", str(exc))[0],
                               str(exc.cause))
    info = seg.version_info()
    if info.get("trained") is False:
        log.warning(
            "SAM 3 model in %s is NOT trained (%s): its contours mean nothing",
            cfg.sam3_dir,
            info.get("note") or info.get("model"),
        )
    return LoadedSegmenter(seg, None, version_info=info, load_seconds=time.monotonic() - t0)


def get_segmenter(cfg: EngineConfig) -> LoadedSegmenter:
    """The cached :class:`LoadedSegmenter` of this process for ``cfg`` (built on first use)."""
    key = (str(cfg.sam3_dir), str(cfg.adapter_dir), cfg.device, cfg.batch_size, cfg.hu_windows)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is None:
            hit = _cache[key] = load_segmenter(cfg)
        elif hit.segmenter is None and cfg.needs_sam3:
            # The model may have been installed since: retry instead of skipping SAM 3 until a restart.
            hit = _cache[key] = load_segmenter(cfg)
        return hit


def clear_segmenter_cache() -> None:
    with _cache_lock:
        _cache.clear()

"""Typed settings at the edge: a YAML file plus ``ITVNODE_*`` environment variables.

Precedence (highest first): explicit keyword arguments, environment, YAML file, defaults.
The YAML file is named by ``ITVNODE_CONFIG`` or passed to :func:`load_settings`.
Everything inside the node takes plain arguments; only entry points read settings.
"""

from __future__ import annotations

import ipaddress
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from service.setting_values import Destination, PhaseRule, TLSSettings, check_ae_title
from service.settings_file import ConfigFileError, read_config_file
from service.store.layout import DataLayout
from service.structure_settings import StructureSetting, default_roi_map, default_structures


class SettingsError(ValueError):
    """Raised with a message that names the offending key."""


class NetworkSettings(BaseModel):
    """Group ``network``: the DICOM listener."""

    ae_title: str = "ITVNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)  # 0: ephemeral (tests)
    allowed_callers: Annotated[list[str], NoDecode] = Field(default_factory=list)  # empty: any caller
    # AE -> allowed peer IPs; every AE named here must be in allowed_callers (see _caller_ips_bind)
    caller_ips: dict[str, list[str]] = Field(default_factory=dict)
    require_called_ae: bool = True
    max_associations: int = Field(10, ge=1)  # associations (A-ASSOCIATE-RQ received) at once
    # TCP connections one peer address may hold, associated or still silent; None: max_associations, so
    # one PACS sending several associations in parallel can use every slot (docs/conformance.md)
    max_connections_per_ip: int | None = Field(None, ge=1)
    # seconds a new connection has to deliver its A-ASSOCIATE-RQ (TLS handshake included); then it is closed
    first_pdu_timeout: float = Field(5.0, gt=0)
    maximum_pdu_size: int = 0  # 0: unlimited (DESIGN.md)
    network_timeout: float = 60.0
    tls: TLSSettings = Field(default_factory=TLSSettings)

    _ae = field_validator("ae_title")(check_ae_title)

    @field_validator("allowed_callers", mode="before")
    @classmethod
    def _split_callers(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p for p in (s.strip() for s in v.split(",")) if p]
        if isinstance(v, list):
            return [check_ae_title(str(x)) for x in v]
        return v

    @field_validator("caller_ips", mode="after")
    @classmethod
    def _check_caller_ips(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for ae, ips in v.items():
            addrs = []
            for ip in ips:
                try:
                    addrs.append(str(ipaddress.ip_address(ip.strip())))
                except ValueError:
                    raise ValueError(f"caller_ips[{ae!r}]: {ip!r} is not an IP address") from None
            if not addrs:
                raise ValueError(f"caller_ips[{ae!r}]: empty list (list the addresses {ae} may call from)")
            out[check_ae_title(ae)] = addrs
        return out

    @model_validator(mode="after")
    def _caller_ips_bind(self) -> NetworkSettings:
        """``caller_ips`` only narrows callers that ``allowed_callers`` admits. Without the allowlist any
        other AE title would be accepted from any address: not what binding titles to IPs asks for."""
        if self.caller_ips and not self.allowed_callers:
            raise ValueError(
                "caller_ips is set but allowed_callers is empty, so any other calling AE title would be "
                "accepted from any address; list the callers in allowed_callers (ITVNODE_ALLOWED_CALLERS="
                + ",".join(self.caller_ips) + ")")
        unknown = sorted(set(self.caller_ips) - set(self.allowed_callers))
        if unknown:
            raise ValueError(f"caller_ips names {', '.join(unknown)}, not in allowed_callers: add them there "
                             "or remove them from caller_ips")
        return self


class StorageSettings(BaseModel):
    """Group ``storage``: where everything lives and how much room it may take."""

    data_dir: Path = Path("data")
    min_free_bytes: int = Field(2 * 1024**3, ge=0)  # below this, C-STORE answers 0xA700
    # fsync each received file and its directory before answering success. Turn off only on storage with
    # power-loss protection (battery/flash-backed write cache): a power cut could then lose acknowledged data.
    spool_fsync: bool = True
    # with spool_fsync: durable through the spool's journal (one fdatasync per instance, docs/conformance.md);
    # the received files are fsynced in the background this many seconds after the last one (or sooner)
    spool_journal: bool = True
    spool_journal_checkpoint: float = Field(0.5, gt=0)
    # the spool's own quota (bytes of received instances); free space is the smaller of the file system's and
    # what the quota leaves. null: the file system only
    spool_max_bytes: int | None = Field(None, gt=0)


class IntakeSettings(BaseModel):
    """Group ``intake``: assembling received series into 4D studies."""

    quiet_period: float = Field(60.0, ge=0)
    # phases of the breathing cycle; a study whose phases do not cover it (fewer, or gaps in the percent grid)
    # is held until `itvnode release` (service/intake/phases.py: cycle_coverage). None: the labels' own grid.
    expected_phases: int | None = Field(10, ge=2)
    # what an incomplete cycle does: hold (default) or process at once, flagged like a released study
    incomplete_cycle: Literal["hold", "process"] = "hold"
    phase_rules: list[PhaseRule] = Field(default_factory=list)
    assembler_interval: float = Field(1.0, gt=0)


class RetentionSettings(BaseModel):
    """Group ``retention`` (service/ops/retention.py; runs in `itvnode serve`).

    Only finished studies (done, failed) and spooled series that never formed a 4D set are ever purged: spool
    instances, results, outbox records and dead letters. By age: ``retention_days`` after the study finished
    (null: never by age). By watermark: when free space falls below ``retention_free_bytes`` (null: 2 x
    min_free_bytes), the oldest finished work goes first, also from inside the SCP before it would have to
    answer 0xA700.
    """

    retention_days: float | None = Field(7.0, ge=0)
    retention_free_bytes: int | None = Field(None, ge=0)
    retention_interval: float = Field(300.0, gt=0)  # seconds between retention passes
    retention_ignored_after: float = Field(86400.0, ge=0)  # seconds after the last instance of a non-4D study


class QueueSettings(BaseModel):
    """Group ``queue``: the broker, task time limits, and reconciliation of studies whose task is gone
    (service/ops/reconcile.py; runs in `itvnode serve`)."""

    broker_url: str | None = None  # None: embedded broker under data_dir, no server needed
    result_backend: str | None = None
    inference_soft_time_limit: float = Field(4 * 3600.0, gt=0)  # seconds per study; hard limit + grace
    time_limit_grace: float = Field(300.0, gt=0)  # seconds between a task's soft and hard time limits
    reconcile_interval: float = Field(30.0, gt=0)  # seconds between checks
    heartbeat_interval: float = Field(10.0, gt=0)  # a running segment task touches its heartbeat this often
    heartbeat_timeout: float = Field(120.0, gt=0)  # `processing` without a heartbeat this long: task gone
    queued_lost_after: float = Field(300.0, gt=0)  # `queued` this long with no message in the broker: lost
    # retries per study (reconciler re-queues and transient task failures alike) before it is failed with the
    # reason; each waits reconcile_backoff s, doubled per earlier retry
    reconcile_max_attempts: int = Field(2, ge=0)
    reconcile_backoff: float = Field(60.0, ge=0)  # seconds before a re-queue, doubled per earlier re-queue
    # split each study into this many phase groups segmented by separate inference tasks (a Celery chord,
    # worker.study_split); set it to the number of GPU workers. 1: one task segments the whole study.
    phase_groups: int = Field(1, ge=1, le=32)


class EngineSettings(BaseModel):
    """Group ``engine``: the model and the structures it contours."""

    sam3_dir: Path | None = None
    adapter_dir: Path | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = Field(4, ge=1)
    # SAM 3 input: three HU windows (low, high) -> the three 8-bit-range channels (models/sam3/windowing.py)
    hu_windows: list[tuple[float, float]] = Field(
        default_factory=lambda: [(-1350.0, 150.0), (-160.0, 240.0), (-1000.0, 1000.0)],
        min_length=3, max_length=3)
    structures: list[StructureSetting] = Field(default_factory=default_structures)
    # RTSTRUCT ROI name (regex, full match, case-insensitive) -> structure name, for contours a site already
    # has (itv, train, evaluate), e.g. {"lung[ _]?left": "Lung_L", "GTV.*": "GTVp"}; replaces the defaults
    # (default_roi_map). train / evaluate keep unmapped ROIs under their base name; itv uses mapped ROIs only
    roi_map: dict[str, str] = Field(default_factory=default_roi_map)

    @model_validator(mode="after")
    def _unique_names(self) -> EngineSettings:
        names = [s.name for s in self.structures]
        if len(names) != len(set(names)):
            raise ValueError("structures: names must be unique")
        return self


class TemporalSettings(BaseModel):
    """Group ``temporal``: the phase-coherence rule (docs/postprocessing.md), one setting ``temporal_<field>``
    per field of ``models.post.temporal.TemporalParams`` (``worker.engine_settings.temporal_params``)."""

    temporal_min_phases: int = Field(3, ge=1)  # k: contiguous phases a component must be matched in
    temporal_min_overlap: float = Field(0.1, gt=0, le=1)
    temporal_match: Literal["iou", "overlap"] = "iou"  # how temporal_min_overlap is measured
    temporal_max_centroid_mm: float | None = Field(None, gt=0)  # also match within this motion bound (mm)
    # a centroid match also needs the smaller component's volume to be at least this fraction of the larger's
    temporal_centroid_volume_ratio: float = Field(0.5, ge=0, le=1)
    temporal_max_gap: int = Field(1, ge=0)  # missing (dropped) phases a block may bridge
    temporal_circular: bool = True  # the breathing cycle wraps: the last phase neighbours the first
    temporal_connectivity: int = Field(3, ge=1, le=3)  # 3D components: 1, 2, 3 = 6-, 18-, 26-connected voxels
    # motion-compensated matching from the CT (docs/postprocessing.md); temporal_motion_mm null: off
    temporal_motion_mm: float | None = Field(25.0, gt=0)  # search bound per phase step, mm
    temporal_motion_margin_mm: float = Field(8.0, ge=0)  # CT context followed around a component, mm
    temporal_motion_min_ncc: float = Field(0.5, ge=-1, le=1)  # trust a CT displacement from this NCC peak
    temporal_motion_min_mm3: float = Field(30.0, ge=0)  # smaller components are not followed


class QASettings(BaseModel):
    """Group ``qa``: QA flags (models/post/qa.py; they never change the masks)."""

    # plausible volume range per ROI name in cc, merged over the defaults (GTVp <= 500 cc, Heart 50-1500 cc,
    # Lung_L/Lung_R 300-6000 cc); null removes a default.
    qa_volume_cc: dict[str, tuple[float, float] | None] = Field(default_factory=dict)
    # flag a ROI whose median volume reaches this fraction of another's, merged over {"Heart": {"Lung_L": 0.8,
    # "Lung_R": 0.8}}
    qa_volume_ratio_max: dict[str, dict[str, float]] = Field(default_factory=dict)
    qa_volume_variation_max: float = Field(0.5, gt=0)  # (max - min) / median volume over the phases
    qa_envelope_ratio_max: float = Field(5.0, ge=1)  # envelope (ITV) volume / its largest phase
    qa_jump_mm: float = Field(5.0, gt=0)  # centroid off the line through its neighbouring phases


class OutputSettings(BaseModel):
    """Group ``output``: what is written for a study."""

    layout: Literal["combined", "per-series"] = "combined"
    write_seg: bool = False
    # the QA report (PDF + PNG pages) is always written with the result; this also sends it as a DICOM
    # Encapsulated PDF to the destinations, beside the RTSTRUCT (docs/qa-report.md)
    send_qa_report: bool = True
    uid_root: str | None = None  # site UID root (e.g. "1.2.826.0.1.3680043.10.123.") for output UIDs
    rtstruct_holes: Literal["keyhole", "xor"] = "keyhole"  # how contours carry holes (docs/rtstruct.md)


class ExportSettings(BaseModel):
    """Group ``export``: where results go and how sending is retried."""

    destinations: Annotated[list[Destination], NoDecode] = Field(default_factory=list)
    export_soft_time_limit: float = Field(900.0, gt=0)  # seconds per export item; hard limit +300 s
    export_retry_base: float = Field(30.0, gt=0)  # seconds, doubled each try
    export_retry_max_delay: float = Field(1800.0, gt=0)
    export_horizon_hours: float = Field(24.0, gt=0)
    export_connect_timeout: float = Field(10.0, gt=0)  # TCP connect (and TLS handshake), seconds
    export_acse_timeout: float = Field(30.0, gt=0)  # wait for A-ASSOCIATE-AC/RJ
    export_dimse_timeout: float = Field(120.0, gt=0)  # wait for each C-STORE response
    export_sweep_interval: float = Field(60.0, gt=0)  # how often the service re-enqueues due retries

    @field_validator("destinations", mode="before")
    @classmethod
    def _split_destinations(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p for p in (s.strip() for s in v.split(",")) if p]
        if isinstance(v, list):
            return [Destination.parse(x) if isinstance(x, str) else x for x in v]
        return v


class HealthSettings(BaseModel):
    """Group ``health``: the HTTP health page and dashboard, and logging."""

    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    # the dashboard's admin token (env ITVNODE_HTTP_TOKEN): unset, its actions (release, retry, resend,
    # delete) are off and no page shows patient identifiers
    http_token: str | None = Field(None, repr=False)
    log_level: str = "INFO"


#: YAML group name -> (its settings, the prefix its flat names carry: ``temporal: {motion_mm: ..}``)
GROUPS: dict[str, tuple[type[BaseModel], str]] = {
    "network": (NetworkSettings, ""),
    "storage": (StorageSettings, "spool_"),
    "intake": (IntakeSettings, ""),
    "retention": (RetentionSettings, "retention_"),
    "queue": (QueueSettings, ""),
    "engine": (EngineSettings, ""),
    "temporal": (TemporalSettings, "temporal_"),
    "qa": (QASettings, "qa_"),
    "output": (OutputSettings, ""),
    "export": (ExportSettings, "export_"),
    "health": (HealthSettings, "http_"),
}


class Settings(NetworkSettings, StorageSettings, IntakeSettings, RetentionSettings, QueueSettings,
               EngineSettings, TemporalSettings, QASettings, OutputSettings, ExportSettings, HealthSettings,
               BaseSettings):
    """Every knob of the node, by group (:data:`GROUPS`). Env: ``ITVNODE_<FIELD>``; nested:
    ``ITVNODE_TLS__CERT``. Attributes stay flat (``settings.port``); the groups are the classes above."""

    model_config = SettingsConfigDict(env_prefix="ITVNODE_", env_nested_delimiter="__", extra="forbid")

    @property
    def watermark_bytes(self) -> int:
        """Free space retention keeps (``retention_free_bytes``, default twice ``min_free_bytes``)."""
        if self.retention_free_bytes is None:
            return 2 * self.min_free_bytes
        return max(self.retention_free_bytes, self.min_free_bytes)

    # Derived locations: everything lives under data_dir.
    @property
    def paths(self) -> DataLayout:
        return DataLayout(self.data_dir)

    @property
    def spool_dir(self) -> Path:
        return self.paths.spool

    @property
    def outbox_dir(self) -> Path:
        return self.paths.outbox

    @property
    def broker_dir(self) -> Path:
        return self.paths.broker

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


_config_file: ContextVar[Path | None] = ContextVar("itvnode_config_file", default=None)


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the file passed to :func:`load_settings`, else the one named by ``ITVNODE_CONFIG``."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get() or os.environ.get("ITVNODE_CONFIG")
        if not path:
            return {}
        return read_config_file(Path(path), GROUPS)


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings; on error raise :class:`SettingsError` naming each bad key."""
    token = _config_file.set(Path(config) if config is not None else None)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"setting {key!r}: {err['msg']}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    except ConfigFileError as exc:
        raise SettingsError(str(exc)) from None
    except SourceError as exc:  # e.g. ITVNODE_CALLER_IPS that is not JSON
        raise SettingsError(f"invalid configuration: {exc} (a JSON value is expected)") from None
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read configuration: {exc}") from None
    finally:
        _config_file.reset(token)

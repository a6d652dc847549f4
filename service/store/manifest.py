"""The study manifest: the durable source of truth for one 4DCT study (schema in docs/internal-api.md).

``data_dir/studies/<study_key>/manifest.json``, written atomically (temp file, fsync, rename, fsync of the
directory). Several processes update it (assembler, segment task, export task): read-modify-write goes
through :func:`update_manifest`, which holds an exclusive ``flock`` on ``manifest.lock`` next to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.store.durable import private_dir, write_atomic
from service.store.layout import MANIFEST_LOCK, DataLayout
from service.store.state import StudyState, check_transition

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
IDENTIFIER_KEYS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
    "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
)


def utcnow_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_epoch(iso: str | None) -> float | None:
    """Seconds since the epoch of a time :func:`utcnow_iso` wrote; None when unset or unreadable."""
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class PhaseEntry(BaseModel):
    percent: float  # position in the breathing cycle, 0 <= p < 100 (service.intake.phases.order_phases)
    label: str = ""  # ROI suffix from the vendor's label ("P40", "In50"); empty: P<percent>
    series_instance_uid: str
    series_description: str = ""
    slices: int
    files: list[str] = Field(default_factory=list)  # relative to data_dir, sorted along the slice normal


class ReferenceEntry(BaseModel):
    kind: Literal["AVG", "MIP", "MinIP"]
    series_instance_uid: str
    series_description: str = ""
    files: list[str] = Field(default_factory=list)


class Geometry(BaseModel):
    # NaN/Infinity would be written as bare tokens that no reader accepts: refuse them when built
    model_config = {"allow_inf_nan": False}

    rows: int
    columns: int
    pixel_spacing: list[float]  # [row spacing, column spacing] mm
    image_orientation: list[float]
    positions: list[list[float]]  # ImagePositionPatient per slice, in file order
    slice_spacing: float


class HistoryEntry(BaseModel):
    state: StudyState
    at: str
    reason: str | None = None


class Note(BaseModel):
    at: str
    text: str


class IgnoredSeries(BaseModel):
    series_instance_uid: str
    series_description: str = ""
    why: str = ""


class Cycle(BaseModel):
    """How the phases cover the breathing cycle (rule: :func:`service.intake.phases.cycle_coverage`).

    ``expected``: phases of the cycle (``expected_phases``, or inferred from the labels); ``present`` /
    ``missing``: percents on that cycle's grid; ``off_grid``: labels that lie on no grid of the cycle;
    ``note``: why a cycle that looks regular still counts as incomplete (fewer phases than the site expects).
    """

    expected: int
    present: list[float] = Field(default_factory=list)
    missing: list[float] = Field(default_factory=list)
    off_grid: list[float] = Field(default_factory=list)
    note: str | None = None

    @property
    def used(self) -> int:
        return len(self.present) + len(self.off_grid)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.off_grid and self.note is None and self.used >= self.expected

    def summary(self) -> str:
        """``"3 of 10 phases"``: what the ITV is built from."""
        return f"{self.used} of {self.expected} phases"

    def describe(self) -> str:
        """The hold reason: ``"3 of 10 phases: 10 %, 20 %, 40 % missing"`` (no patient data)."""
        parts = []
        if self.missing:
            parts.append(", ".join(_pct(p) for p in self.missing) + " missing")
        if self.off_grid:
            parts.append(", ".join(_pct(p) for p in self.off_grid) + " not on the cycle's grid")
        if self.note:
            parts.append(self.note)
        return self.summary() + (": " + "; ".join(parts) if parts else "")


def _pct(p: float) -> str:
    return f"{round(p, 1):g} %"


class Release(BaseModel):
    """An admin's decision to process a held study anyway (``itvnode release``), for this content only."""

    at: str
    held_reason: str | None = None
    fingerprint: str | None = None  # the content released; new instances are assessed again


class Manifest(BaseModel):
    schema_: int = Field(default=SCHEMA_VERSION, alias="schema")
    study_key: str
    study_instance_uid: str
    frame_of_reference_uid: str
    state: StudyState = StudyState.COLLECTING
    reason: str | None = None
    phases: list[PhaseEntry] = Field(default_factory=list)
    references: list[ReferenceEntry] = Field(default_factory=list)
    geometry: Geometry | None = None
    identifiers: dict[str, str] = Field(default_factory=dict)
    history: list[HistoryEntry] = Field(default_factory=list)
    task_id: str | None = None
    results: dict[str, Any] = Field(default_factory=dict)
    # additive fields (not in the first schema draft; readers must tolerate their absence)
    fingerprint: str | None = None  # sha256 over the SOP Instance UIDs the phases were built from
    updated_at: str | None = None
    notes: list[Note] = Field(default_factory=list)  # events that did not change the state
    late_fingerprint: str | None = None  # content seen after completion (noted once)
    ignored_series: list[IgnoredSeries] = Field(default_factory=list)  # same FoR, neither phase nor reference
    cycle: Cycle | None = None  # phase coverage of the breathing cycle (set by the assembler)
    released: Release | None = None  # set by ``itvnode release``

    model_config = {"populate_by_name": True, "extra": "allow"}

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=1)


def study_key(study_uid: str, for_uid: str) -> str:
    """First 16 hex digits of sha256(StudyInstanceUID + "/" + FrameOfReferenceUID)."""
    return hashlib.sha256(f"{study_uid}/{for_uid}".encode()).hexdigest()[:16]


def manifest_path(data_dir: Path, key: str) -> Path:
    return DataLayout(data_dir).manifest(key)


def load_manifest(path: Path) -> Manifest:
    return Manifest.model_validate_json(Path(path).read_bytes())


def save_manifest(m: Manifest, path: Path) -> None:
    """Atomic and durable: temp file in the same directory, fsync, rename, fsync of the directory."""
    path = Path(path)
    private_dir(path.parent)
    write_atomic(path, m.to_json().encode())


def set_state(m: Manifest, state: StudyState | str, reason: str | None = None) -> Manifest:
    """Move ``m`` to ``state`` and append to its history: the only code that changes a study's state.

    Same state allowed where the table lists it (a note). A transition the table does not list raises
    :class:`~service.store.state.IllegalTransition` (a manifest without history is a new study: any state).
    """
    to = check_transition(m.study_key, m.state if m.history else None, state)
    now = utcnow_iso()
    m.state = to
    m.reason = reason
    m.history.append(HistoryEntry(state=to, at=now, reason=reason))
    m.updated_at = now
    return m


@contextlib.contextmanager
def manifest_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock for a read-modify-write of the manifest at ``path``."""
    path = Path(path)
    private_dir(path.parent)
    with open(path.with_name(MANIFEST_LOCK), "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def update_manifest(path: Path, fn: Callable[[Manifest], Manifest | None]) -> Manifest:
    """Load, apply ``fn`` (mutate in place or return a new one), save — all under the manifest lock."""
    with manifest_lock(path):
        m = load_manifest(path)
        new = fn(m)
        m = new if new is not None else m
        save_manifest(m, path)
        return m


def iter_manifests(data_dir: Path) -> Iterator[tuple[Path, Manifest]]:
    """Every readable manifest under ``data_dir/studies`` (unreadable ones are logged and skipped)."""
    for path in DataLayout(data_dir).manifest_paths():
        try:
            yield path, load_manifest(path)
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable manifest %s: %s", path, exc)


def iter_manifest_dicts(data_dir: Path) -> Iterator[dict[str, Any]]:
    """Every manifest under ``data_dir/studies`` as its raw JSON dict, without validation (metrics and health
    read fields of any schema version); unreadable ones are logged and skipped."""
    for path in DataLayout(data_dir).manifest_paths():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("metrics: skipping unreadable manifest %s: %s", path, exc)
            continue
        if isinstance(data, dict):
            yield data


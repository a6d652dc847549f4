"""Where everything lives under the data directory: the one object that knows the paths.

::

    <data_dir>/
        spool/                      received instances, <study uid>/<series uid>/<sop uid>.dcm + index.sqlite
                                    + journal/ (service.store.journal)
        studies/<study key>/        manifest.json (+ manifest.lock), heartbeat, results/ (RTSTRUCT, qa.json),
                                    phase_masks/ (a split study's per-phase masks, worker.phase_masks)
        outbox/                     items/, done/, dead/, tmp/ (service.store.outbox)
        broker/                     the embedded broker (service.intake.queue), when no broker URL is set
        retention.json              totals of what retention and the admin commands purged (for /metrics)

Everything under it is owner-only (service.store.durable).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_LOCK = "manifest.lock"  # next to the manifest (service.store.manifest.manifest_lock)
SPOOL_INDEX = "index.sqlite"  # inside a spool directory (also a scratch spool outside data_dir)
SPOOL_JOURNAL = "journal"  # inside a spool directory: the write-ahead journal of itvnode serve
RESULTS = "results"
HEARTBEAT = "heartbeat"
PHASE_MASKS = "phase_masks"


@dataclass(frozen=True)
class DataLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def spool_index(self) -> Path:
        return self.spool / SPOOL_INDEX

    @property
    def spool_journal(self) -> Path:
        return self.spool / SPOOL_JOURNAL

    @property
    def studies(self) -> Path:
        return self.root / "studies"

    def study_dir(self, key: str) -> Path:
        return self.studies / key

    def manifest(self, key: str) -> Path:
        return self.study_dir(key) / MANIFEST

    def manifest_paths(self) -> list[Path]:
        """Every study's manifest, by study key (none when there is no studies directory yet)."""
        return sorted(self.studies.glob(f"*/{MANIFEST}"))

    def results(self, key: str) -> Path:
        return self.study_dir(key) / RESULTS

    def heartbeat(self, key: str) -> Path:
        return self.study_dir(key) / HEARTBEAT

    def phase_masks(self, key: str) -> Path:
        return self.study_dir(key) / PHASE_MASKS

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def retention_stats(self) -> Path:
        return self.root / "retention.json"

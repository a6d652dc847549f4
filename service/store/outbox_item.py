"""An outbox item: the files it carries, its destinations and their delivery state, as stored in
``item.json`` under the outbox root (layout: :mod:`service.store.outbox`), and the read-only views of the
items on disk that status and metrics use (they never create or lock anything)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydicom.filereader import read_file_meta_info

from service.setting_values import Destination

SCHEMA = 1
_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DestStatus = Literal["pending", "delivered", "dead"]
ACTIVE, DONE, DEAD = "items", "done", "dead"  # sub-directories of the outbox root
ITEM_JSON = "item.json"
DEAD_REASON = "reason.json"  # in dead/<item>/<destination>/


@dataclass(frozen=True)
class FileInfo:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def read_file_info(path: Path) -> FileInfo:
    """File Meta Information of a DICOM Part 10 file; ValueError when it is not one."""
    try:
        meta = read_file_meta_info(path)
    except FileNotFoundError as exc:
        raise ValueError(f"file not found: {path}") from exc
    except Exception as exc:  # pydicom raises InvalidDicomError, OSError, struct errors ...
        raise ValueError(f"not a DICOM Part 10 file: {exc}") from exc
    missing = [k for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
               if not meta.get(k)]
    if missing:
        raise ValueError(f"file meta information lacks {', '.join(missing)}")
    return FileInfo(Path(path), str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                    str(meta.TransferSyntaxUID))



def destination_slug(key: str) -> str:
    """A file-system-safe name for a destination key ``AE@host:port``."""
    return re.sub(r"[^A-Za-z0-9._@-]", "_", key)


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")



class OutboxFile(BaseModel):
    name: str  # file name under files/
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int
    sha256: str


class DestinationState(BaseModel):
    destination: Destination
    status: DestStatus = "pending"
    attempts: int = 0
    next_attempt_at: float  # epoch seconds
    last_attempt_at: float | None = None
    last_error: str | None = None
    delivered: list[str] = Field(default_factory=list)  # SOP instance UIDs acknowledged by this destination
    delivered_at: float | None = None
    dead_reason: str | None = None
    dead_letter: str | None = None  # path relative to the outbox root


class OutboxItem(BaseModel):
    schema_version: int = SCHEMA
    item_id: str
    study_key: str | None = None
    created_at: float
    horizon_at: float  # no attempt is scheduled after this (epoch seconds)
    files: list[OutboxFile]
    destinations: dict[str, DestinationState]  # key: "AE@host:port"
    enqueued_for: float | None = None  # next_attempt_at for which a broker message is already on its way
    enqueued_at: float | None = None
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return all(d.status != "pending" for d in self.destinations.values())

    def next_due(self) -> float | None:
        pending = [d.next_attempt_at for d in self.destinations.values() if d.status == "pending"]
        return min(pending) if pending else None

    def due(self, now: float) -> list[str]:
        return [k for k, d in self.destinations.items() if d.status == "pending" and d.next_attempt_at <= now]



def check_item_id(item_id: str) -> None:
    if not _ID_RE.match(item_id):
        raise ValueError(f"invalid outbox item id {item_id!r}")


# ------------------------------------------------------------------------------------- read-only views


def iter_items(root: Path, subs: tuple[str, ...] = (ACTIVE, DONE)) -> Iterator[OutboxItem]:
    """Items under ``root``: active ones (``items/``), then finished ones (``done/``: their final record),
    each in item id order. Unreadable ones (moved to done/ meanwhile, or being written) are skipped."""
    for sub in subs:
        for path in sorted((Path(root) / sub).glob(f"*/{ITEM_JSON}")):
            try:
                yield OutboxItem.model_validate_json(path.read_bytes())
            except (OSError, ValueError):
                continue


def state_counts(root: Path) -> dict[str, int]:
    """Per-destination deliveries by state, for metrics: ``pending``, ``sent`` and ``dead``.

    Active items are read from ``items/``; finished ones from ``done/`` (their final record). Cheap enough
    for a scrape: one small JSON file per item.
    """
    counts = {"pending": 0, "sent": 0, "dead": 0}
    names = {"pending": "pending", "delivered": "sent", "dead": "dead"}
    for item in iter_items(root):
        for st in item.destinations.values():
            counts[names[st.status]] += 1
    return counts


def item_counts(root: Path) -> dict[str, int]:
    """Items by state without reading them: ``pending`` (``items/``), ``finished`` (``done/``) and ``dead``
    (``dead/<item>/<destination>/reason.json``: one per destination given up); empty without an outbox."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {
        "pending": sum(1 for _ in root.glob(f"{ACTIVE}/*/{ITEM_JSON}")),
        "finished": sum(1 for _ in root.glob(f"{DONE}/*/{ITEM_JSON}")),
        "dead": sum(1 for _ in root.glob(f"{DEAD}/*/*/{DEAD_REASON}")),
    }

"""The spool's SQLite index: its schema (and the migration from the first layout), the queries on it, and
:class:`SpoolIndexReader`, the read-only view for other processes.

The index lives at ``<spool>/`` :data:`service.store.layout.SPOOL_INDEX`; only
:class:`service.store.spool.Spool` writes it. It runs WAL with ``synchronous=NORMAL`` (committed rows
survive a process crash; a power cut may roll back the last few, which :meth:`Spool.reconcile` re-indexes
from the files).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from service.store.instance_meta import InstanceMeta

LOG = logging.getLogger(__name__)

# Instances are keyed by study: another study reusing a SOP Instance UID is kept apart (its own directory and
# row) and never touches the first study's file. ``revision`` counts re-sends of changed content (0: as first
# received); the assembler's fingerprint includes it, so a corrected instance re-opens a finished study.
_COLUMNS = ("study_instance_uid, sop_instance_uid, series_instance_uid, path, size, received_at, meta, "
            "revision")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    study_instance_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    meta TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (study_instance_uid, sop_instance_uid)
);
"""
_INDEXES = "CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid, received_at);"


def open_index(path: Path, *, fsync: bool) -> sqlite3.Connection:
    """The writer's connection (shared by threads, autocommit): WAL, the schema created or migrated."""
    db = sqlite3.connect(path, check_same_thread=False, timeout=30.0, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'NORMAL' if fsync else 'OFF'}")
    _migrate(db)
    db.executescript(_SCHEMA)
    db.executescript(_INDEXES)
    return db


def _migrate(db: sqlite3.Connection) -> None:
    """Index of the first layout (keyed by SOP Instance UID alone): re-key by study, keep every row."""
    cols = [r[1] for r in db.execute("PRAGMA table_info(instances)").fetchall()]
    if not cols or "revision" in cols:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE instances RENAME TO instances_v1")
        db.execute(_SCHEMA)
        db.execute(
            f"INSERT INTO instances ({_COLUMNS}) SELECT study_instance_uid, sop_instance_uid, "
            "series_instance_uid, path, size, received_at, meta, 0 FROM instances_v1")
        db.execute("DROP TABLE instances_v1")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    LOG.info("spool index migrated: instances keyed by (study, SOP Instance UID)")


# -- queries (the caller holds the connection's lock, if it has one)


def upsert(db: sqlite3.Connection, meta: InstanceMeta, rel: str, size: int, received_at: float,
           revision: int) -> None:
    """Insert or replace the row of (study, SOP Instance UID); a revision never goes down."""
    db.execute(
        f"INSERT INTO instances ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (study_instance_uid, sop_instance_uid) DO UPDATE SET "
        "series_instance_uid = excluded.series_instance_uid, path = excluded.path, "
        "size = excluded.size, received_at = excluded.received_at, meta = excluded.meta, "
        "revision = MAX(instances.revision, excluded.revision)",
        (meta.study_instance_uid, meta.sop_instance_uid, meta.series_instance_uid, rel, size, received_at,
         meta.to_json(), revision),
    )


def study_uids(db: sqlite3.Connection) -> list[str]:
    rows = db.execute(
        "SELECT DISTINCT study_instance_uid FROM instances ORDER BY study_instance_uid").fetchall()
    return [r[0] for r in rows]


def instance_rows(db: sqlite3.Connection, study_uid: str) -> list[tuple[str, str]]:
    """(meta JSON, path relative to the spool) of the study's instances, by series then arrival."""
    return db.execute(
        "SELECT meta, path FROM instances WHERE study_instance_uid = ? ORDER BY series_instance_uid, "
        "received_at", (study_uid,)).fetchall()


def revisions(db: sqlite3.Connection, study_uid: str) -> dict[str, int]:
    """SOP Instance UID -> revision of the study's instances re-sent with changed content (> 0)."""
    rows = db.execute("SELECT sop_instance_uid, revision FROM instances WHERE study_instance_uid = ? "
                      "AND revision > 0", (study_uid,)).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def last_received(db: sqlite3.Connection, study_uid: str) -> float | None:
    row = db.execute("SELECT MAX(received_at) FROM instances WHERE study_instance_uid = ?",
                     (study_uid,)).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def receive_span(db: sqlite3.Connection, study_uid: str) -> tuple[float, float] | None:
    """When the study's first and last instance arrived (epoch seconds); None when it has none."""
    row = db.execute("SELECT MIN(received_at), MAX(received_at) FROM instances WHERE study_instance_uid = ?",
                     (study_uid,)).fetchone()
    return None if not row or row[0] is None else (float(row[0]), float(row[1]))


def count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


def total_size(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COALESCE(SUM(size), 0) FROM instances").fetchone()[0])


# -- other processes


class SpoolIndexReader:
    """Read-only queries on the index at ``path`` (:attr:`service.store.layout.DataLayout.spool_index`) from a
    process that does not own the spool: a worker, ``/metrics``. Each query opens the index ``mode=ro``, so
    it never creates the index nor takes a write lock; with no index yet it answers "nothing" (empty, None).
    An index that cannot be read raises :class:`sqlite3.Error`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5.0)
        try:
            yield con
        finally:
            con.close()

    def exists(self) -> bool:
        return self.path.exists()

    def revisions(self, study_uid: str) -> dict[str, int]:
        """:meth:`service.store.spool.Spool.revisions` (a worker deriving output UIDs)."""
        if not self.exists():
            return {}
        with self._connect() as con:
            return revisions(con, study_uid)

    def receive_span(self, study_uid: str) -> tuple[float, float] | None:
        """First and last arrival of the study's instances (the pipeline's ``receive`` timing)."""
        if not self.exists():
            return None
        with self._connect() as con:
            return receive_span(con, study_uid)

    def count(self) -> int | None:
        """Instances indexed; None when there is no index."""
        if not self.exists():
            return None
        with self._connect() as con:
            return count(con)

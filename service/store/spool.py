"""Durable spool of received instances, indexed in SQLite (:mod:`service.store.spool_index`).

Files live at ``<root>/<study_uid>/<series_uid>/<sop_uid>.dcm`` exactly as received (file meta header +
the data set bytes the peer sent, no transcoding, no pixel decoding). :meth:`Spool.store` returns only once
the file and its directory entry are on disk (temp file in the same directory, fsync, atomic rename, fsync
of the directory) and the index row is committed; a C-STORE is acknowledged only after that.

The SCP streams a C-STORE data set into a temp file in the spool root as it arrives (:meth:`Spool.incoming`,
:class:`Incoming`) and :meth:`Spool.store` files that the same way (rename into place, then the journal or
the fsyncs), with the same checks as for bytes.

The files are the durable truth; the index is derived from them: :meth:`Spool.reconcile` re-indexes any
durable file the index lacks — ``itvnode serve`` calls it at start-up. A third fsync per instance (the WAL)
would cost ~25 % of ingest throughput for no durability gain. What an acceptable instance is lives in
:mod:`service.store.instance_meta` and :mod:`service.store.header_scan`.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
import weakref
import zlib
from collections.abc import Callable
from pathlib import Path

from service.store import spool_index
from service.store.durable import DIR_MODE, FILE_MODE, fsync_dir, fsync_file, private_dir, write_atomic
from service.store.header_scan import meta_from_bytes
from service.store.ingest_errors import (
    ConflictingDuplicate,
    IngestError,
    InvalidIdentifier,
    SpoolFull,
    SpoolUnavailable,
)
from service.store.instance_meta import PATH_SAFE_UID_RE, InstanceMeta
from service.store.journal import IDLE_CHECKPOINT_S, Journal
from service.store.layout import SPOOL_INDEX, SPOOL_JOURNAL

LOG = logging.getLogger(__name__)

_TMP_SUFFIX = ".part"
_STALE_TMP_SECONDS = 3600.0
_INCOMING_PREFIX = ".incoming-"


def _discard(fd: int, path: str) -> None:
    for step in (lambda: os.close(fd), lambda: os.unlink(path)):
        try:
            step()
        except OSError:
            pass


class Incoming:
    """An instance written to a temp file in the spool as its fragments arrive (no copy of it is assembled
    in memory); :meth:`Spool.store` then files it where it belongs.

    Keeps the first :data:`PREFIX` bytes for the header scan and the CRC-32 of everything for the journal.
    Past ``limit`` bytes (what the file system had free) or after a write error it stops writing, so that a
    peer cannot fill the disk, and :meth:`check` raises the refusal; the free-space watermark is
    :meth:`Spool.store`'s, as for bytes. Closed (and its temp file removed, unless filed) by :meth:`close`, or
    when garbage-collected.
    """

    PREFIX = 256 * 1024

    def __init__(self, path: Path, head: bytes, limit: int, *, crc: bool = True) -> None:
        self.path = path
        self._crc = crc  # only the journal needs it
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self._closer = weakref.finalize(self, _discard, self.fd, str(path))
        self.limit = limit
        self.size = 0
        self.crc = 0
        self.prefix = bytearray()
        self.error: OSError | None = None
        self.write(head)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.error is not None:
            return
        n = len(data)
        if self.size + n > self.limit:
            self.error = OSError(errno.ENOSPC, "No space left on device")
            os.ftruncate(self.fd, 0)
            return
        if len(self.prefix) < self.PREFIX:
            self.prefix += data[: self.PREFIX - len(self.prefix)]
        if self._crc:
            self.crc = zlib.crc32(data, self.crc)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            self.error = exc
            os.ftruncate(self.fd, 0)
            return
        self.size += n

    def check(self) -> None:
        """Raise what made :meth:`write` stop, as the spool's refusal."""
        if self.error is None:
            return
        if self.error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SpoolFull("spool file system is full")
        name = errno.errorcode.get(self.error.errno or 0, type(self.error).__name__)
        raise SpoolUnavailable(f"spool write failed: {name}")

    def read_all(self) -> bytes:
        """The whole instance (a re-send to compare, or a header the fast scan does not handle)."""
        parts, pos = [], 0
        while pos < self.size:
            chunk = os.pread(self.fd, self.size - pos, pos)
            if not chunk:
                raise SpoolUnavailable("spool temp file shrank")
            parts.append(chunk)
            pos += len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        self._closer()


class Spool:
    """Local-directory spool; every method is thread-safe (one SQLite connection behind a lock).

    ``min_free_bytes``: :meth:`store` refuses with :class:`SpoolFull` when the file would leave less than this
    free on the spool's file system. ``fsync=False`` is for tests and benchmarks only. ``journal=True`` (the
    one process receiving: ``itvnode serve``) makes a store durable through :class:`Journal` (one
    ``fdatasync``) instead of fsyncing the new file and its directory; call :meth:`reconcile` at start-up.
    """

    def __init__(self, root: Path, *, min_free_bytes: int = 0, fsync: bool = True,
                 max_bytes: int | None = None, journal: bool = False,
                 journal_checkpoint_s: float = IDLE_CHECKPOINT_S) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        self.max_bytes = max_bytes
        #: called with the bytes a store needs when it would leave less than ``min_free_bytes`` free (the
        #: retention watermark purge, service.ops.retention); the check is repeated after it returns
        self.on_low_space: Callable[[int], object] | None = None
        self._low_space_lock = threading.Lock()
        self._used: int | None = None  # bytes of indexed instances (cached; refreshed when space is short)
        private_dir(self.root)
        self._lock = threading.RLock()
        self._known_dirs: set[Path] = set()
        self._db = spool_index.open_index(self.root / SPOOL_INDEX, fsync=fsync)
        self._remove_stale_parts()
        self._journal = (Journal(self.root / SPOOL_JOURNAL, self.root, journal_checkpoint_s)
                         if journal and fsync else None)
        self._incoming_seq = 0

    def incoming(self, head: bytes) -> Incoming:
        """A temp file for an instance that arrives in fragments, starting with ``head`` (preamble and file
        meta); :meth:`store` it, or :meth:`Incoming.close` it to drop it."""
        with self._lock:
            self._incoming_seq += 1
            seq = self._incoming_seq
        name = f"{_INCOMING_PREFIX}{os.getpid()}-{threading.get_ident()}-{seq}{_TMP_SUFFIX}"
        return Incoming(self.root / name, head, shutil.disk_usage(self.root).free,
                        crc=self._journal is not None)

    # -- writing

    def store(self, meta: InstanceMeta, encoded: bytes | Incoming) -> Path:
        """Write ``encoded`` (or file an :class:`Incoming`, which is closed in any case) durably then index
        it. Returns the file path.

        Per study and SOP Instance UID: an identical re-send changes nothing but the received time (no
        write); changed content in the same series replaces the file and bumps the instance's revision (a
        corrected re-send); the same SOP Instance UID in another series of the study is refused with
        :class:`ConflictingDuplicate`. Another study with the same SOP Instance UID is simply another file.
        """
        if isinstance(encoded, Incoming):
            try:
                encoded.check()
                return self._store(meta, encoded)
            finally:
                encoded.close()
        return self._store(meta, encoded)

    def _store(self, meta: InstanceMeta, encoded: bytes | Incoming) -> Path:
        for uid in (meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid):
            if not PATH_SAFE_UID_RE.match(uid) or len(uid) > 64:
                raise InvalidIdentifier("UID not usable as a spool path")
        series_dir = self.root / meta.study_instance_uid / meta.series_instance_uid
        final = series_dir / f"{meta.sop_instance_uid}.dcm"
        with self._lock:
            row = self._db.execute(
                "SELECT series_instance_uid, path, revision FROM instances WHERE study_instance_uid = ? "
                "AND sop_instance_uid = ?", (meta.study_instance_uid, meta.sop_instance_uid)).fetchone()
        if row is not None:
            if row[0] != meta.series_instance_uid:
                raise ConflictingDuplicate("SOP Instance UID already stored in another series")
            if isinstance(encoded, Incoming):
                encoded = encoded.read_all()  # compared, and written again if changed: a rare path
            if self._same_bytes(self.root / row[1], encoded):
                with self._lock:
                    cur = self._db.execute(
                        "UPDATE instances SET received_at = ? WHERE study_instance_uid = ? AND "
                        "sop_instance_uid = ?", (time.time(), meta.study_instance_uid, meta.sop_instance_uid))
                if cur.rowcount == 1 and (self.root / row[1]).is_file():
                    return self.root / row[1]
                row = None  # purged meanwhile (service.ops.retention): store it as new
        revision = 0
        if row is not None:
            revision = int(row[2]) + 1
            LOG.warning("study %s: instance %s re-sent with changed content; replacing it (revision %d)",
                        meta.study_instance_uid, meta.sop_instance_uid, revision)
        size, pending = (encoded.size, encoded.size) if isinstance(encoded, Incoming) else (len(encoded), 0)
        if self.free_bytes(pending) - size < self.min_free_bytes:
            self._make_room(size, pending)
        tmp = series_dir / f".{meta.sop_instance_uid}.{threading.get_ident()}{_TMP_SUFFIX}"
        for attempt in (1, 2):
            try:
                self._ensure_dir(series_dir)
                if isinstance(encoded, Incoming):
                    self._file_durably(encoded, final)
                else:
                    self._write_durably(tmp, final, encoded)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise SpoolUnavailable("spool directory vanished during the write") from None
                self._known_dirs.discard(series_dir)  # removed behind our back (e.g. a purge): recreate
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SpoolFull("spool file system is full") from None
                name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                raise SpoolUnavailable(f"spool write failed: {name}") from None
        self._index(meta, final, size, revision=revision)
        return final

    @staticmethod
    def _same_bytes(path: Path, encoded: bytes) -> bool:
        """Whether the stored file holds exactly ``encoded`` (read only when a SOP Instance UID recurs)."""
        try:
            if path.stat().st_size != len(encoded):
                return False
            return path.read_bytes() == encoded
        except OSError:
            return False

    def _write_durably(self, tmp: Path, final: Path, encoded: bytes) -> None:
        if self._journal is None or not self._journal.fits(len(encoded)):
            write_atomic(final, encoded, tmp=tmp, fsync=self.fsync)
            return
        write_atomic(final, encoded, tmp=tmp, fsync=False)  # in place now; durable through the journal
        try:
            self._journal.append(final.relative_to(self.root).as_posix(), encoded)
        except OSError:
            LOG.exception("spool journal append failed; fsyncing %s in place", final.name)
            fsync_file(final)
            fsync_dir(final.parent)

    def _file_durably(self, incoming: Incoming, final: Path) -> None:
        """:meth:`_write_durably` for bytes already in a temp file: rename it into place, then the journal
        (copied from the file by the kernel) or fsyncs."""
        if self._journal is not None and self._journal.fits(incoming.size):
            os.replace(incoming.path, final)
            incoming.path = final  # filed: closing it must not unlink anything
            try:
                self._journal.append_file(final.relative_to(self.root).as_posix(), incoming.fd, incoming.size,
                                          incoming.crc)
            except OSError:
                LOG.exception("spool journal append failed; fsyncing %s in place", final.name)
                os.fsync(incoming.fd)
                fsync_dir(final.parent)
            return
        if self.fsync:
            os.fsync(incoming.fd)
        os.replace(incoming.path, final)
        incoming.path = final
        if self.fsync:
            fsync_dir(final.parent)

    def _ensure_dir(self, series_dir: Path) -> None:
        if series_dir in self._known_dirs:
            return
        with self._lock:
            created = []
            for d in (series_dir.parent, series_dir):
                if not d.is_dir():
                    d.mkdir(DIR_MODE, exist_ok=True)
                    created.append(d)
            if self.fsync:
                for d in created:
                    fsync_dir(d.parent)
            self._known_dirs.add(series_dir)

    def _make_room(self, needed: int, pending: int = 0) -> None:
        """Below the watermark: let retention purge finished work (one store at a time), then check again;
        :class:`SpoolFull` (0xA700) only when that did not free enough."""
        with self._low_space_lock:
            self._used = None
            if self.on_low_space is not None and self.free_bytes(pending) - needed < self.min_free_bytes:
                try:
                    self.on_low_space(needed)
                except Exception:
                    LOG.exception("retention purge for space failed")
                self._used = None
            if self.free_bytes(pending) - needed < self.min_free_bytes:
                raise SpoolFull("spool below its free-space watermark")

    def _index(self, meta: InstanceMeta, path: Path, size: int, received_at: float | None = None,
               revision: int = 0) -> None:
        """Upsert the row of (study, SOP Instance UID). Never deletes a file: other rows own other paths."""
        rel = path.relative_to(self.root).as_posix()
        with self._lock:
            spool_index.upsert(self._db, meta, rel, size, time.time() if received_at is None else received_at,
                               revision)
            if self._used is not None:
                self._used += size

    def remove_instances(self, study_uid: str, *, received_before: float,
                         frame_of_reference_uid: str | None = None) -> tuple[int, int]:
        """Delete the study's instances received before ``received_before`` (epoch; only of one frame of
        reference when given): index rows first, in one transaction, then their files. Returns (instances,
        bytes). Instances received later (a new arrival or an identical re-send during the purge) stay, and
        a file rewritten after ``received_before`` is never unlinked."""
        self._checkpoint()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT sop_instance_uid, path, size, meta FROM instances WHERE study_instance_uid = ? "
                    "AND received_at <= ?", (study_uid, received_before)).fetchall()
                if frame_of_reference_uid is not None:
                    rows = [r for r in rows
                            if InstanceMeta.from_json(r[3]).frame_of_reference_uid == frame_of_reference_uid]
                self._db.executemany(
                    "DELETE FROM instances WHERE study_instance_uid = ? AND sop_instance_uid = ? AND "
                    "received_at <= ?", [(study_uid, r[0], received_before) for r in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._used = None
        freed = 0
        dirs: set[Path] = set()
        for _sop, rel, size, _meta in rows:
            path = self.root / rel
            try:
                if path.stat().st_mtime <= received_before + 1.0:
                    path.unlink()
                    freed += int(size)
            except FileNotFoundError:
                pass
            dirs.add(path.parent)
        for d in sorted(dirs | {d.parent for d in dirs}, key=lambda p: len(p.parts), reverse=True):
            if d != self.root and d.is_relative_to(self.root):
                try:
                    d.rmdir()  # only when empty
                    self._known_dirs.discard(d)
                except OSError:
                    pass
        return len(rows), freed

    def used_bytes(self) -> int:
        """Bytes of the indexed instances."""
        with self._lock:
            if self._used is None:
                self._used = spool_index.total_size(self._db)
            return self._used

    def remove_study(self, study_uid: str) -> int:
        """Delete a study's files and index rows (after export); returns the number of instances removed."""
        self._checkpoint()
        with self._lock:
            rows = self._db.execute("SELECT path FROM instances WHERE study_instance_uid = ?",
                                    (study_uid,)).fetchall()
            self._db.execute("DELETE FROM instances WHERE study_instance_uid = ?", (study_uid,))
            self._known_dirs = {d for d in self._known_dirs if d.parent.name != study_uid}
        if PATH_SAFE_UID_RE.match(study_uid):
            shutil.rmtree(self.root / study_uid, ignore_errors=True)
        return len(rows)

    # -- reading

    def study_uids(self) -> list[str]:
        with self._lock:
            return spool_index.study_uids(self._db)

    def instances(self, study_uid: str) -> list[tuple[InstanceMeta, Path]]:
        with self._lock:
            rows = spool_index.instance_rows(self._db, study_uid)
        return [(InstanceMeta.from_json(m), self.root / p) for m, p in rows]

    def revisions(self, study_uid: str) -> dict[str, int]:
        """SOP Instance UID -> revision of the study's instances re-sent with changed content (> 0)."""
        with self._lock:
            return spool_index.revisions(self._db, study_uid)

    def last_received(self, study_uid: str) -> float | None:
        with self._lock:
            return spool_index.last_received(self._db, study_uid)

    def count(self) -> int:
        with self._lock:
            return spool_index.count(self._db)

    def free_bytes(self, pending: int = 0) -> int:
        """Free space for new instances: the file system's, or what ``max_bytes`` leaves if that is less.
        ``pending``: bytes of an :class:`Incoming` already written, counted as still free."""
        free = shutil.disk_usage(self.root).free + pending
        if self.max_bytes is not None:
            free = min(free, self.max_bytes - self.used_bytes())
        return free

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
        with self._lock:
            self._db.close()

    def _checkpoint(self) -> None:
        """Before a delete: journalled files durable in place, so that no replay brings them back."""
        if self._journal is not None:
            self._journal.checkpoint()

    # -- recovery

    def reconcile(self) -> tuple[int, int]:
        """Make the index match the files: index durable files it lacks, drop rows whose file is gone.

        Returns ``(indexed, dropped)``. Files that fail today's header rules are left alone and logged.
        First, journal records a crashed writer left are written to the spool durably (:meth:`_replay`).
        """
        self._replay()
        with self._lock:
            rows = dict(self._db.execute("SELECT path, sop_instance_uid FROM instances").fetchall())
        on_disk = {p.relative_to(self.root).as_posix(): p for p in self.root.glob("*/*/*.dcm")}
        indexed = dropped = 0
        for rel, path in on_disk.items():
            if rel in rows:
                continue
            try:
                raw = path.read_bytes()
                meta = meta_from_bytes(raw)
            except (OSError, IngestError) as exc:
                LOG.warning("spool file %s not indexed: %s", rel, exc)
                continue
            if path != self.root / meta.study_instance_uid / meta.series_instance_uid / \
                    f"{meta.sop_instance_uid}.dcm":
                LOG.warning("spool file %s does not match its header UIDs; not indexed", rel)
                continue
            self._index(meta, path, len(raw), received_at=path.stat().st_mtime)
            indexed += 1
        gone = [rel for rel in rows if rel not in on_disk]
        if gone:
            with self._lock:
                self._db.executemany("DELETE FROM instances WHERE path = ?", [(g,) for g in gone])
            dropped = len(gone)
        if indexed or dropped:
            LOG.warning("spool index reconciled: %d file(s) re-indexed, %d missing file(s) dropped", indexed,
                        dropped)
        return indexed, dropped

    def _replay(self) -> None:
        """Write every orphan journal record durably where it belongs (the last record of a path wins), index
        it, then drop the dead writers' journals."""
        if self._journal is None:
            return
        latest: dict[str, bytes] = {}
        for rel, data in self._journal.orphans():
            latest[rel] = data
        for rel, data in latest.items():
            try:
                meta = meta_from_bytes(data)
            except IngestError as exc:
                LOG.warning("journal record %s not replayed: %s", rel, exc)
                continue
            final = self.root / meta.study_instance_uid / meta.series_instance_uid / \
                f"{meta.sop_instance_uid}.dcm"
            if final.relative_to(self.root).as_posix() != rel:
                LOG.warning("journal record %s does not match its header UIDs; not replayed", rel)
                continue
            with self._lock:
                row = self._db.execute("SELECT revision FROM instances WHERE path = ?", (rel,)).fetchone()
            self._ensure_dir(final.parent)
            if self._same_bytes(final, data):
                fsync_file(final)
                fsync_dir(final.parent)
            else:
                write_atomic(final, data)
            self._index(meta, final, len(data), revision=int(row[0]) if row else 0)
        if latest:
            LOG.warning("spool journal replayed: %d instance(s) made durable after an unclean stop",
                        len(latest))
        self._journal.release_orphans()

    def _remove_stale_parts(self) -> None:
        """Drop temp files left by a crash mid-write (old enough not to belong to a live writer)."""
        cutoff = time.time() - _STALE_TMP_SECONDS
        parts = [*self.root.glob(f"*/*/.*{_TMP_SUFFIX}"),
                 *self.root.glob(f"{_INCOMING_PREFIX}*{_TMP_SUFFIX}")]
        for part in parts:
            try:
                if part.stat().st_mtime < cutoff:
                    part.unlink()
            except OSError:
                pass

"""The spool's write-ahead journal: one cheap durable write per received instance.

Making a new spool file durable costs two fsyncs (the file, then its directory after the rename): each a
file-system journal commit plus a disk cache flush. Appending to a file whose blocks already exist and
``fdatasync``-ing it needs no metadata commit: measured here ~0.4 ms against ~4-11 ms (bench/ingest.py).
So :class:`service.store.spool.Spool` writes the spool file without fsync, appends the same bytes here
(:meth:`Journal.append`, or :meth:`Journal.append_file` copying them from the file in the kernel),
and acknowledges once :meth:`Journal.append` returns; a background checkpoint fsyncs the spool files and
only then recycles the journal. After a crash, :meth:`Journal.orphans` yields what may not have reached the
spool durably, and the spool writes it again (``Spool.reconcile``).

Layout (``<spool>/`` :data:`service.store.layout.SPOOL_JOURNAL`)::

    journal/<slot>/lock            flock'd by the process writing the slot (one per ``itvnode serve``)
    journal/<slot>/seg-0, seg-1    segments: a header block (magic, generation) then records

A record is a header (magic, generation, sequence number, path length, payload length, payload CRC-32,
header CRC-32), the spool-relative path and the instance's bytes. A scan stops at the first record that is
torn or of an older generation; resetting a segment only writes a new generation into its header. Records
are written in order under a lock and ``fdatasync`` covers every earlier write, so every acknowledged record
lies before the first invalid one. Segments grow by zero-filled chunks (written once, so later appends need
no block allocation) up to :data:`SEGMENT_BYTES`; larger instances bypass the journal (``fits``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from service.store.durable import FILE_MODE, fsync_dir, private_dir

LOG = logging.getLogger(__name__)

SEGMENT_BYTES = 64 * 1024 * 1024
GROW_BYTES = 8 * 1024 * 1024
GROW_AHEAD = 16 * 1024 * 1024  # the checkpointer zero-fills the active segment this far ahead of the appends
IDLE_CHECKPOINT_S = 0.5  # default: checkpoint this long after the last append

_SEG_MAGIC = b"ITVJSEG1"
_SEG_HEAD = struct.Struct("<8sQI")  # magic, generation, crc
_HEADER_BLOCK = 4096
_REC_MAGIC = b"ITVJ"
_REC = struct.Struct("<4sQQHQI")  # magic, generation, seq, path length, payload length, payload crc
_REC_CRC = struct.Struct("<I")
_REC_HEAD = _REC.size + _REC_CRC.size


@dataclass
class _Segment:
    path: Path
    fd: int
    generation: int = 0
    offset: int = _HEADER_BLOCK
    size: int = 0  # bytes allocated (zero-filled) in the file
    inflight: int = 0  # appends reserved but not yet durable
    pending: set[str] = field(default_factory=set)  # spool paths written since the last reset
    busy: bool = False  # a checkpoint is syncing its files
    growing: bool = False  # the checkpointer is zero-filling past ``size``

    def reset(self) -> None:
        """A new generation: every record in the file is stale from now on (durable before returning)."""
        self.generation = secrets.randbits(63)
        head = _SEG_HEAD.pack(_SEG_MAGIC, self.generation, zlib.crc32(struct.pack("<Q", self.generation)))
        os.pwrite(self.fd, head.ljust(_HEADER_BLOCK, b"\0"), 0)
        self.size = max(self.size, _HEADER_BLOCK)
        os.fsync(self.fd)
        self.offset = _HEADER_BLOCK
        self.pending.clear()

    def grow(self, need: int) -> None:
        """Zero-fill (really write: no unwritten extents to convert at fdatasync time) up to ``need``."""
        target = self.grow_target(need)
        self.zero_fill(self.size, target)
        self.size = target

    def grow_target(self, need: int) -> int:
        return min(max(need, self.size + GROW_BYTES), max(SEGMENT_BYTES, need))

    def zero_fill(self, pos: int, target: int) -> None:
        zeros = bytes(1024 * 1024)
        while pos < target:
            pos += os.pwrite(self.fd, zeros[: target - pos], pos)
        os.fsync(self.fd)  # the file size is metadata

    def wants_growth(self) -> bool:
        """Less than :data:`GROW_AHEAD` zero-filled bytes left ahead of the appends."""
        return not self.growing and self.size < SEGMENT_BYTES and self.size - self.offset < GROW_AHEAD


class Journal:
    """The journal slot this process owns under ``directory``; thread-safe.

    ``spool_root``: what record paths are relative to (the checkpoint fsyncs those files); ``idle_s``: how
    long after the last append the checkpointer makes the spool files durable (also when a segment fills).
    """

    def __init__(self, directory: Path, spool_root: Path, idle_s: float = IDLE_CHECKPOINT_S) -> None:
        self.idle_s = idle_s
        self.directory = private_dir(Path(directory))
        self.spool_root = Path(spool_root)
        self._orphan_locks: dict[Path, int] = {}
        self._orphan_slots = self._lock_orphans()
        self._slot, self._lock_fd = self._new_slot()
        self._cond = threading.Condition()
        self._segs = [self._open_segment(self._slot / f"seg-{i}") for i in (0, 1)]
        self._active = 0
        self._seq = 0
        self._last_append = 0.0
        self._draining = 0  # checkpoints waiting for appends in flight
        self._closed = False
        self._thread = threading.Thread(target=self._checkpointer, name="spool-journal", daemon=True)
        self._thread.start()

    # -- slots

    def _lock_orphans(self) -> list[Path]:
        """Slots whose writer is gone (its flock released): locked by us until :meth:`release_orphans`."""
        slots = []
        for slot in sorted(p for p in self.directory.iterdir() if p.is_dir()):
            fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # another live serve's slot
                continue
            self._orphan_locks[slot] = fd
            slots.append(slot)
        return slots

    def _new_slot(self) -> tuple[Path, int]:
        slot = self.directory / f"{os.getpid()}-{secrets.token_hex(4)}"
        private_dir(slot)
        fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fsync_dir(self.directory)
        return slot, fd

    @staticmethod
    def _open_segment(path: Path) -> _Segment:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        seg = _Segment(path, fd, size=os.fstat(fd).st_size)
        seg.reset()
        fsync_dir(path.parent)
        return seg

    # -- writing

    @staticmethod
    def fits(nbytes: int) -> bool:
        """Whether an instance of ``nbytes`` goes through the journal (else: fsync it in place)."""
        return nbytes <= SEGMENT_BYTES // 4

    def append(self, rel: str, data: bytes | memoryview) -> None:
        """Durably record that spool file ``rel`` (already written, not fsynced) holds ``data``."""
        self._append(rel, len(data), zlib.crc32(data), lambda fd, offset: _pwrite_all(fd, data, offset))

    def append_file(self, rel: str, src_fd: int, nbytes: int, crc: int) -> None:
        """:meth:`append` for the first ``nbytes`` of an open file (CRC-32 ``crc``), copied by the kernel."""
        self._append(rel, nbytes, crc, lambda fd, offset: _copy_range(src_fd, fd, nbytes, offset))

    def _append(self, rel: str, nbytes: int, crc: int, write_payload: Callable[[int, int], None]) -> None:
        path = rel.encode()
        need = _REC_HEAD + len(path) + nbytes
        with self._cond:
            while True:
                if self._closed:
                    raise OSError("journal closed")
                seg = self._segs[self._active]
                if seg.offset + need > max(SEGMENT_BYTES, seg.size) and seg.offset > _HEADER_BLOCK:
                    seg = self._rotate()
                if not (seg.growing and seg.offset + need > seg.size):
                    break
                self._cond.wait(1.0)  # the checkpointer is zero-filling what this record needs
            self._seq += 1
            head = _REC.pack(_REC_MAGIC, seg.generation, self._seq, len(path), nbytes, crc)
            offset = seg.offset
            if offset + need > seg.size:
                seg.grow(offset + need)
            os.pwritev(seg.fd, [head, _REC_CRC.pack(zlib.crc32(head)), path], offset)
            write_payload(seg.fd, offset + _REC_HEAD + len(path))
            seg.offset = offset + need
            seg.inflight += 1
            seg.pending.add(rel)
            self._last_append = time.monotonic()
            if seg.wants_growth():
                self._cond.notify_all()  # zero-filling is the checkpointer's, off the acknowledgement path
        try:
            os.fdatasync(seg.fd)  # also covers every record written before this one
        finally:
            with self._cond:
                seg.inflight -= 1
                # only a checkpoint waits for a segment's appends to end; waking the checkpointer after
                # every append cost two context switches per instance
                if not seg.inflight and self._draining:
                    self._cond.notify_all()

    def _rotate(self) -> _Segment:
        """Switch to the other segment once its checkpoint is done (the caller holds the condition)."""
        other = 1 - self._active
        self._cond.notify_all()
        while (self._segs[other].pending or self._segs[other].busy) and not self._closed:
            self._cond.wait(1.0)
        self._active = other
        self._cond.notify_all()  # the checkpointer takes the segment just left
        return self._segs[other]

    # -- checkpoints

    def checkpoint(self) -> None:
        """Make every journalled spool file durable in place and recycle the segments (before a delete,
        at shutdown)."""
        with self._cond:
            if self._segs[self._active].pending:
                self._rotate()
            for seg in self._segs:
                self._checkpoint(seg)

    def _checkpoint(self, seg: _Segment) -> None:
        """fsync the spool files of an inactive segment, then reset it (the caller holds the condition)."""
        self._draining += 1
        try:
            while seg.inflight or seg.busy or seg.growing:
                self._cond.wait(1.0)
        finally:
            self._draining -= 1
        if not seg.pending:
            return
        paths = sorted(seg.pending)
        seg.busy = True
        self._cond.release()
        try:
            sync_spool_files(self.spool_root, paths)
        finally:
            self._cond.acquire()
            seg.busy = False
        seg.reset()
        self._cond.notify_all()

    def _checkpointer(self) -> None:
        with self._cond:
            while not self._closed:
                inactive = self._segs[1 - self._active]
                active = self._segs[self._active]
                if inactive.pending and not inactive.busy:
                    try:
                        self._checkpoint(inactive)
                    except OSError:
                        LOG.exception("journal checkpoint failed; retrying")
                        self._cond.wait(5.0)
                    continue
                if active.wants_growth():
                    try:
                        self._grow_ahead(active)
                    except OSError:
                        LOG.exception("journal segment growth failed; appends grow it themselves")
                        self._cond.wait(5.0)
                    continue
                idle = time.monotonic() - self._last_append
                if active.pending and not active.inflight and idle >= self.idle_s:
                    self._rotate()
                    continue
                self._cond.wait(max(self.idle_s - idle, 0.05) if active.pending else 5.0)

    def _grow_ahead(self, seg: _Segment) -> None:
        """Zero-fill the next stretch of ``seg`` without holding the condition; appends that need it wait."""
        start, target = seg.size, seg.grow_target(seg.size)
        seg.growing = True
        self._cond.release()
        try:
            seg.zero_fill(start, target)
        finally:
            self._cond.acquire()
            seg.growing = False
            self._cond.notify_all()
        seg.size = max(seg.size, target)

    def close(self) -> None:
        """Checkpoint everything, stop the checkpointer and release the slot (nothing is left to replay)."""
        self.checkpoint()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        for seg in self._segs:
            os.close(seg.fd)
        with contextlib.suppress(OSError):
            for seg in self._segs:
                seg.path.unlink()
            (self._slot / "lock").unlink()
            self._slot.rmdir()
        os.close(self._lock_fd)

    # -- recovery

    def orphans(self) -> Iterator[tuple[str, bytes]]:
        """(spool-relative path, bytes) of every valid record left by dead writers, oldest first."""
        for slot in self._orphan_slots:
            records: list[tuple[int, str, bytes]] = []
            for seg in sorted(slot.glob("seg-*")):
                records.extend(read_segment(seg))
            records.sort(key=lambda r: r[0])
            for _seq, rel, data in records:
                yield rel, data

    def release_orphans(self) -> None:
        """After the spool wrote every orphan record durably: delete the dead writers' slots."""
        for slot in self._orphan_slots:
            for p in slot.iterdir():
                p.unlink()
            slot.rmdir()
            os.close(self._orphan_locks.pop(slot))
        self._orphan_slots = []
        fsync_dir(self.directory)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_range(src: int, dst: int, nbytes: int, offset: int) -> None:
    """Copy ``nbytes`` from the start of ``src`` to ``dst`` at ``offset``: in the kernel where it can
    (``copy_file_range``), else through a bounded buffer."""
    pos = 0
    try:
        while pos < nbytes:
            n = os.copy_file_range(src, dst, nbytes - pos, pos, offset + pos)
            if not n:
                raise OSError(errno.EIO, "source file shorter than recorded")
            pos += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while pos < nbytes:
        chunk = os.pread(src, min(nbytes - pos, 1 << 20), pos)
        if not chunk:
            raise OSError(errno.EIO, "source file shorter than recorded")
        _pwrite_all(dst, chunk, offset + pos)
        pos += len(chunk)


def read_segment(path: Path) -> list[tuple[int, str, bytes]]:
    """The valid records of one segment file: (sequence number, spool-relative path, bytes)."""
    out: list[tuple[int, str, bytes]] = []
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_BLOCK)
        if len(head) < _SEG_HEAD.size:
            return out
        magic, generation, crc = _SEG_HEAD.unpack_from(head)
        if magic != _SEG_MAGIC or crc != zlib.crc32(struct.pack("<Q", generation)):
            return out
        while True:
            raw = fh.read(_REC_HEAD)
            if len(raw) < _REC_HEAD:
                return out
            magic, gen, seq, plen, dlen, dcrc = _REC.unpack_from(raw)
            (hcrc,) = _REC_CRC.unpack_from(raw, _REC.size)
            if magic != _REC_MAGIC or gen != generation or hcrc != zlib.crc32(raw[: _REC.size]):
                return out
            if dlen > SEGMENT_BYTES:
                return out
            rel = fh.read(plen)
            data = fh.read(dlen)
            if len(data) != dlen or zlib.crc32(data) != dcrc:
                return out  # torn: never acknowledged
            try:
                out.append((seq, rel.decode(), data))
            except UnicodeDecodeError:
                return out


def sync_spool_files(root: Path, rels: list[str]) -> None:
    """fsync each file (gone ones were deleted since: nothing to keep) and then each of their directories."""
    base = os.fspath(root)
    dirs = set()
    for rel in rels:  # plain strings: this runs in a thread beside the receiving ones, for every instance
        path = f"{base}/{rel}"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(path.rpartition("/")[0])
    for d in sorted(dirs):
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(Path(d))

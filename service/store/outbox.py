"""Durable outbox: results wait on disk, with their delivery schedule, until every destination has them.

Layout under ``data_dir/outbox``::

    items/<item_id>/item.json          files, destinations and per-destination state (written atomically)
    items/<item_id>/files/<sop>.dcm    the DICOM files exactly as they will be sent
    dead/<item_id>/<AE@host_port>/     dead letter: reason.json + files/ (hard links) not delivered there
    done/<item_id>/item.json           final record once every destination is delivered or dead
    tmp/                               staging; an item appears in items/ only by an atomic rename

An item is on disk (files and item.json fsynced, directory renamed into place, parent fsynced) before
:meth:`Outbox.put` returns, so export never starts from something a crash could lose. Each destination
has its own state (``pending`` / ``delivered`` / ``dead``, attempts, ``next_attempt_at``, ``last_error``,
the SOP instances it already acknowledged), so one failing destination never holds back another. The
retry schedule lives in item.json, not only in a broker countdown: after a restart :meth:`Outbox.sweep`
re-enqueues whatever is due.

Concurrency: ``item.json`` is read-modify-written under an exclusive ``flock`` on ``items/<id>/.lock``; a
delivery to one destination holds ``.lock-<destination>`` for its whole duration (non-blocking: a second
worker skips it). Both work across processes on a local filesystem (and NFSv4, where Linux maps flock to
POSIX locks).

Kept whole (~420 lines): every :class:`Outbox` method is one step of an item's life under the same locks and
item.json; split, the locking rule would live in several modules.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from service.setting_values import Destination
from service.store.durable import DIR_MODE, FILE_MODE, fsync_dir, fsync_file, private_dir, write_json_atomic
from service.store.outbox_dead_letter import dead_letter
from service.store.outbox_item import (
    ACTIVE,
    DEAD,
    DEAD_REASON,
    DONE,
    ITEM_JSON,
    DestinationState,
    OutboxFile,
    OutboxItem,
    check_item_id,
    destination_slug,
    iso,
    read_file_info,
)

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base`` seconds after the first failure, doubling, capped at ``max_delay``;
    no new attempt is scheduled after ``horizon`` seconds from the item's creation."""

    base: float = 30.0
    max_delay: float = 1800.0
    horizon: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.max_delay <= 0 or self.horizon <= 0:
            raise ValueError("retry base, max delay and horizon must be positive")

    def delay(self, failed_attempts: int) -> float:
        """Wait after the ``failed_attempts``-th consecutive failure (1-based)."""
        exponent = min(max(failed_attempts - 1, 0), 62)
        return float(min(self.base * (2.0**exponent), self.max_delay))

    @classmethod
    def from_settings(cls, settings: Any) -> RetryPolicy:
        return cls(base=settings.export_retry_base, max_delay=settings.export_retry_max_delay,
                   horizon=settings.export_horizon_hours * 3600.0)


class Outcome(Protocol):
    """What :func:`Outbox.record` needs from one delivery attempt (``service.net.scu.StoreOutcome``)."""

    @property
    def permanent(self) -> bool: ...

    def delivered_uids(self) -> set[str]: ...

    def summary(self) -> str: ...


# --------------------------------------------------------------------------------------------------- outbox


class Outbox:
    """The durable outbox under ``root`` (``settings.outbox_dir``)."""

    def __init__(self, root: Path, policy: RetryPolicy | None = None) -> None:
        self.root = Path(root)
        self.policy = policy or RetryPolicy()
        for sub in (ACTIVE, DEAD, DONE, "tmp"):
            private_dir(self.root / sub)

    # ---------------------------------------------------------------- paths and locks
    def item_dir(self, item_id: str) -> Path:
        check_item_id(item_id)
        return self.root / ACTIVE / item_id

    def files(self, item: OutboxItem) -> list[Path]:
        base = self.item_dir(item.item_id) / "files"
        return [base / f.name for f in item.files]

    @contextlib.contextmanager
    def _lock(self, item_id: str, name: str = ".lock", blocking: bool = True) -> Iterator[bool]:
        path = self.item_dir(item_id) / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except FileNotFoundError:  # the item finished and moved to done/ meanwhile
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    def destination_lock(self, item_id: str, key: str) -> contextlib.AbstractContextManager[bool]:
        """Held for a whole delivery to one destination; yields False when another worker holds it."""
        return self._lock(item_id, f".lock-{destination_slug(key)}", blocking=False)

    # ---------------------------------------------------------------- put
    def put(
        self,
        files: Sequence[Path],
        destinations: Sequence[Destination],
        *,
        study_key: str | None = None,
        item_id: str | None = None,
        now: float | None = None,
    ) -> OutboxItem:
        """Copy ``files`` into a new durable item for ``destinations``; returns it once it is on disk.

        Idempotent: the default ``item_id`` is a hash of the files' SOP instance UIDs and contents and of the
        destinations, so putting the same result twice returns the existing item (delivered or not).
        """
        if not files:
            raise ValueError("an outbox item needs at least one file")
        if not destinations:
            raise ValueError("an outbox item needs at least one destination")
        infos = [read_file_info(Path(p)) for p in files]
        uids = [i.sop_instance_uid for i in infos]
        if len(set(uids)) != len(uids):
            raise ValueError("two files share one SOP Instance UID")
        digests = [_sha256(i.path) for i in infos]
        keys = sorted({str(d) for d in destinations})
        if item_id is None:
            h = hashlib.sha256()
            for uid, digest in sorted(zip(uids, digests, strict=True)):
                h.update(f"{uid}:{digest}\n".encode())
            h.update("\n".join(keys).encode())
            item_id = h.hexdigest()[:24]
        check_item_id(item_id)
        existing = self.find(item_id)
        if existing is not None:
            log.info("outbox item %s already exists; not adding it again", item_id)
            return existing

        now = time.time() if now is None else now
        staging = self.root / "tmp" / f"{item_id}.{uuid.uuid4().hex}"
        (staging / "files").mkdir(DIR_MODE, parents=True)
        try:
            records = []
            for info, digest in zip(infos, digests, strict=True):
                name = f"{info.sop_instance_uid}.dcm"
                target = staging / "files" / name
                shutil.copyfile(info.path, target)
                fsync_file(target)
                records.append(OutboxFile(name=name, sop_instance_uid=info.sop_instance_uid,
                                          sop_class_uid=info.sop_class_uid,
                                          transfer_syntax_uid=info.transfer_syntax_uid,
                                          size=target.stat().st_size, sha256=digest))
            fsync_dir(staging / "files")
            dests = {str(d): DestinationState(destination=d, next_attempt_at=now) for d in destinations}
            item = OutboxItem(item_id=item_id, study_key=study_key, created_at=now,
                              horizon_at=now + self.policy.horizon, files=records, destinations=dests)
            write_json_atomic(staging / ITEM_JSON, item.model_dump(mode="json"))
            try:
                os.rename(staging, self.item_dir(item_id))
            except OSError as exc:  # another process put the same item a moment ago
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                shutil.rmtree(staging, ignore_errors=True)
                found = self.find(item_id)
                if found is None:
                    raise
                return found
            fsync_dir(self.root / ACTIVE)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("outbox item %s (study %s): %d file(s) for %s", item_id, study_key, len(records),
                 ", ".join(keys))
        return item

    def put_datasets(self, datasets: Iterable[Any], destinations: Sequence[Destination], **kwargs: Any
                     ) -> OutboxItem:
        """Like :meth:`put` for pydicom Datasets (e.g. RTSTRUCTs just built), written in DICOM file format."""
        from pydicom import dcmwrite

        scratch = self.root / "tmp" / f"ds.{uuid.uuid4().hex}"
        scratch.mkdir(DIR_MODE, parents=True)
        try:
            paths = []
            for n, ds in enumerate(datasets):
                path = scratch / f"{n:05d}.dcm"
                dcmwrite(path, ds, enforce_file_format=True)
                paths.append(path)
            return self.put(paths, destinations, **kwargs)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # ---------------------------------------------------------------- read
    def find(self, item_id: str) -> OutboxItem | None:
        """The item, active or finished; None when unknown."""
        check_item_id(item_id)
        for path in (self.root / ACTIVE / item_id / ITEM_JSON, self.root / DONE / item_id / ITEM_JSON):
            try:
                return OutboxItem.model_validate_json(path.read_bytes())
            except FileNotFoundError:
                continue
        return None

    def _find_logged(self, item_id: str) -> OutboxItem | None:
        """``find`` for scans: an unreadable item.json is logged and skipped, not fatal to the scan."""
        try:
            return self.find(item_id)
        except ValueError as exc:
            log.error("outbox item %s: unreadable item.json, skipped: %s", item_id, exc)
            return None

    def get(self, item_id: str) -> OutboxItem:
        item = self.find(item_id)
        if item is None:
            raise KeyError(f"no outbox item {item_id!r}")
        return item

    def item_ids(self) -> list[str]:
        """Active (not finished) items."""
        return sorted(p.name for p in (self.root / ACTIVE).iterdir()
                      if p.is_dir() and (p / ITEM_JSON).exists())

    def active_items(self, study_key: str | None = None) -> list[OutboxItem]:
        """Active items (of ``study_key`` when given); unreadable ones are logged and skipped."""
        items = (self._find_logged(i) for i in self.item_ids())
        return [it for it in items if it is not None and (study_key is None or it.study_key == study_key)]

    def due(self, now: float | None = None) -> list[tuple[str, str]]:
        """``(item_id, destination key)`` pairs whose next attempt is due at ``now``."""
        now = time.time() if now is None else now
        out: list[tuple[str, str]] = []
        for item_id in self.item_ids():
            item = self._find_logged(item_id)
            if item is not None:
                out.extend((item_id, key) for key in item.due(now))
        return out

    def dead_letters(self) -> list[Path]:
        """Every ``reason.json`` under ``dead/``."""
        return sorted((self.root / DEAD).glob(f"*/*/{DEAD_REASON}"))

    # ---------------------------------------------------------------- update
    def _update(self, item_id: str, change: Callable[[OutboxItem], bool]) -> OutboxItem | None:
        """Apply ``change`` under the item lock; write when it returns True. None once finished."""
        with self._lock(item_id) as locked:
            if not locked:
                return None
            path = self.item_dir(item_id) / ITEM_JSON
            try:
                item = OutboxItem.model_validate_json(path.read_bytes())
            except FileNotFoundError:
                return None
            if change(item):
                write_json_atomic(path, item.model_dump(mode="json"))
            if item.finished:
                self._finish(item)
            return item

    def record(self, item_id: str, key: str, outcome: Outcome, now: float | None = None) -> DestinationState:
        """Apply one attempt's outcome to ``key``'s state: delivered, dead, or the next retry time."""
        now = time.time() if now is None else now
        result: dict[str, DestinationState] = {}

        def change(item: OutboxItem) -> bool:
            st = item.destinations[key]
            if st.status != "pending":
                result["st"] = st
                return False
            st.attempts += 1
            st.last_attempt_at = now
            st.delivered = sorted(set(st.delivered) | outcome.delivered_uids())
            missing = {f.sop_instance_uid for f in item.files} - set(st.delivered)
            if not missing:
                st.status, st.delivered_at, st.last_error = "delivered", now, None
                log.info("outbox item %s delivered to %s (attempt %d)", item_id, key, st.attempts)
            elif outcome.permanent:
                st.last_error = outcome.summary()
                dead_letter(self.root, item, key, f"permanent failure: {st.last_error}", now)
            elif now >= item.horizon_at:
                st.last_error = outcome.summary()
                hours = (item.horizon_at - item.created_at) / 3600.0
                dead_letter(self.root, item, key, f"gave up after {st.attempts} attempt(s) over the "
                                                  f"{hours:g} h horizon; last error: {st.last_error}", now)
            else:
                st.last_error = outcome.summary()
                st.next_attempt_at = min(now + self.policy.delay(st.attempts), item.horizon_at)
                log.warning("outbox item %s to %s: attempt %d failed (%s); next attempt at %s", item_id, key,
                            st.attempts, st.last_error, iso(st.next_attempt_at))
            result["st"] = st
            return True

        if self._update(item_id, change) is None:
            return self.get(item_id).destinations[key]
        return result["st"]

    def mark_enqueued(self, item_id: str, for_time: float, now: float | None = None) -> bool:
        """Note that a broker message will run the item at ``for_time``. False if one was already noted."""
        now = time.time() if now is None else now
        marked: list[bool] = []

        def change(item: OutboxItem) -> bool:
            if item.enqueued_for == for_time:
                return False
            item.enqueued_for, item.enqueued_at = for_time, now
            marked.append(True)
            return True

        self._update(item_id, change)
        return bool(marked)

    def sweep(self, enqueue: Callable[[str], Any], now: float | None = None, grace: float = 300.0
              ) -> list[str]:
        """Enqueue every item with a due destination whose message is not already on its way.

        Call it periodically (and at start-up) from the service loop or a beat task: it is what makes the
        schedule survive a restart. Idempotent: an item whose message was sent for its current due time is
        skipped until ``grace`` seconds past that time (then it is presumed lost and sent again; a duplicate
        is harmless). Returns the item ids enqueued.
        """
        now = time.time() if now is None else now
        sent = []
        for item_id in self.item_ids():
            item = self._find_logged(item_id)
            if item is None:
                continue
            if item.finished:  # a crash between recording the last state and moving it to done/
                self._update(item_id, lambda it: False)
                continue
            nxt = item.next_due()
            if nxt is None or nxt > now:
                continue
            if item.enqueued_for == nxt and now < max(nxt, item.enqueued_at or 0) + grace:
                continue
            self.mark_enqueued(item_id, nxt, now)
            try:
                enqueue(item_id)
            except Exception as exc:  # broker down: try again on the next sweep
                log.error("outbox sweep: could not enqueue item %s: %s", item_id, exc)
                self._update(item_id, functools.partial(_clear_enqueued, for_time=nxt))
                continue
            sent.append(item_id)
        if sent:
            log.info("outbox sweep enqueued %d item(s)", len(sent))
        return sent

    # ---------------------------------------------------------------- terminal states
    def _finish(self, item: OutboxItem) -> None:
        """Every destination is delivered or dead: keep item.json under done/, drop the files."""
        if item.finished_at is None:
            item.finished_at = time.time()
        src = self.item_dir(item.item_id)
        write_json_atomic(src / ITEM_JSON, item.model_dump(mode="json"))
        target = self.root / DONE / item.item_id
        if target.exists():
            shutil.rmtree(target)
        os.rename(src, target)
        fsync_dir(self.root / DONE)
        fsync_dir(self.root / ACTIVE)
        shutil.rmtree(target / "files", ignore_errors=True)
        for lock in target.glob(".lock*"):
            lock.unlink(missing_ok=True)
        log.info("outbox item %s finished: %s", item.item_id,
                 ", ".join(f"{k}={d.status}" for k, d in sorted(item.destinations.items())))


def _clear_enqueued(item: OutboxItem, for_time: float) -> bool:
    if item.enqueued_for != for_time:
        return False
    item.enqueued_for = item.enqueued_at = None
    return True


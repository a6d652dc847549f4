"""Retention: purge finished work by age and by disk watermark, so the node keeps accepting studies.

What a purge removes, for one StudyInstanceUID (the spool's unit): its spool instances, and for each of its
study keys the study directory (manifest, results: RTSTRUCTs, qa.json) and the outbox records of its items
(``done/`` final records and ``dead/`` dead letters). The node then forgets the study: a PACS that sends it
again starts afresh.

What may be purged (:func:`candidates`), and nothing else:

* a StudyInstanceUID whose every manifest is finished (``service.store.manifest.PURGEABLE``: ``done``,
``failed``),
  with no outbox item still delivering, and no instance received for ``quiet_period`` seconds; its age counts
  from the later of "finished" and its last instance;
* spooled instances that never formed a 4D set (no manifest: a plain CT, a lone AVG) once their last
  instance is ``ignored_after`` seconds old.

``collecting``, ``held``, ``complete``, ``queued``, ``processing`` and ``exporting`` studies are never
purged: each state is re-checked under the manifest lock just before anything is removed, and spool rows
are removed only if received before the decision (a study arriving meanwhile keeps its new instances).

Rules (:func:`enforce`, run by ``itvnode serve`` every ``retention_interval`` s, and by the spool itself when
a store would leave less than ``min_free_bytes`` free):

* by age: candidates older than ``max_age`` (``retention_days``);
* by watermark: while free space (:meth:`service.store.spool.Spool.free_bytes`: the file system's, or what
  ``spool_max_bytes`` leaves) is below ``free_bytes`` (``retention_free_bytes``), the oldest candidate goes
  first, whatever its age.

Every purge is logged (study keys, bytes freed, why) and counted in ``retention.json`` under the data dir,
which ``/metrics`` exports as ``itvnode_purged_studies_total`` / ``itvnode_purged_bytes_total`` by reason
(``age``, ``watermark``, ``admin``: ``itvnode purge``, ``delete``: ``itvnode delete``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.store.durable import FILE_MODE, write_json_atomic
from service.store.layout import DataLayout
from service.store.manifest import (
    Manifest,
    iso_epoch,
    iter_manifests,
    load_manifest,
    manifest_lock,
)
from service.store.state import PURGEABLE

if TYPE_CHECKING:
    from service.store.spool import Spool

log = logging.getLogger(__name__)

REASONS = ("age", "watermark", "admin", "delete")


@dataclass(frozen=True)
class RetentionPolicy:
    max_age: float | None = 7 * 86400.0  # seconds after finishing; None: never by age
    free_bytes: int = 0  # watermark: purge oldest finished work while free space is below this
    ignored_after: float = 86400.0
    quiet_period: float = 60.0

    @classmethod
    def from_settings(cls, settings: Any) -> RetentionPolicy:
        days = settings.retention_days
        return cls(max_age=None if days is None else days * 86400.0, free_bytes=settings.watermark_bytes,
                   ignored_after=settings.retention_ignored_after, quiet_period=settings.quiet_period)


@dataclass
class Purgeable:
    """One StudyInstanceUID that may be purged: ``keys`` its study keys (none: never formed a 4D set)."""

    study_uid: str
    keys: list[str]
    since: float  # epoch: finished (or last instance, if later)
    states: list[str] = field(default_factory=list)
    last_received: float | None = None
    frame_of_reference_uid: str | None = None  # only this frame of reference's instances (itvnode delete)

    def label(self) -> str:
        return ", ".join(self.keys) if self.keys else "spooled series without a 4D set"


def finished_at(m: Manifest) -> float | None:
    """When ``m`` entered its current (finished) state."""
    at = None
    for h in reversed(m.history):
        if h.state != m.state:
            break
        at = h.at
    return iso_epoch(at or m.updated_at)


def _active_outbox_keys(layout: DataLayout) -> set[str]:
    """Study keys with an outbox item still delivering (``items/``)."""
    from service.store.outbox import Outbox

    return {str(it.study_key) for it in Outbox(layout.outbox).active_items() if it.study_key}


def candidates(layout: DataLayout, spool: Spool, policy: RetentionPolicy,
               now: float | None = None) -> list[Purgeable]:
    """Everything that may be purged now, oldest first (see the module docstring)."""
    now = time.time() if now is None else now
    by_uid: dict[str, list[Manifest]] = {}
    for _path, m in iter_manifests(layout.root):
        by_uid.setdefault(m.study_instance_uid, []).append(m)
    active = _active_outbox_keys(layout)
    spooled = set(spool.study_uids())
    out = []
    for uid, ms in by_uid.items():
        if any(m.state not in PURGEABLE for m in ms) or any(m.study_key in active for m in ms):
            continue
        ends = [finished_at(m) for m in ms]
        if any(e is None for e in ends):
            continue
        last = spool.last_received(uid) if uid in spooled else None
        if last is not None and now - last < policy.quiet_period:
            continue  # arriving right now
        since = max([e for e in ends if e is not None] + ([last] if last is not None else []))
        out.append(Purgeable(uid, sorted(m.study_key for m in ms), since, [m.state for m in ms], last))
    for uid in spooled - set(by_uid):
        last = spool.last_received(uid)
        if last is None or now - last < max(policy.ignored_after, policy.quiet_period):
            continue
        out.append(Purgeable(uid, [], last, [], last))
    out.sort(key=lambda p: p.since)
    return out


def _du(path: Path) -> int:
    total = 0
    if path.is_file():
        return path.stat().st_size
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _outbox_records(layout: DataLayout, keys: set[str]) -> list[Path]:
    """Finished outbox items (``done/<id>``) and dead letters (``dead/<id>``) of these study keys."""
    found = []
    for path in (layout.outbox / "done").glob("*/item.json"):
        try:
            key = json.loads(path.read_bytes()).get("study_key")
        except (OSError, ValueError):
            continue
        if key in keys:
            found.append(path.parent)
            dead = layout.outbox / "dead" / path.parent.name
            if dead.is_dir():
                found.append(dead)
    return found


def purge(layout: DataLayout, spool: Spool, unit: Purgeable, reason: str, *, dry_run: bool = False,
          states: frozenset[str] = PURGEABLE) -> int | None:
    """Remove ``unit``; returns the bytes freed (an estimate when ``dry_run``), or None when a study moved
    out of ``states`` meanwhile (then nothing of it is removed)."""
    # only what had arrived when the unit was chosen: an instance arriving since is kept
    decided = time.time() if unit.last_received is None else unit.last_received
    with contextlib.ExitStack() as stack:
        if unit.keys and not any(layout.manifest(k).is_file() for k in unit.keys):
            return None  # purged meanwhile by another pass
        for key in unit.keys:  # hold every manifest of the study while its files go
            path = layout.manifest(key)
            if not path.is_file():
                continue
            stack.enter_context(manifest_lock(path))
            try:
                state = load_manifest(path).state
            except (OSError, ValueError):
                return None
            if state not in states:
                log.info("purge: study key %s is %s now; not purged", key, state)
                return None
        records = _outbox_records(layout, set(unit.keys))
        dirs = [layout.study_dir(k) for k in unit.keys]
        if dry_run:
            spool_bytes = sum(p.stat().st_size for _m, p in spool.instances(unit.study_uid) if p.is_file())
            return spool_bytes + sum(_du(d) for d in [*dirs, *records])
        _n, freed = spool.remove_instances(unit.study_uid, received_before=decided,
                                           frame_of_reference_uid=unit.frame_of_reference_uid)
        for d in [*records, *dirs]:
            size = _du(d)
            keep_lock = d in dirs
            for child in list(d.iterdir()) if d.is_dir() else []:
                if keep_lock and child.name == "manifest.lock":
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            freed += size
    for d in [*records, *dirs]:  # the lock files last, once no lock is held
        shutil.rmtree(d, ignore_errors=True)
    RetentionStats(layout).add(reason, 1, freed)
    log.warning("purged study key(s) %s (%s): %d bytes freed (%s)", unit.label(),
                "/".join(unit.states) or "no 4D set", freed, reason)
    return freed


def enforce(layout: DataLayout, spool: Spool, policy: RetentionPolicy, now: float | None = None,
            needed: int = 0) -> list[tuple[Purgeable, int, str]]:
    """One retention pass: by age, then by watermark until ``free_bytes + needed`` are free."""
    now = time.time() if now is None else now
    done: list[tuple[Purgeable, int, str]] = []
    units = candidates(layout, spool, policy, now)
    left = []
    for unit in units:
        if policy.max_age is not None and now - unit.since >= policy.max_age:
            freed = purge(layout, spool, unit, "age")
            if freed is not None:
                done.append((unit, freed, "age"))
                continue
        left.append(unit)
    for unit in left:
        free = spool.free_bytes()
        if free >= policy.free_bytes + needed:
            break
        freed = purge(layout, spool, unit, "watermark")
        if freed is not None:
            done.append((unit, freed, "watermark"))
    free = spool.free_bytes()
    if free < policy.free_bytes + needed:
        log.warning("retention: %d bytes free, below the %d-byte watermark; nothing more finished to purge",
                    free, policy.free_bytes)
    return done


class RetentionStats:
    """Totals of purges by reason in ``retention.json`` (read-modify-write under a flock)."""

    def __init__(self, layout: DataLayout) -> None:
        self.path = layout.retention_stats

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self) -> dict[str, dict[str, int]]:
        try:
            data = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            data = {}
        return {k: {r: int((data.get(k) or {}).get(r, 0)) for r in REASONS} for k in ("studies", "bytes")}

    def add(self, reason: str, studies: int, freed: int) -> None:
        try:
            with self._locked():
                data = self.read()
                data["studies"][reason] += studies
                data["bytes"][reason] += freed
                write_json_atomic(self.path, data)
        except OSError as exc:  # a full disk must not stop the purge that frees it
            log.error("retention: could not count the purge in %s: %s", self.path, exc)


class RetentionLoop:
    """``itvnode serve``'s retention: every ``interval`` s, and on the spool's demand when space is short."""

    def __init__(self, layout: DataLayout, spool: Spool, policy: RetentionPolicy, interval: float) -> None:
        self.layout, self.spool, self.policy, self.interval = layout, spool, policy, interval
        self._lock = threading.Lock()

    def on_low_space(self, needed: int) -> None:
        with self._lock:
            enforce(self.layout, self.spool, self.policy, needed=needed)

    def run(self, stop_event: Any) -> None:
        log.info("retention started (every %.0f s; age %s; watermark %d bytes free)", self.interval,
                 "off" if self.policy.max_age is None else f"{self.policy.max_age / 86400:g} days",
                 self.policy.free_bytes)
        while True:
            try:
                with self._lock:
                    enforce(self.layout, self.spool, self.policy)
            except Exception:
                log.exception("retention pass failed")
            if stop_event.wait(self.interval):
                return

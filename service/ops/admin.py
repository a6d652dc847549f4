"""Admin actions on studies, through their manifests only: they work whether the node runs or not.

A STUDY argument is a study key (16 hex digits) or a StudyInstanceUID (which may name several study keys,
one per frame of reference). Each action is a manifest transition under the manifest lock and is safe to
repeat; the running assembler notices the changed manifest (``service.intake.assembler``) and a stopped node
acts on it when it starts.

``release``: a ``held`` study becomes ``complete`` (reason "released by admin: ...") and records the release
(time, the hold reason, the content's fingerprint) in ``manifest.released``. The assembler then queues it; the
pipeline says in qa.json, the RTSTRUCT and ``itvnode status`` what the ITV was built from ("3 of 10 phases").
The release holds for the content it was given on: instances arriving later are assessed again.

``retry``: a ``failed`` study becomes ``complete`` ("retry by admin"); the assembler queues it and the worker
computes it again (its retry count starts afresh). Its spooled instances must still be there.

``resend [--to AE@host:port]``: the kept result (``done``, ``failed`` or ``exporting`` with RTSTRUCT files)
goes into a new outbox item for the configured destinations, or for the one given; the study is ``exporting``
until that delivery ends. The export worker's outbox sweep delivers it (at once when ``enqueue_export`` is
given). A resend while the same delivery is still pending returns that delivery instead of a second one.

``delete``: everything of the study key goes now (spool instances of its frame of reference, results,
manifest, outbox records and dead letters, pending outbox items), whatever its state except ``processing``
(a worker reads it: wait for it to end). Deleting an unknown study changes nothing and succeeds.

``purge [--older-than DAYS] [--dry-run]``: the retention age rule on demand (service.ops.retention): every
finished study older than DAYS (default ``retention_days``), nothing unfinished.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.store.layout import DataLayout
from service.store.manifest import (
    Manifest,
    Release,
    iter_manifests,
    load_manifest,
    manifest_lock,
    manifest_path,
    save_manifest,
    set_state,
    utcnow_iso,
)
from service.store.state import FINISHED, STATES, StudyState

if TYPE_CHECKING:
    from service.ops.retention import RetentionPolicy
    from service.setting_values import Destination

log = logging.getLogger(__name__)

_KEY_LEN = 16


@dataclass(frozen=True)
class AdminResult:
    """Outcome for one study key: ``ok`` False when the action could not apply (the message says why)."""

    study_key: str | None
    ok: bool
    changed: bool
    message: str


def resolve_study(data_dir: Path, study: str) -> list[Path]:
    """Manifest paths named by ``study`` (a study key or a StudyInstanceUID); empty when unknown."""
    study = study.strip()
    if len(study) == _KEY_LEN and all(c in "0123456789abcdef" for c in study.lower()):
        path = manifest_path(Path(data_dir), study.lower())
        if path.is_file():
            return [path]
    return [path for path, m in iter_manifests(Path(data_dir)) if m.study_instance_uid == study]


def release_study(data_dir: Path, study: str) -> list[AdminResult]:
    """Release every held study key ``study`` names (see the module docstring)."""
    paths = resolve_study(data_dir, study)
    if not paths:
        return [AdminResult(None, False, False, f"no study {study!r} under {data_dir}")]
    return [_release_one(path) for path in paths]


def _release_one(path: Path) -> AdminResult:
    with manifest_lock(path):
        m = load_manifest(path)
        result = _release(m)
        if result.changed:
            save_manifest(m, path)
    return result


def _release(m: Manifest) -> AdminResult:
    """The transition itself, on a manifest read under its lock (``changed``: it must be saved)."""
    key = m.study_key
    if m.state == StudyState.HELD:
        if not m.phases:
            return AdminResult(key, False, False, f"study {key} is held with no phases: {m.reason}")
        held_reason = m.reason
        m.released = Release(at=utcnow_iso(), held_reason=held_reason, fingerprint=m.fingerprint)
        set_state(m, StudyState.COMPLETE, f"released by admin (was held: {held_reason})"[:2000])
        log.warning("study key %s released by admin; was held: %s", key, held_reason)
        what = m.cycle.summary() if m.cycle else f"{len(m.phases)} phases"
        return AdminResult(key, True, True, f"study {key} released ({what}); the node queues it")
    if m.released is not None and m.released.fingerprint == m.fingerprint:
        return AdminResult(key, True, False, f"study {key} already released; now {m.state}")
    return AdminResult(key, False, False, f"study {key} is {m.state}, not held: nothing to release")


def _each(data_dir: Path, study: str, fn: Callable[[Path], AdminResult], *,
          unknown_ok: bool = False) -> list[AdminResult]:
    paths = resolve_study(data_dir, study)
    if not paths:
        return [AdminResult(None, unknown_ok, False, f"no study {study!r} under {data_dir}"
                                                     + (": nothing to do" if unknown_ok else ""))]
    return [fn(path) for path in paths]


def _inputs_missing(data_dir: Path, m: Manifest) -> int:
    return sum(1 for p in m.phases for f in p.files if not (Path(data_dir) / f).is_file())


def retry_study(data_dir: Path, study: str) -> list[AdminResult]:
    """Run every failed study key ``study`` names again (see the module docstring)."""
    return _each(data_dir, study, lambda path: _retry_one(Path(data_dir), path))


def _retry_one(data_dir: Path, path: Path) -> AdminResult:
    with manifest_lock(path):
        m = load_manifest(path)
        key = m.study_key
        if m.state != StudyState.FAILED:
            last = m.history[-1].reason if m.history else None
            retried = (last or "").startswith("retry by admin")
            if retried and m.state in (StudyState.COMPLETE, StudyState.QUEUED, StudyState.PROCESSING):
                return AdminResult(key, True, False, f"study {key} already retried; now {m.state}")
            hint = {StudyState.HELD: "itvnode release", StudyState.DONE: "itvnode resend"}.get(m.state)
            return AdminResult(key, False, False, f"study {key} is {m.state}, not failed: nothing to retry"
                                                  + (f" (see {hint})" if hint else ""))
        missing = _inputs_missing(data_dir, m)
        if missing or not m.phases:
            return AdminResult(key, False, False, f"study {key}: {missing} input file(s) are gone (purged?); "
                                                  "send the study again from the PACS")
        was = m.reason
        set_state(m, StudyState.COMPLETE, f"retry by admin (was failed: {was})"[:2000])
        m.results.pop("retry_at", None)
        save_manifest(m, path)
    log.warning("study key %s retried by admin; was failed: %s", key, was)
    return AdminResult(key, True, True, f"study {key} will be processed again; the node queues it")


def resend_study(data_dir: Path, study: str, destinations: Sequence[Destination], *,
                 enqueue_export: Callable[[str], object] | None = None) -> list[AdminResult]:
    """Send the kept result of every study key ``study`` names again to ``destinations``."""
    if not destinations:
        return [AdminResult(None, False, False,
                            "no destination: configure ITVNODE_DESTINATIONS or pass --to")]
    return _each(data_dir, study,
                 lambda path: _resend_one(Path(data_dir), path, destinations, enqueue_export))


def _resend_one(data_dir: Path, path: Path, destinations: Sequence[Destination],
                enqueue_export: Callable[[str], object] | None) -> AdminResult:
    from service.store.outbox import Outbox

    outbox = Outbox(DataLayout(data_dir).outbox)
    with manifest_lock(path):
        m = load_manifest(path)
        key = m.study_key
        files = [data_dir / f for f in m.results.get("files") or []]
        if m.state not in (*FINISHED, StudyState.EXPORTING) or not files:
            return AdminResult(key, False, False, f"study {key} is {m.state} with no kept result: "
                                                  "nothing to resend")
        if not all(f.is_file() for f in files):
            return AdminResult(key, False, False, f"study {key}: its result files are gone (purged?)")
        item = outbox.put(files, list(destinations), study_key=key)
        changed = True
        if item.finished:  # delivered before: a new item (same SOP Instance UIDs: receivers replace)
            item = outbox.put(files, list(destinations), study_key=key,
                              item_id=f"{item.item_id[:15]}-{uuid.uuid4().hex[:8]}")
        elif item.item_id in (m.results.get("items") or []) and m.state == StudyState.EXPORTING:
            changed = False  # the same delivery is still pending: a repeat changes nothing
        to = ", ".join(str(d) for d in destinations)
        if changed:
            set_state(m, StudyState.EXPORTING, f"re-send by admin to {to}"[:2000])
            m.results["items"] = [item.item_id]
            save_manifest(m, path)
    if enqueue_export is not None:
        try:
            enqueue_export(item.item_id)
        except Exception as exc:  # the export worker's outbox sweep sends it
            log.warning("study key %s: could not enqueue the re-send now (%s); the outbox sweep will", key,
                        exc)
    if not changed:
        return AdminResult(key, True, False, f"study {key}: re-send to {to} already pending "
                                             f"(outbox item {item.item_id})")
    log.warning("study key %s: re-send by admin to %s (outbox item %s)", key, to, item.item_id)
    return AdminResult(key, True, True, f"study {key}: re-sending {len(files)} file(s) to {to} "
                                        f"(outbox item {item.item_id})")


def delete_study(data_dir: Path, study: str) -> list[AdminResult]:
    """Delete everything of every study key ``study`` names (see the module docstring)."""
    return _each(data_dir, study, lambda path: _delete_one(Path(data_dir), path), unknown_ok=True)


def _delete_one(data_dir: Path, path: Path) -> AdminResult:
    from service.ops.retention import Purgeable, purge
    from service.store.outbox import Outbox
    from service.store.spool import Spool

    layout = DataLayout(data_dir)
    m = load_manifest(path)
    key = m.study_key
    if m.state == StudyState.PROCESSING:
        return AdminResult(key, False, False, f"study {key} is processing: a worker reads it; delete it once "
                                              "it is done or failed")
    spool = Spool(layout.spool)
    try:
        unit = Purgeable(m.study_instance_uid, [key], time.time(), [m.state],
                         frame_of_reference_uid=m.frame_of_reference_uid or None)
        freed = purge(layout, spool, unit, "delete", states=frozenset(STATES) - {StudyState.PROCESSING})
    finally:
        spool.close()
    if freed is None:
        return AdminResult(key, False, False, f"study {key} changed state meanwhile; not deleted")
    outbox = Outbox(layout.outbox)
    for item in outbox.active_items(key):  # deliveries still pending: stop them
        shutil.rmtree(outbox.item_dir(item.item_id), ignore_errors=True)
    return AdminResult(key, True, True, f"study {key} deleted ({freed} bytes freed)")


def purge_studies(data_dir: Path, policy: RetentionPolicy, *, older_than_days: float | None = None,
                  dry_run: bool = False) -> list[AdminResult]:
    """Purge every finished study older than ``older_than_days`` (default: ``policy.max_age``)."""
    from service.ops.retention import candidates, purge
    from service.store.spool import Spool

    layout = DataLayout(data_dir)
    age = policy.max_age if older_than_days is None else older_than_days * 86400.0
    if age is None:
        return [AdminResult(None, False, False, "retention_days is off: pass --older-than DAYS")]
    spool = Spool(layout.spool)
    out = []
    try:
        now = time.time()
        for unit in candidates(layout, spool, policy, now):
            if now - unit.since < age:
                continue
            freed = purge(layout, spool, unit, "admin", dry_run=dry_run)
            label = unit.label()
            keys: list[str | None] = list(unit.keys) or [None]
            for key in keys:
                if freed is None:
                    out.append(AdminResult(key, True, False, f"{label}: changed state meanwhile; kept"))
                elif dry_run:
                    what = f"{'/'.join(unit.states) or 'no 4D set'}, {(now - unit.since) / 86400:.1f} days"
                    out.append(AdminResult(key, True, False, f"would purge {label} ({what}): {freed} bytes"))
                else:
                    out.append(AdminResult(key, True, True, f"purged {label}: {freed} bytes freed"))
                    freed = 0  # counted once per study
    finally:
        spool.close()
    if not out:
        out.append(AdminResult(None, True, False, f"nothing finished older than {age / 86400:g} days"))
    return out

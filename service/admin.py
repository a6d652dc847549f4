"""Admin actions on studies, through their manifests only: they work whether the node runs or not.

A STUDY argument is a study key (16 hex digits) or a StudyInstanceUID (which may name several study keys,
one per frame of reference). Each action is a manifest transition under the manifest lock and is safe to
repeat; the running assembler notices the changed manifest (``service.assembler``) and a stopped node acts on
it when it starts.

``release``: a ``held`` study becomes ``complete`` (reason "released by admin: ...") and records the release
(time, the hold reason, the content's fingerprint) in ``manifest.released``. The assembler then queues it; the
pipeline says in qa.json, the RTSTRUCT and ``itvnode status`` what the ITV was built from ("3 of 10 phases").
The release holds for the content it was given on: instances arriving later are assessed again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from service.manifest import (
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
    if m.state == "held":
        if not m.phases:
            return AdminResult(key, False, False, f"study {key} is held with no phases: {m.reason}")
        held_reason = m.reason
        m.released = Release(at=utcnow_iso(), held_reason=held_reason, fingerprint=m.fingerprint)
        set_state(m, "complete", f"released by admin (was held: {held_reason})"[:2000])
        log.warning("study key %s released by admin; was held: %s", key, held_reason)
        what = m.cycle.summary() if m.cycle else f"{len(m.phases)} phases"
        return AdminResult(key, True, True, f"study {key} released ({what}); the node queues it")
    if m.released is not None and m.released.fingerprint == m.fingerprint:
        return AdminResult(key, True, False, f"study {key} already released; now {m.state}")
    return AdminResult(key, False, False, f"study {key} is {m.state}, not held: nothing to release")

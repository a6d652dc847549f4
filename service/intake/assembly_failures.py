"""Groups whose assembly raised: logged once, held with the reason, retried on new instances or after a
backoff (doubling from 30 s to 1 h), so other studies go on and the log does not fill with one traceback per
poll."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from service.store.manifest import (
    Manifest,
    load_manifest,
    manifest_lock,
    manifest_path,
    save_manifest,
    set_state,
)
from service.store.state import IN_FLIGHT, StudyState

log = logging.getLogger(__name__)


@dataclass
class _Broken:
    """A group whose assembly raised: logged once, held, retried only on new instances or after ``delay``."""

    signature: str
    last: float | None
    retry_at: float
    delay: float


class BrokenGroups:
    """The failures being backed off, by study key, for the manifests under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._groups: dict[str, _Broken] = {}

    def waiting(self, key: str, last: float | None, now: float) -> bool:
        """True while ``key`` failed on the same instances (``last``) and its backoff is not over."""
        broken = self._groups.get(key)
        return broken is not None and broken.last == last and now < broken.retry_at

    def cleared(self, key: str) -> None:
        """``key`` was assembled without error."""
        self._groups.pop(key, None)

    def failed(self, study_uid: str, for_uid: str, key: str, last: float | None, now: float,
               exc: Exception) -> None:
        """One group's assembly raised: log it once (with its key), hold the study with the reason and back
        off (doubling from 30 s to 1 h; new instances retry at once), so other studies go on and the log
        does not fill with the same traceback every poll."""
        signature = f"{type(exc).__name__}: {exc}"[:300]
        broken = self._groups.get(key)
        delay = 30.0 if broken is None or broken.last != last else min(3600.0, broken.delay * 2)
        self._groups[key] = _Broken(signature, last, now + delay, delay)
        if broken is not None and broken.signature == signature:
            log.debug("study key %s: assembly still failing (%s); next try in %.0f s", key, signature, delay)
            return
        log.error("study key %s: assembly failed; held, retried on new instances or in %.0f s", key, delay,
                  exc_info=exc)
        try:
            self._hold(study_uid, for_uid, key, f"assembly failed: {signature}")
        except Exception as exc2:  # e.g. the disk: the log line above already names the study
            log.error("study key %s: could not record the failure in the manifest: %s", key, exc2)

    def _hold(self, study_uid: str, for_uid: str, key: str, reason: str) -> None:
        path = manifest_path(self.data_dir, key)
        with manifest_lock(path):
            m: Manifest | None = None
            if path.exists():
                try:
                    m = load_manifest(path)
                except (OSError, ValueError) as exc:
                    aside = path.with_name(f"manifest.unreadable-{time.strftime('%Y%m%dT%H%M%S')}.json")
                    os.replace(path, aside)
                    log.error("study key %s: unreadable manifest (%s) moved to %s", key, type(exc).__name__,
                              aside.name)
            if m is not None and m.state in IN_FLIGHT:
                return  # a job owns the study; it records its own outcome
            if m is None:
                m = Manifest(study_key=key, study_instance_uid=study_uid, frame_of_reference_uid=for_uid)
            if m.state == StudyState.HELD and m.reason == reason:
                return
            set_state(m, StudyState.HELD, reason)
            save_manifest(m, path)

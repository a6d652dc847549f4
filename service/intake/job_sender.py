"""The assembler's enqueue: ``complete`` -> message -> ``queued``, at least once, with backoff while the
broker fails.

The manifest is saved ``complete`` before the message is sent; the state becomes ``queued`` afterwards, only
if nobody moved it on meanwhile. A broker failure leaves ``complete`` with the reason and is retried after
``retry_interval`` seconds, doubling per consecutive failure up to 60 s; while the broker is failing no other
study tries either, so an unreachable broker (connect timeouts) does not stall the loop for every study.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from service.store.manifest import Manifest, set_state, update_manifest
from service.store.state import StudyState

log = logging.getLogger(__name__)

Enqueue = Callable[[str], str]  # study_key -> task id; raises on broker failure


class JobSender:
    """Sends segment jobs; one per assembler (the broker backoff is shared by all its studies)."""

    def __init__(self, retry_interval: float = 5.0) -> None:
        self.retry_interval = float(retry_interval)
        self._retry_at = 0.0  # no enqueue before this time (the broker failed)
        self._failures = 0

    def send(self, enqueue: Enqueue | None, path: Path, key: str, now: float) -> bool:
        """Send the job for a ``complete`` manifest; returns True once it is queued (or moved on)."""
        if enqueue is None:
            return False
        if now < self._retry_at:
            return False
        try:
            task_id = enqueue(key)
        except Exception as exc:
            self._failures += 1
            delay = min(60.0, self.retry_interval * 2 ** (self._failures - 1))
            self._retry_at = now + delay
            reason = f"enqueue failed, retrying: {exc}"[:300]
            log.warning("study key %s: %s", key, reason)

            def keep_complete(m: Manifest) -> Manifest:
                if m.state == StudyState.COMPLETE and m.reason != reason:
                    set_state(m, StudyState.COMPLETE, reason)
                return m

            update_manifest(path, keep_complete)
            return False
        self._failures = 0
        self._retry_at = 0.0

        def queued(m: Manifest) -> Manifest:
            m.task_id = m.task_id or task_id
            if m.state == StudyState.COMPLETE:
                set_state(m, StudyState.QUEUED, None)
            return m

        update_manifest(path, queued)
        log.info("study key %s queued as task %s", key, task_id)
        return True

"""Studies whose task is gone: found, re-queued with backoff (bounded), or failed with the reason.

A study can be left in a state whose owner no longer exists:

* ``processing`` after the hard time limit (Celery kills the pool process and acknowledges the message, so
  nothing re-delivers it), after a worker killed with SIGKILL (the embedded broker loses its message, Redis
  would only re-deliver it after the visibility timeout, hours later), or after a result write that failed
  on a full disk (the task could not even record ``failed``);
* ``queued`` after the broker lost the message (Redis without persistence restarted, a broker volume wiped).

Rules (:func:`assess`, pure; thresholds in :class:`ReconcilePolicy`, from settings):

* ``processing`` and no heartbeat for ``heartbeat_timeout`` s: the running segment task touches
  ``studies/<key>/heartbeat`` every ``heartbeat_interval`` s (:class:`Heartbeat`, in ``worker.tasks``), from a
  thread of the process doing the work, so a killed process stops it. A split study (worker.study_split)
  has no running task while its groups wait for a free worker: it is not stuck while the broker holds one
  of its tasks;
* ``processing`` for longer than the hard time limit + ``heartbeat_timeout``: no task can still own it;
* ``queued`` for ``queued_lost_after`` s while the broker holds no ``itvnode.segment_study`` message for it
  (:func:`service.intake.queue.queued_study_keys`); the reconciler acts only when two checks in a row agree,
  so a message a worker has just taken (invisible in the embedded broker) is not mistaken for a lost one.

Action (:class:`Reconciler`, run by ``itvnode serve`` next to the assembler, the process that owns
enqueueing): under the manifest lock, if the study is still as assessed, ``queued`` with the reason and a new
message; the superseded task id is recorded so a late re-delivery of it does nothing. At most
``max_attempts`` re-queues per assembled content (counted from the history, so restarts do not reset it),
each no sooner than ``backoff * 2**(n-1)`` s after the previous one; then ``failed`` with the reason.
Several reconcilers (several SCPs on one data dir) are safe: the second sees the state changed and leaves it.

``/health`` (service.ops.health) reports the studies :func:`find_stuck` finds, and is not healthy while there
are.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from service.intake.queue import HARD_LIMIT_GRACE, queued_study_keys
from service.store.layout import DataLayout
from service.store.manifest import (
    Manifest,
    iso_epoch,
    iter_manifests,
    manifest_path,
    set_state,
    update_manifest,
)
from service.store.state import IN_FLIGHT, StudyState

log = logging.getLogger(__name__)

REASON_PREFIX = "reconcile: "
# a re-queue counts against the bound until the study is assembled again or finishes
_RESET_STATES = frozenset(StudyState) - IN_FLIGHT  # assembled again, or finished


def heartbeat_path(data_dir: Path, study_key: str) -> Path:
    return DataLayout(data_dir).heartbeat(study_key)


@dataclass(frozen=True)
class ReconcilePolicy:
    interval: float = 30.0
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 120.0
    hard_time_limit: float = 4 * 3600.0 + HARD_LIMIT_GRACE  # of the segment task
    queued_lost_after: float = 300.0
    max_attempts: int = 2
    backoff: float = 60.0
    backoff_max: float = 3600.0

    def __post_init__(self) -> None:
        if self.heartbeat_timeout <= 2 * self.heartbeat_interval:
            raise ValueError(f"heartbeat_timeout ({self.heartbeat_timeout} s) must exceed twice "
                             f"heartbeat_interval ({self.heartbeat_interval} s)")
        if min(self.interval, self.heartbeat_interval, self.queued_lost_after, self.hard_time_limit) <= 0:
            raise ValueError("reconcile intervals and thresholds must be positive")
        if self.max_attempts < 0 or self.backoff < 0:
            raise ValueError("reconcile_max_attempts and reconcile_backoff must be >= 0")

    @property
    def deadline(self) -> float:
        """Seconds of ``processing`` after which no task can still own the study."""
        return self.hard_time_limit + self.heartbeat_timeout

    @classmethod
    def from_settings(cls, settings: Any) -> ReconcilePolicy:
        return cls(
            interval=settings.reconcile_interval,
            heartbeat_interval=settings.heartbeat_interval,
            heartbeat_timeout=settings.heartbeat_timeout,
            hard_time_limit=settings.inference_soft_time_limit + settings.time_limit_grace,
            queued_lost_after=settings.queued_lost_after,
            max_attempts=settings.reconcile_max_attempts,
            backoff=settings.reconcile_backoff,
        )


@dataclass(frozen=True)
class Stuck:
    """A study whose task is gone: ``since`` (epoch) is when it entered ``state``."""

    study_key: str
    state: StudyState
    since: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"study_key": self.study_key, "state": self.state, "since": round(self.since, 3),
                "reason": self.reason}


def _entered(m: Manifest) -> float | None:
    """When the manifest entered its current state (the last history entry of that state)."""
    for h in reversed(m.history):
        if h.state == m.state:
            return iso_epoch(h.at)
    return iso_epoch(m.updated_at)


def attempts(m: Manifest) -> tuple[int, float | None]:
    """(re-queues by the reconciler since the study was last assembled or finished, time of the last one)."""
    n, last = 0, None
    for h in reversed(m.history):
        if h.state in _RESET_STATES:
            break
        if h.state == StudyState.QUEUED and (h.reason or "").startswith(REASON_PREFIX):
            n += 1
            last = last if last is not None else iso_epoch(h.at)
    return n, last


RETRY_AT = "retry_at"  # manifest results key: epoch at which a scheduled retry is sent (no message before)


def schedule_retry(m: Manifest, reason: str, policy: ReconcilePolicy, now: float) -> StudyState:
    """A transient failure of ``m``'s task (time limit, model load, disk, broker): ``queued`` with
    ``results.retry_at`` after the backoff (the reconciler sends the message then), or ``failed`` with the
    reason once the retries (shared with the reconciler's re-queues) are used up. Returns the new state."""
    n, _last = attempts(m)
    m.results.pop(RETRY_AT, None)
    if n >= policy.max_attempts:
        set_state(m, StudyState.FAILED,
                  f"{reason}; gave up after {n} retr{'y' if n == 1 else 'ies'}"[:2000])
        return StudyState.FAILED
    wait = min(policy.backoff_max, policy.backoff * 2 ** n)
    m.results[RETRY_AT] = now + wait
    set_state(m, StudyState.QUEUED,
              f"{REASON_PREFIX}{reason}; retry {n + 1} of {policy.max_attempts} in {wait:.0f} s"[:2000])
    return StudyState.QUEUED


def assess(m: Manifest, now: float, policy: ReconcilePolicy, heartbeat: float | None,
           broker_keys: set[str] | None) -> Stuck | None:
    """Whether ``m``'s task is gone (pure: the caller reads the heartbeat mtime and the broker)."""
    since = _entered(m)
    if since is None:
        return None
    if m.state == StudyState.QUEUED and m.results.get(RETRY_AT) is not None:
        return None  # a retry waiting for its time: no message on purpose (Reconciler.send_due_retries)
    if m.state == StudyState.PROCESSING:
        started = m.results.get("started_at")
        started = float(started) if isinstance(started, int | float) else since
        if now - started > policy.deadline:
            return Stuck(m.study_key, m.state, since,
                         f"processing for {now - started:.0f} s, past the hard time limit "
                         f"({policy.hard_time_limit:.0f} s): the task was killed")
        last_sign = max(started, heartbeat or started)
        if m.results.get("split") and broker_keys is not None and m.study_key in broker_keys:
            return None  # a split study whose group or finishing tasks wait in the queue for a free worker
        if now - last_sign > policy.heartbeat_timeout:
            seen = "since it started" if heartbeat is None or heartbeat < started else (
                f"for {now - heartbeat:.0f} s")
            return Stuck(m.study_key, m.state, since,
                         f"no heartbeat from the worker {seen} (timeout {policy.heartbeat_timeout:.0f} s): "
                         "the worker process died or could not finish")
    elif m.state == StudyState.QUEUED and broker_keys is not None:
        if m.study_key not in broker_keys and now - since > policy.queued_lost_after:
            return Stuck(m.study_key, m.state, since,
                         f"queued for {now - since:.0f} s but the broker holds no message for it "
                         "(lost: broker restarted without persistence?)")
    return None


def _heartbeat(data_dir: Path, key: str) -> float | None:
    try:
        return os.stat(heartbeat_path(data_dir, key)).st_mtime
    except OSError:
        return None


def find_stuck(data_dir: Path, policy: ReconcilePolicy, now: float | None = None,
               broker_keys: set[str] | None = None) -> list[Stuck]:
    """Every study whose task is gone (``broker_keys`` None: the ``queued`` rule is not checked)."""
    now = time.time() if now is None else now
    out = []
    for _path, m in iter_manifests(Path(data_dir)):
        if m.state not in (StudyState.PROCESSING, StudyState.QUEUED):
            continue
        found = assess(m, now, policy, _heartbeat(Path(data_dir), m.study_key), broker_keys)
        if found is not None:
            out.append(found)
    return out


class Heartbeat:
    """Touch ``studies/<key>/heartbeat`` every ``interval`` s from a daemon thread while the block runs."""

    def __init__(self, data_dir: Path, study_key: str, interval: float) -> None:
        self.path = heartbeat_path(Path(data_dir), study_key)
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{study_key}", daemon=True)

    def beat(self) -> None:
        if not self.path.parent.is_dir():
            return  # no such study: the task will say so
        try:
            self.path.touch(mode=0o600)  # sets the modification time of an existing file too
        except OSError as exc:  # log and go on: the next beat tries again
            log.warning("heartbeat %s: %s", self.path, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


Enqueue = Callable[[str], str]  # study key -> task id; raises when the broker refuses


class Reconciler:
    """Re-queues or fails stuck studies; :meth:`run_once` is one check (tests drive the clock)."""

    def __init__(self, data_dir: Path, enqueue: Enqueue, policy: ReconcilePolicy, *,
                 broker_url: str | None = None,
                 broker_keys: Callable[[], set[str]] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.enqueue = enqueue
        self.policy = policy
        self._broker_keys = broker_keys or (lambda: queued_study_keys(broker_url, self.data_dir))
        self._lost_seen: dict[str, float] = {}  # study key -> `since` of the queued state seen lost

    def run(self, stop_event: threading.Event) -> None:
        log.info("reconciler started (every %.0f s; heartbeat timeout %.0f s, queued lost after %.0f s, "
                 "%d attempts)", self.policy.interval, self.policy.heartbeat_timeout,
                 self.policy.queued_lost_after, self.policy.max_attempts)
        while not stop_event.wait(self.policy.interval):
            try:
                self.run_once()
            except Exception:
                log.exception("reconciliation failed")

    def run_once(self, now: float | None = None) -> list[tuple[str, StudyState]]:
        """One pass; returns (study key, ``queued``|``failed``) for each study acted on."""
        now = time.time() if now is None else now
        try:
            keys: set[str] | None = self._broker_keys()
        except Exception as exc:  # broker down: the queued rule waits, the processing rules still apply
            log.warning("reconcile: cannot list the broker's messages (%s); queued studies not checked", exc)
            keys = None
        acted = self.send_due_retries(now)
        lost_now: dict[str, float] = {}
        for found in find_stuck(self.data_dir, self.policy, now, keys):
            if found.state == StudyState.QUEUED:
                lost_now[found.study_key] = found.since
                if self._lost_seen.get(found.study_key) != found.since:
                    continue  # confirm on the next pass (a worker may have just taken the message)
            result = self._act(found, now)
            if result:
                acted.append((found.study_key, result))
        self._lost_seen = lost_now
        return acted

    def send_due_retries(self, now: float) -> list[tuple[str, StudyState]]:
        """Send the message of every retry whose time has come (:func:`schedule_retry`)."""
        sent = []
        for path, m in iter_manifests(self.data_dir):
            at = m.results.get(RETRY_AT)
            if m.state != StudyState.QUEUED or not isinstance(at, int | float) or at > now:
                continue
            taken: dict[str, Any] = {}

            def take(mm: Manifest, taken: dict[str, Any] = taken) -> Manifest:
                if mm.state == StudyState.QUEUED and mm.results.get(RETRY_AT) is not None:
                    taken["at"] = mm.results.pop(RETRY_AT)
                    mm.results["task_ids"] = [*(mm.results.get("task_ids") or []),
                                              *([mm.task_id] if mm.task_id else [])]
                return mm

            update_manifest(path, take)
            if "at" not in taken:
                continue
            try:
                task_id = self.enqueue(m.study_key)
            except Exception as exc:  # put the retry back: the next pass tries again
                log.error("study %s: retry could not be queued (%s); trying again", m.study_key, exc)

                def again(mm: Manifest) -> Manifest:
                    if mm.state == StudyState.QUEUED:
                        mm.results[RETRY_AT] = now + self.policy.interval
                    return mm

                update_manifest(path, again)
                continue

            def record(mm: Manifest, task_id: str = task_id) -> Manifest:
                if mm.state == StudyState.QUEUED:
                    mm.task_id = task_id
                return mm

            update_manifest(path, record)
            log.warning("study %s: retry sent as task %s", m.study_key, task_id)
            sent.append((m.study_key, StudyState.QUEUED))
        return sent

    def _act(self, found: Stuck, now: float) -> StudyState | None:
        path = manifest_path(self.data_dir, found.study_key)
        outcome: dict[str, Any] = {}

        def apply(m: Manifest) -> Manifest:
            if m.state != found.state or _entered(m) != found.since:
                return m  # moved on meanwhile (a worker, the assembler, another reconciler)
            n, last = attempts(m)
            if n >= self.policy.max_attempts:
                set_state(m, StudyState.FAILED,
                          f"{REASON_PREFIX}{found.reason}; gave up after {n} re-queue(s)")
                outcome["state"] = StudyState.FAILED
                return m
            wait = min(self.policy.backoff_max, self.policy.backoff * 2 ** (n - 1)) if n else 0.0
            if last is not None and now < last + wait:
                outcome["waiting"] = last + wait - now
                return m
            superseded = [m.task_id] if m.task_id else []
            m.results["task_ids"] = [*(m.results.get("task_ids") or []), *superseded]
            set_state(m, StudyState.QUEUED, f"{REASON_PREFIX}{found.reason}; re-queued "
                                   f"(attempt {n + 1} of {self.policy.max_attempts})")
            outcome["state"] = StudyState.QUEUED
            return m

        try:
            update_manifest(path, apply)
        except OSError as exc:  # e.g. the disk is still full
            log.error("study %s: %s; cannot record it: %s", found.study_key, found.reason, exc)
            return None
        state = outcome.get("state")
        if state == StudyState.FAILED:
            log.error("study %s FAILED: %s (gave up after %d re-queues)", found.study_key, found.reason,
                      self.policy.max_attempts)
        elif state == StudyState.QUEUED:
            try:
                task_id = self.enqueue(found.study_key)
            except Exception as exc:  # stays queued without a message: the queued rule finds it again
                log.error("study %s: re-queue failed (%s); will retry", found.study_key, exc)
                return state

            def record(m: Manifest) -> Manifest:
                if m.state == StudyState.QUEUED:
                    m.task_id = task_id
                return m

            update_manifest(path, record)
            log.warning("study %s: %s; re-queued as task %s", found.study_key, found.reason, task_id)
        elif "waiting" in outcome:
            log.info("study %s: %s; next re-queue in %.0f s", found.study_key, found.reason,
                     outcome["waiting"])
        return state

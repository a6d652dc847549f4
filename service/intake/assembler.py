"""Study assembly: spool index -> 4D sets -> manifest -> ``itvnode.segment_study`` on the queue.

The assembler keeps no state of its own that matters: every decision is re-derived from the spool index and
the manifests, so a restart resumes (collecting studies keep collecting, completed-but-unqueued ones are
queued; the quiet period of a collecting study counts from the restart at the earliest, since nobody could
send while the node was down). :meth:`Assembler.poll_once` takes the clock as an argument so tests drive time.

Grouping: instances are grouped by (StudyInstanceUID, FrameOfReferenceUID); each group is one candidate 4D
set with its own ``study_key`` and manifest. Series are classified by :mod:`service.intake.phases`. A group
without any phase series gets no manifest (a plain CT never triggers a job).

Completion of a group (checked every poll):

* *by count*: ``expected_phases`` distinct phases, every phase with the same number of slices at the same
  positions (tolerance ``position_tol`` mm) and no new instance in the study for ``settle`` seconds
  (default ``min(2 s, quiet_period)``);
* *by quiet period*: no new instance for ``quiet_period`` seconds; then the group is ``complete`` when it is a
  valid 4D set (>= 2 distinct phases, one geometry) whose phases cover the breathing cycle
  (:func:`service.intake.phases.cycle_coverage`), otherwise ``held`` with the reason ("3 of 10 phases:
  10 %, 20 % ... missing"). An incomplete cycle is ``complete`` anyway when an admin released this content
  (``itvnode release``, :mod:`service.ops.admin`) or the site set ``incomplete_cycle: process``; the
  manifest's ``cycle`` then carries what is missing into the QA, the RTSTRUCT and ``itvnode status``.

Re-sends and late instances:

* while a job is queued / processing / exporting, new content is logged and noted in the manifest
  (``notes``); the job goes on with what it was queued with;
* after ``done`` / ``failed``, a re-send with *identical* content (same SOP Instance UIDs) changes nothing;
  changed content moves the manifest back to ``collecting`` and it is assembled and queued again;
* a ``held`` study that receives new instances goes back to ``collecting`` and is re-assessed; held studies
  are also re-assessed once when the assembler starts (after an admin fixed ``phase_rules``, say).

Admin commands change manifests from outside (``itvnode release`` moves ``held`` to ``complete``): a study
is re-assessed when its manifest file changed, not only when instances arrive, so a running node queues a
released study within one poll and a stopped one at start-up.

A manifest is only written if its state is still the one the decision was based on (checked under the
manifest lock), so a worker's concurrent transition is never overwritten.

Enqueue is at-least-once, with backoff while the broker fails (:mod:`service.intake.job_sender`). The segment
task must therefore accept a manifest in state ``complete`` or ``queued`` and be idempotent.

Pieces: the 4D checks (:mod:`service.intake.assessment`), the manifest's content
(:mod:`service.intake.manifest_content`), groups whose assembly raised
(:mod:`service.intake.assembly_failures`), offline intake of a folder (:mod:`service.intake.folder`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from service.intake.assembly_failures import BrokenGroups
from service.intake.assessment import (
    Assessment,
    Series,
    SetChecker,
    content_fingerprint,
    for_conflict,
    looks_4d,
)
from service.intake.job_sender import Enqueue, JobSender
from service.intake.manifest_content import ManifestContent
from service.intake.phases import SeriesKind, SiteRule, compile_rules, cycle_coverage
from service.intake.queue import prune_embedded_broker
from service.store.manifest import (
    Cycle,
    Manifest,
    Note,
    load_manifest,
    manifest_lock,
    manifest_path,
    save_manifest,
    set_state,
    study_key,
    update_manifest,
    utcnow_iso,
)
from service.store.state import FINISHED, IN_FLIGHT, StudyState

if TYPE_CHECKING:
    from service.settings import Settings
    from service.store.instance_meta import InstanceMeta
    from service.store.spool import Spool

log = logging.getLogger(__name__)


class Assembler:
    """Turns spooled instances into manifests and queued jobs. Thread-compatible: one caller at a time."""

    def __init__(
        self,
        spool: Spool,
        data_dir: Path,
        enqueue: Enqueue | None,
        *,
        quiet_period: float,
        expected_phases: int | None,
        settle: float | None = None,
        site_rules: Sequence[SiteRule] = (),
        position_tol: float = 0.01,
        enqueue_retry_interval: float = 5.0,
        incomplete_cycle: str = "hold",
    ) -> None:
        self.spool = spool
        self.data_dir = Path(data_dir)
        self.enqueue = enqueue
        self.quiet_period = float(quiet_period)
        self.expected_phases = expected_phases
        self.settle = min(2.0, self.quiet_period) if settle is None else float(settle)
        if incomplete_cycle not in ("hold", "process"):
            raise ValueError(f"incomplete_cycle must be 'hold' or 'process', got {incomplete_cycle!r}")
        self.incomplete_cycle = incomplete_cycle
        self._keys: dict[str, list[str]] = {}  # study uid -> study keys of its groups (manifest stamps)
        # study uid -> (last_received, manifest mtimes) when nothing was pending
        self._settled: dict[str, tuple[float | None, tuple[int, ...]]] = {}
        self._checker = SetChecker(expected_phases, site_rules, position_tol)
        self._content = ManifestContent(self.data_dir)
        self._sender = JobSender(enqueue_retry_interval)
        self._broken = BrokenGroups(self.data_dir)  # groups whose assembly raised, backed off
        self._non4d_logged: set[str] = set()
        self._held_checked: set[str] = set()
        # set by run(): while the node was down nobody could send, so that time is not quiet time
        self._resumed_at: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings, spool: Spool, enqueue: Enqueue | None) -> Assembler:
        return cls(
            spool, settings.data_dir, enqueue,
            quiet_period=settings.quiet_period,
            expected_phases=settings.expected_phases,
            site_rules=compile_rules(settings.phase_rules),
            incomplete_cycle=settings.incomplete_cycle,
        )

    # ------------------------------------------------------------------------------------------ the loop

    def run(self, stop_event: threading.Event, interval: float = 1.0) -> None:
        """Poll until ``stop_event`` is set; an error in one poll is logged and the loop goes on."""
        log.info("assembler started (quiet period %.1f s, expected phases %s)", self.quiet_period,
                 self.expected_phases)
        next_prune = 0.0
        self._resumed_at = time.time()
        while not stop_event.is_set():
            try:
                self.poll_once(time.time())
            except Exception:
                log.exception("assembler poll failed")
            if time.monotonic() >= next_prune:  # delivered rows of the embedded broker, hourly
                next_prune = time.monotonic() + 3600.0
                try:
                    prune_embedded_broker(self.data_dir)
                except Exception:
                    log.exception("pruning the embedded broker failed")
            stop_event.wait(interval)
        log.info("assembler stopped")

    def poll_once(self, now: float | None = None) -> list[str]:
        """Assess every study with something pending; returns the study keys whose manifest changed."""
        now = time.time() if now is None else now
        changed: list[str] = []
        for study_uid in self.spool.study_uids():
            last = self._stamp(study_uid)
            if study_uid in self._settled and self._settled[study_uid] == last:
                continue
            settled = True
            groups: dict[str, list[tuple[InstanceMeta, Path]]] = defaultdict(list)
            for meta, path in self.spool.instances(study_uid):
                if meta.frame_of_reference_uid:
                    groups[meta.frame_of_reference_uid].append((meta, path))
            self._keys[study_uid] = [study_key(study_uid, f) for f in groups]
            received = last[0]  # _stamp's last instance time
            revisions = self.spool.revisions(study_uid)
            classified: dict[str, list[Series]] = {}
            for for_uid, items in groups.items():
                key = study_key(study_uid, for_uid)
                if self._broken.waiting(key, received, now):
                    settled = False
                    continue
                try:
                    classified[for_uid] = self._checker.classify(items)
                except Exception as exc:
                    self._broken.failed(study_uid, for_uid, key, received, now, exc)
                    settled = False
            phase_series = {f: [s for s in series if s.cls.kind is SeriesKind.PHASE]
                            for f, series in classified.items()}
            phase_series = {f: p for f, p in phase_series.items() if p}
            conflict = for_conflict(phase_series) if len(phase_series) > 1 else None
            for for_uid, series in classified.items():
                key = study_key(study_uid, for_uid)
                try:
                    group_settled, changed_key = self._process_group(
                        study_uid, for_uid, series, received or now, now, revisions,
                        conflict if for_uid in phase_series else None)
                except Exception as exc:
                    self._broken.failed(study_uid, for_uid, key, received, now, exc)
                    group_settled, changed_key = False, None
                else:
                    self._broken.cleared(key)
                settled = settled and group_settled
                if changed_key:
                    changed.append(changed_key)
            if settled:
                self._settled[study_uid] = self._stamp(study_uid)  # after this poll's own manifest writes
            else:
                self._settled.pop(study_uid, None)
        return changed

    def _stamp(self, study_uid: str) -> tuple[float | None, tuple[int, ...]]:
        """What must change for a settled study to be looked at again: its last instance, its manifests."""
        stamps = []
        for key in self._keys.get(study_uid, ()):
            try:
                stamps.append(manifest_path(self.data_dir, key).stat().st_mtime_ns)
            except OSError:
                stamps.append(0)
        return self.spool.last_received(study_uid), tuple(stamps)

    def _cycle(self, a: Assessment) -> Cycle | None:
        if not a.phases:
            return None
        return cycle_coverage([s.cls.percent or 0.0 for s, _ in a.phases], self.expected_phases)

    # ------------------------------------------------------------------------------------------ one group

    def _process_group(self, study_uid: str, for_uid: str, series: list[Series], last: float, now: float,
                       revisions: dict[str, int], conflict: str | None) -> tuple[bool, str | None]:
        """Returns (settled, key if the manifest changed). ``conflict``: the study's phases lie in more
        than one frame of reference (this group has some of them); the group is never complete then."""
        key = study_key(study_uid, for_uid)
        relevant = [s for s in series if s.cls.kind in (SeriesKind.PHASE, SeriesKind.REFERENCE)]
        path = manifest_path(self.data_dir, key)
        m = load_manifest(path) if path.exists() else None
        quiet_from = last
        if self._resumed_at is not None and (m is None or m.state == StudyState.COLLECTING):
            quiet_from = max(last, self._resumed_at)  # a restart: the downtime was not quiet
        quiet = now - quiet_from >= self.quiet_period

        if m is None and not any(s.cls.kind is SeriesKind.PHASE for s in series) and not looks_4d(series):
            if quiet and key not in self._non4d_logged:
                self._non4d_logged.add(key)
                log.info("study key %s: no respiratory phase series among %d series; not a 4DCT, ignored",
                         key, len(series))
            return quiet, None

        fp = content_fingerprint(relevant, revisions)
        if m is not None and m.state in IN_FLIGHT:
            if fp != m.fingerprint:
                # not settled: once the job is done/failed the new content is assembled again
                return False, self._note_late(path, key, fp)
            return True, None
        if m is not None and m.state in FINISHED:
            if fp == m.fingerprint:
                return True, None
            log.info("study key %s: content changed after %s; re-collecting", key, m.state)
            update_manifest(path, lambda mm: self._recollect(mm, fp))
            m = load_manifest(path)
        if m is not None and m.state == StudyState.COMPLETE and fp == m.fingerprint:
            queued = self._sender.send(self.enqueue, path, key, now)
            return queued, key if queued else None
        if m is not None and m.state == StudyState.HELD and fp == m.fingerprint:
            if key in self._held_checked:
                return True, None
            # once per assembler life (i.e. after a restart, e.g. with new phase rules): re-assess
            self._held_checked.add(key)
        seen_state = m.state if m is not None else None

        assessment = self._checker.assess(series)
        if conflict:
            assessment.problem = conflict + (f"; {assessment.problem}" if assessment.problem else "")
            assessment.uniform = False
        n = len({p[0].cls.percent for p in assessment.phases})
        cycle = self._cycle(assessment)
        complete_cycle = cycle is None or cycle.complete
        released = m is not None and m.released is not None and m.released.fingerprint == fp
        treat = complete_cycle or released or self.incomplete_cycle == "process"
        problem = assessment.problem
        if problem is None and not treat:
            assert cycle is not None
            problem = f"{cycle.describe()}; to process it anyway: itvnode release {key}"
        by_count = (assessment.problem is None and assessment.uniform and self.expected_phases is not None
                    and n == self.expected_phases and complete_cycle and now - last >= self.settle)
        if by_count or (quiet and problem is None):
            why = (f"all {n} expected phases present with equal slice positions" if by_count
                   else f"quiet period elapsed with {n} phases"
                   + (f" ({self.expected_phases} expected)"
                      if self.expected_phases and n != self.expected_phases else ""))
            if not complete_cycle and cycle is not None:
                how = "released by admin" if released else "processed and flagged (incomplete_cycle: process)"
                why += f"; incomplete cycle ({cycle.describe()}) {how}"
            m = self._content.build(m, study_uid, for_uid, key, assessment, fp, cycle)
            set_state(m, StudyState.COMPLETE, why)
            if not self._save_if_state(path, m, seen_state):
                return False, None
            log.info("study key %s complete: %s", key, why)
            queued = self._sender.send(self.enqueue, path, key, now)
            return queued, key
        if quiet:
            assert problem is not None
            if m is not None and m.state == StudyState.HELD and m.reason == problem and m.fingerprint == fp:
                return True, None  # re-assessed after a restart: still held for the same reason
            m = self._content.build(m, study_uid, for_uid, key, assessment, fp, cycle)
            set_state(m, StudyState.HELD, problem)
            if not self._save_if_state(path, m, seen_state):
                return False, None
            log.warning("study key %s held: %s", key, problem)
            return True, key
        # still collecting: keep the manifest's progress current for `itvnode status`
        if m is None or m.fingerprint != fp or m.state != StudyState.COLLECTING:
            reason = None
            if m is not None and m.state == StudyState.HELD:
                reason = "new instances after hold; re-assessing"
            m = self._content.build(m, study_uid, for_uid, key, assessment, fp, cycle)
            if m.state != StudyState.COLLECTING or not m.history:
                set_state(m, StudyState.COLLECTING, reason)
            m.updated_at = utcnow_iso()
            self._save_if_state(path, m, seen_state)
            return False, key
        return False, None

    @staticmethod
    def _save_if_state(path: Path, m: Manifest, seen_state: str | None) -> bool:
        """Save ``m`` unless another process changed the manifest's state since it was read."""
        with manifest_lock(path):
            current = load_manifest(path).state if path.exists() else None
            if current != seen_state:
                log.info("study key %s: state changed to %s meanwhile; not overwritten", m.study_key, current)
                return False
            save_manifest(m, path)
            return True

    @staticmethod
    def _recollect(m: Manifest, fp: str) -> Manifest:
        set_state(m, StudyState.COLLECTING, f"content changed after {m.state}; re-collecting")
        m.task_id = None
        m.fingerprint = None
        m.late_fingerprint = None
        return m

    def _note_late(self, path: Path, key: str, fp: str) -> str | None:
        """Record once per new content that instances arrived while a job is in flight."""
        if load_manifest(path).late_fingerprint == fp:
            return None

        def note(m: Manifest) -> Manifest:
            if m.late_fingerprint == fp or m.state not in IN_FLIGHT:
                return m
            log.warning("study key %s: instances arrived after completion (state %s); not re-queued now",
                        key, m.state)
            m.late_fingerprint = fp
            text = (f"instances arrived after completion (state {m.state}); "
                    "the job continues with the content it was queued with")
            m.notes.append(Note(at=utcnow_iso(), text=text))
            m.updated_at = utcnow_iso()
            return m

        update_manifest(path, note)
        return key


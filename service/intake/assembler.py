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

Enqueue is at-least-once: the manifest is saved ``complete`` first, then the message is sent, then the state
becomes ``queued`` (only if nobody moved it on meanwhile). A broker failure leaves ``complete`` with the
reason and is retried after ``enqueue_retry_interval`` seconds, doubling per consecutive failure up to 60 s;
while the broker is failing no other study tries either, so an unreachable broker (connect timeouts) does not
stall the loop for every completed study. The segment task must therefore accept a
manifest in state ``complete`` or ``queued`` and be idempotent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.intake.phases import (
    SeriesClass,
    SeriesKind,
    SiteRule,
    classify_series,
    compile_rules,
    cycle_coverage,
    descriptions_seen,
    order_phases,
)
from service.intake.queue import prune_embedded_broker
from service.store.manifest import (
    IDENTIFIER_KEYS,
    Cycle,
    Geometry,
    IgnoredSeries,
    Manifest,
    Note,
    PhaseEntry,
    ReferenceEntry,
    load_manifest,
    manifest_lock,
    manifest_path,
    save_manifest,
    set_state,
    study_key,
    update_manifest,
    utcnow_iso,
)
from service.store.state import FINISHED, IN_FLIGHT

if TYPE_CHECKING:
    from service.settings import Settings
    from service.store.instance_meta import InstanceMeta
    from service.store.spool import Spool

log = logging.getLogger(__name__)

Enqueue = Callable[[str], str]  # study_key -> task id; raises on broker failure


@dataclass
class _Series:
    uid: str
    cls: SeriesClass
    description: str
    items: list[tuple[InstanceMeta, Path]]


@dataclass
class _Slices:
    """A series' slices sorted along the normal (``files`` repeats a multi-frame file once per frame)."""

    files: list[Path]
    positions: np.ndarray  # (n, 3)
    distinct_files: list[Path]


@dataclass
class Assessment:
    """What a group currently is. ``problem`` is None for a valid 4D set."""

    problem: str | None
    phases: list[tuple[_Series, _Slices]] = field(default_factory=list)
    references: list[tuple[_Series, _Slices | None]] = field(default_factory=list)
    ignored: list[_Series] = field(default_factory=list)
    uniform: bool = False  # every phase has the same slices at the same positions


def _fingerprint(series: Sequence[_Series], revisions: dict[str, int] | None = None) -> str:
    """Identity of the content: the SOP Instance UIDs, plus the revision of any instance re-sent with changed
    content (so a corrected re-send is new content; without revisions the value is what it always was)."""
    revisions = revisions or {}
    h = hashlib.sha256()
    for uid in sorted(m.sop_instance_uid for s in series for m, _ in s.items):
        h.update(uid.encode())
        rev = revisions.get(uid)
        if rev:
            h.update(f"#{rev}".encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def _short_uid(uid: str) -> str:
    """A UID shortened for a reason text (both ends: roots are shared, suffixes tell series apart)."""
    return uid if len(uid) <= 24 else f"{uid[:12]}…{uid[-10:]}"


def _for_conflict(phase_series: dict[str, list[_Series]]) -> str:
    """Reason naming which phases lie in which frame of reference (largest group first)."""
    parts = []
    for for_uid, series in sorted(phase_series.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        listed = ", ".join(f"{s.cls.percent:g}% (series {_short_uid(s.uid)})"
                           for s in sorted(series, key=lambda s: (s.cls.percent or 0.0, s.uid)))
        parts.append(f"FrameOfReferenceUID {_short_uid(for_uid)}: {listed}")
    return "phases disagree on the frame of reference: " + "; ".join(parts)


@dataclass
class _Broken:
    """A group whose assembly raised: logged once, held, retried only on new instances or after ``delay``."""

    signature: str
    last: float | None
    retry_at: float
    delay: float


def _normal(orientation: Sequence[float]) -> np.ndarray:
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def _frame_positions(path: Path) -> list[tuple[float, float, float]] | None:
    """ImagePositionPatient of every frame of a multi-frame (Enhanced CT) instance."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    out = []
    for item in ds.get("PerFrameFunctionalGroupsSequence", []):
        plane = item.get("PlanePositionSequence")
        if not plane:
            return None
        pos = plane[0].get("ImagePositionPatient")
        if pos is None or len(pos) != 3:
            return None
        out.append((float(pos[0]), float(pos[1]), float(pos[2])))
    return out or None


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
        self._cwd = os.getcwd()
        self._data_abs = os.path.abspath(self.data_dir)
        self._data_prefix = self._data_abs.rstrip(os.sep) + os.sep
        self.enqueue = enqueue
        self.quiet_period = float(quiet_period)
        self.expected_phases = expected_phases
        self.settle = min(2.0, self.quiet_period) if settle is None else float(settle)
        self.site_rules = list(site_rules)
        self.position_tol = float(position_tol)
        self.enqueue_retry_interval = float(enqueue_retry_interval)
        if incomplete_cycle not in ("hold", "process"):
            raise ValueError(f"incomplete_cycle must be 'hold' or 'process', got {incomplete_cycle!r}")
        self.incomplete_cycle = incomplete_cycle
        self._keys: dict[str, list[str]] = {}  # study uid -> study keys of its groups (manifest stamps)
        # study uid -> (last_received, manifest mtimes) when nothing was pending
        self._settled: dict[str, tuple[float | None, tuple[int, ...]]] = {}
        self._broker_retry_at = 0.0  # no enqueue before this time (the broker failed)
        self._broker_failures = 0
        self._frames_cache: dict[Path, list[tuple[float, float, float]] | None] = {}
        self._non4d_logged: set[str] = set()
        self._held_checked: set[str] = set()
        self._broken: dict[str, _Broken] = {}  # study key -> the failure being backed off
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
            classified: dict[str, list[_Series]] = {}
            for for_uid, items in groups.items():
                key = study_key(study_uid, for_uid)
                broken = self._broken.get(key)
                if broken is not None and broken.last == received and now < broken.retry_at:
                    settled = False
                    continue
                try:
                    classified[for_uid] = self._classify(items)
                except Exception as exc:
                    self._failed(study_uid, for_uid, key, received, now, exc)
                    settled = False
            phase_series = {f: [s for s in series if s.cls.kind is SeriesKind.PHASE]
                            for f, series in classified.items()}
            phase_series = {f: p for f, p in phase_series.items() if p}
            conflict = _for_conflict(phase_series) if len(phase_series) > 1 else None
            for for_uid, series in classified.items():
                key = study_key(study_uid, for_uid)
                try:
                    group_settled, changed_key = self._process_group(
                        study_uid, for_uid, series, received or now, now, revisions,
                        conflict if for_uid in phase_series else None)
                except Exception as exc:
                    self._failed(study_uid, for_uid, key, received, now, exc)
                    group_settled, changed_key = False, None
                else:
                    self._broken.pop(key, None)
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

    def _failed(self, study_uid: str, for_uid: str, key: str, last: float | None, now: float,
                exc: Exception) -> None:
        """One group's assembly raised: log it once (with its key), hold the study with the reason and back
        off (doubling from 30 s to 1 h; new instances retry at once), so other studies go on and the log
        does not fill with the same traceback every poll."""
        signature = f"{type(exc).__name__}: {exc}"[:300]
        broken = self._broken.get(key)
        delay = 30.0 if broken is None or broken.last != last else min(3600.0, broken.delay * 2)
        self._broken[key] = _Broken(signature, last, now + delay, delay)
        if broken is not None and broken.signature == signature:
            log.debug("study key %s: assembly still failing (%s); next try in %.0f s", key, signature, delay)
            return
        log.error("study key %s: assembly failed; held, retried on new instances or in %.0f s", key, delay,
                  exc_info=exc)
        try:
            self._hold_broken(study_uid, for_uid, key, f"assembly failed: {signature}")
        except Exception as exc2:  # e.g. the disk: the log line above already names the study
            log.error("study key %s: could not record the failure in the manifest: %s", key, exc2)

    def _hold_broken(self, study_uid: str, for_uid: str, key: str, reason: str) -> None:
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
            if m.state == "held" and m.reason == reason:
                return
            set_state(m, "held", reason)
            save_manifest(m, path)

    # ------------------------------------------------------------------------------------------ one group

    def _classify(self, items: list[tuple[InstanceMeta, Path]]) -> list[_Series]:
        by_series: dict[str, list[tuple[InstanceMeta, Path]]] = defaultdict(list)
        for meta, path in items:
            by_series[meta.series_instance_uid].append((meta, path))
        out = []
        for uid, sitems in sorted(by_series.items()):
            first = sitems[0][0]
            cls = classify_series(first, self.site_rules)
            out.append(_Series(uid, cls, first.series_description, sitems))
        return out

    def _process_group(self, study_uid: str, for_uid: str, series: list[_Series], last: float, now: float,
                       revisions: dict[str, int], conflict: str | None) -> tuple[bool, str | None]:
        """Returns (settled, key if the manifest changed). ``conflict``: the study's phases lie in more
        than one frame of reference (this group has some of them); the group is never complete then."""
        key = study_key(study_uid, for_uid)
        relevant = [s for s in series if s.cls.kind in (SeriesKind.PHASE, SeriesKind.REFERENCE)]
        path = manifest_path(self.data_dir, key)
        m = load_manifest(path) if path.exists() else None
        quiet_from = last
        if self._resumed_at is not None and (m is None or m.state == "collecting"):
            quiet_from = max(last, self._resumed_at)  # a restart: the downtime was not quiet
        quiet = now - quiet_from >= self.quiet_period

        if m is None and not any(s.cls.kind is SeriesKind.PHASE for s in series) and not _looks_4d(series):
            if quiet and key not in self._non4d_logged:
                self._non4d_logged.add(key)
                log.info("study key %s: no respiratory phase series among %d series; not a 4DCT, ignored",
                         key, len(series))
            return quiet, None

        fp = _fingerprint(relevant, revisions)
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
        if m is not None and m.state == "complete" and fp == m.fingerprint:
            queued = self._try_enqueue(path, key, now)
            return queued, key if queued else None
        if m is not None and m.state == "held" and fp == m.fingerprint:
            if key in self._held_checked:
                return True, None
            # once per assembler life (i.e. after a restart, e.g. with new phase rules): re-assess
            self._held_checked.add(key)
        seen_state = m.state if m is not None else None

        assessment = self._assess(series)
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
            m = self._build(m, study_uid, for_uid, key, assessment, fp)
            set_state(m, "complete", why)
            if not self._save_if_state(path, m, seen_state):
                return False, None
            log.info("study key %s complete: %s", key, why)
            queued = self._try_enqueue(path, key, now)
            return queued, key
        if quiet:
            assert problem is not None
            if m is not None and m.state == "held" and m.reason == problem and m.fingerprint == fp:
                return True, None  # re-assessed after a restart: still held for the same reason
            m = self._build(m, study_uid, for_uid, key, assessment, fp)
            set_state(m, "held", problem)
            if not self._save_if_state(path, m, seen_state):
                return False, None
            log.warning("study key %s held: %s", key, problem)
            return True, key
        # still collecting: keep the manifest's progress current for `itvnode status`
        if m is None or m.fingerprint != fp or m.state != "collecting":
            reason = None
            if m is not None and m.state == "held":
                reason = "new instances after hold; re-assessing"
            m = self._build(m, study_uid, for_uid, key, assessment, fp)
            if m.state != "collecting" or not m.history:
                set_state(m, "collecting", reason)
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
        set_state(m, "collecting", f"content changed after {m.state}; re-collecting")
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

    def _try_enqueue(self, path: Path, key: str, now: float) -> bool:
        """Send the job for a ``complete`` manifest; returns True once it is queued (or moved on)."""
        if self.enqueue is None:
            return False
        if now < self._broker_retry_at:
            return False
        try:
            task_id = self.enqueue(key)
        except Exception as exc:
            self._broker_failures += 1
            delay = min(60.0, self.enqueue_retry_interval * 2 ** (self._broker_failures - 1))
            self._broker_retry_at = now + delay
            reason = f"enqueue failed, retrying: {exc}"[:300]
            log.warning("study key %s: %s", key, reason)

            def keep_complete(m: Manifest) -> Manifest:
                if m.state == "complete" and m.reason != reason:
                    set_state(m, "complete", reason)
                return m

            update_manifest(path, keep_complete)
            return False
        self._broker_failures = 0
        self._broker_retry_at = 0.0

        def queued(m: Manifest) -> Manifest:
            m.task_id = m.task_id or task_id
            if m.state == "complete":
                set_state(m, "queued", None)
            return m

        update_manifest(path, queued)
        log.info("study key %s queued as task %s", key, task_id)
        return True

    # ------------------------------------------------------------------------------------------ checks

    def _slices(self, s: _Series) -> tuple[_Slices | None, str | None]:
        """Sort a series along its normal; (None, problem) when it cannot be sorted."""
        metas = [m for m, _ in s.items]
        orientation = metas[0].image_orientation
        if orientation is None:
            return None, f"series {s.uid} has no ImageOrientationPatient"
        normal = _normal(orientation)
        multiframe = any((m.number_of_frames or 1) > 1 for m in metas)
        if multiframe:
            if len(s.items) != 1:
                return None, f"series {s.uid}: {len(s.items)} multi-frame instances in one series"
            p = s.items[0][1]
            if p not in self._frames_cache:
                if len(self._frames_cache) > 4096:
                    self._frames_cache.clear()
                try:
                    self._frames_cache[p] = _frame_positions(p)
                except Exception as exc:
                    return None, f"series {s.uid}: cannot read frame positions ({type(exc).__name__})"
            frames = self._frames_cache[p]
            if frames is None:
                return None, f"series {s.uid}: multi-frame instance without per-frame positions"
            pos = np.asarray(frames, dtype=float)
            order = np.argsort(pos @ normal, kind="stable")
            return _Slices([p] * len(frames), pos[order], [p]), None
        if any(m.image_position is None for m in metas):
            return None, f"series {s.uid} has instances without ImagePositionPatient"
        pos = np.asarray([m.image_position for m in metas], dtype=float)
        order = np.argsort(pos @ normal, kind="stable")
        files = [s.items[i][1] for i in order]
        return _Slices(files, pos[order], files), None

    def _assess(self, series: list[_Series]) -> Assessment:
        a = Assessment(problem=None)
        problems: list[str] = []
        phases = [s for s in series if s.cls.kind is SeriesKind.PHASE]
        a.ignored = [s for s in series if s.cls.kind is SeriesKind.OTHER]
        for s in series:
            if s.cls.kind is SeriesKind.REFERENCE:
                sl, _ = self._slices(s)
                a.references.append((s, sl))
        # breathing order and the meaning of the labels (amplitude vs phase binning): service.intake.phases
        # owns it
        phases.sort(key=lambda s: s.uid)
        order = order_phases([s.cls for s in phases], self.expected_phases,
                             [f"{s.uid} ({s.description!r})" for s in phases])
        problems.extend(order.problems)
        resolved = []
        for i, cls in order.ordered:
            phases[i].cls = cls  # percent = position in the cycle, roi_label = the ROI suffix
            resolved.append(phases[i])
        phases = resolved
        by_pct = {s.cls.percent for s in phases}
        for s in phases:
            tags = {m.nominal_phase_percent for m, _ in s.items}
            if len(tags) > 1:
                problems.append(f"series {s.uid} mixes {len(tags)} respiratory phases in (0020,9245); "
                                "one series per phase is required")
                continue
            sl, problem = self._slices(s)
            if problem:
                problems.append(problem)
            elif sl is not None:
                a.phases.append((s, sl))
        if not by_pct:
            seen = descriptions_seen(s.description for s in series)
            problems.append(f"no respiratory phase recognised in {len(series)} series that look like a 4D "
                            "set (phase naming unknown: add a site rule, setting phase_rules); descriptions "
                            f"seen: {seen}")
        elif len(by_pct) < 2:
            seen = descriptions_seen(s.description for s in series if s.cls.kind is not SeriesKind.REFERENCE)
            problems.append(f"{len(by_pct)} distinct respiratory phase(s) found; a 4D set needs at least 2; "
                            f"descriptions seen: {seen}")
        if not problems:
            problems.extend(self._geometry_problems(a.phases))
        a.uniform = not problems
        a.problem = "; ".join(problems) if problems else None
        return a

    def _geometry_problems(self, phases: list[tuple[_Series, _Slices]]) -> list[str]:
        problems = []
        first, ref = phases[0]
        m0 = first.items[0][0]
        tol = self.position_tol
        for s, sl in phases:
            metas = [m for m, _ in s.items]
            label = f"phase {s.cls.percent:g}% (series {s.uid})"
            if {(m.rows, m.columns) for m in metas} != {(m0.rows, m0.columns)}:
                problems.append(f"{label}: rows/columns differ from phase {first.cls.percent:g}%")
                continue
            o0 = np.asarray(m0.image_orientation or (), dtype=float)
            if any(m.image_orientation is None or len(m.image_orientation) != len(o0) for m in metas) or (
                    float(np.max(np.abs(np.asarray([m.image_orientation for m in metas], dtype=float) - o0)))
                    > 1e-4):
                problems.append(f"{label}: ImageOrientationPatient differs from phase {first.cls.percent:g}%")
                continue
            along = sl.positions @ _normal(m0.image_orientation or (1, 0, 0, 0, 1, 0))
            if len(along) > 1 and float(np.min(np.diff(along))) < tol:
                problems.append(f"{label}: two slices at the same position")
                continue
            if len(sl.positions) != len(ref.positions):
                problems.append(f"{label}: {len(sl.positions)} slices vs {len(ref.positions)} in phase "
                                f"{first.cls.percent:g}%")
                continue
            dev = float(np.max(np.abs(sl.positions - ref.positions))) if len(ref.positions) else 0.0
            if dev > tol:
                problems.append(f"{label}: slice positions differ from phase {first.cls.percent:g}% by up to "
                                f"{dev:.3f} mm (tolerance {tol} mm)")
        if not problems and len(ref.positions) > 2:
            along = ref.positions @ _normal(m0.image_orientation or (1, 0, 0, 0, 1, 0))
            d = np.diff(along)
            if float(np.max(d) - np.min(d)) > max(tol, 0.01 * float(np.median(d))):
                problems.append(f"uneven slice spacing ({float(np.min(d)):.3f}..{float(np.max(d)):.3f} mm): "
                                "slices missing in every phase?")
        return problems

    # ------------------------------------------------------------------------------------------ manifest

    def _rel(self, p: Path) -> str:
        """Path relative to data_dir (the manifest contract); absolute when the spool lies elsewhere."""
        s = os.fspath(p)
        if not os.path.isabs(s):
            s = os.path.join(self._cwd, s)
        if s.startswith(self._data_prefix) and "/." not in s and "//" not in s:  # fast path, already normal
            return s[len(self._data_prefix):]
        absolute = os.path.abspath(s)
        rel = os.path.relpath(absolute, self._data_abs)
        return absolute if rel.startswith("..") else Path(rel).as_posix()

    def _build(self, m: Manifest | None, study_uid: str, for_uid: str, key: str, a: Assessment,
               fp: str) -> Manifest:
        """Fill phases, references, geometry and identifiers from the current assessment."""
        if m is None:
            m = Manifest(study_key=key, study_instance_uid=study_uid, frame_of_reference_uid=for_uid)
        m.fingerprint = fp
        m.phases = [
            PhaseEntry(percent=float(s.cls.percent or 0.0), label=s.cls.roi_label, series_instance_uid=s.uid,
                       series_description=s.description, slices=len(sl.positions),
                       files=[self._rel(f) for f in sl.distinct_files])
            for s, sl in a.phases
        ]
        m.references = [
            ReferenceEntry(kind=s.cls.reference or "AVG",  # type: ignore[arg-type]
                           series_instance_uid=s.uid, series_description=s.description,
                           files=[self._rel(f) for f in _ref_files(s, sl)])
            for s, sl in a.references
        ]
        if a.phases:
            s0, sl0 = a.phases[0]
            meta0, path0 = s0.items[0]
            header = _read_header(sl0.distinct_files[0] if sl0.distinct_files else path0)
            spacing = header.get("pixel_spacing") or [0.0, 0.0]
            along = sl0.positions @ _normal(meta0.image_orientation or (1, 0, 0, 0, 1, 0))
            m.geometry = Geometry(
                rows=int(meta0.rows or 0), columns=int(meta0.columns or 0),
                pixel_spacing=[float(v) for v in spacing],
                image_orientation=[float(v) for v in (meta0.image_orientation or ())],
                positions=[[float(v) for v in p] for p in sl0.positions],
                slice_spacing=float(np.median(np.diff(along))) if len(along) > 1 else 0.0,
            )
            m.identifiers = header.get("identifiers") or {}
        m.cycle = self._cycle(a)
        m.ignored_series = [
            IgnoredSeries(series_instance_uid=s.uid, series_description=s.description,
                          why=s.cls.note or "not a respiratory phase") for s in a.ignored]
        return m


def assemble_folder(
    files: Sequence[Path],
    work_dir: Path,
    *,
    expected_phases: int | None,
    phase_rules: Sequence[Any] = (),
    incomplete_cycle: str = "process",
) -> tuple[int, dict[str, int]]:
    """Offline intake (``itvnode segment``, ``itvnode evaluate``): the SCP's header rules, spool and phase
    assembly on files already on disk, completed at once (no quiet period, no queue). Manifests land under
    ``work_dir``. Returns the number of instances stored and the count of ignored files per reason.

    An incomplete cycle is processed and flagged by default: running a command on a folder is the deliberate
    act that ``itvnode release`` is on the node, and nothing is sent anywhere."""
    from service.store.header_scan import meta_from_bytes
    from service.store.ingest_errors import IngestError
    from service.store.spool import Spool

    stored = 0
    ignored: defaultdict[str, int] = defaultdict(int)
    spool = Spool(work_dir / "spool", fsync=False)  # a scratch copy: the originals stay where they are
    try:
        for f in files:
            try:
                encoded = f.read_bytes()
                spool.store(meta_from_bytes(encoded), encoded)
                stored += 1
            except (IngestError, OSError, ValueError) as exc:
                ignored[type(exc).__name__] += 1
        assembler = Assembler(spool, work_dir, None, quiet_period=0.0, expected_phases=expected_phases,
                              settle=0.0, site_rules=compile_rules(list(phase_rules)),
                              incomplete_cycle=incomplete_cycle)
        assembler.poll_once(time.time() + 1.0)
    finally:
        spool.close()
    return stored, dict(ignored)


def _looks_4d(series: Sequence[_Series]) -> bool:
    """A group without a recognised phase that still looks like a 4D set (held, not ignored, so that an
    unknown naming is seen): an AVG/MIP/MinIP series, or three or more other series of one slice count."""
    if any(s.cls.kind is SeriesKind.REFERENCE for s in series):
        return True
    counts: defaultdict[int, int] = defaultdict(int)
    for s in series:
        if s.cls.kind is SeriesKind.OTHER and len(s.items) >= 2:
            counts[len(s.items)] += 1
    return any(n >= 3 for n in counts.values())


def _ref_files(s: _Series, sl: _Slices | None) -> list[Path]:
    return sl.distinct_files if sl is not None else [p for _, p in s.items]


def _read_header(path: Path) -> dict[str, Any]:
    """PixelSpacing and the identifiers the RTSTRUCT needs, from one file (pixels not read)."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    spacing = ds.get("PixelSpacing")
    if spacing is None:
        for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            seq = ds.get(groups)
            if seq and seq[0].get("PixelMeasuresSequence"):
                spacing = seq[0].PixelMeasuresSequence[0].get("PixelSpacing")
                if spacing is not None:
                    break
    identifiers = {k: ("" if ds.get(k) is None else str(ds.get(k))) for k in IDENTIFIER_KEYS}
    return {"pixel_spacing": [float(v) for v in spacing] if spacing is not None else None,
            "identifiers": identifiers}

"""Reconciliation rules (service.ops.reconcile): which studies are stuck, re-queue with backoff, then
failed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from service.ops.reconcile import (
    REASON_PREFIX,
    Heartbeat,
    ReconcilePolicy,
    Reconciler,
    assess,
    attempts,
    find_stuck,
    heartbeat_path,
)
from service.store.manifest import (
    HistoryEntry,
    Manifest,
    load_manifest,
    manifest_path,
    save_manifest,
    set_state,
)

POLICY = ReconcilePolicy(interval=1, heartbeat_interval=1, heartbeat_timeout=10, hard_time_limit=100,
                         queued_lost_after=20, max_attempts=2, backoff=30)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(t))


def _manifest(state: str, entered: float, key: str = "0123456789abcdef", **results: object) -> Manifest:
    m = Manifest(study_key=key, study_instance_uid="1.2.3", frame_of_reference_uid="1.2.4")
    m.history = [HistoryEntry(state="complete", at=_iso(entered - 5)),
                 HistoryEntry(state=state, at=_iso(entered))]  # type: ignore[arg-type]
    m.state = state  # type: ignore[assignment]
    m.task_id = "task-1"
    m.results.update(results)
    return m


def test_processing_without_heartbeat_is_stuck_after_the_timeout() -> None:
    now = 1_000_000.0
    m = _manifest("processing", now - 5, started_at=now - 5)
    assert assess(m, now, POLICY, None, None) is None
    m = _manifest("processing", now - 11, started_at=now - 11)
    found = assess(m, now, POLICY, None, None)
    assert found is not None and "no heartbeat" in found.reason
    assert assess(m, now, POLICY, now - 2, None) is None  # a live worker beats
    assert assess(m, now, POLICY, now - 11, None) is not None  # it stopped beating


def test_split_study_waiting_in_the_queue_is_not_stuck_until_its_tasks_are_gone() -> None:
    now = 1_000_000.0
    split = {"run": "task-1", "groups": [[0, 1], [2, 3]]}
    m = _manifest("processing", now - 50, started_at=now - 50, split=split)
    key = m.study_key
    assert assess(m, now, POLICY, now - 40, {key}) is None  # its groups wait for a free worker
    found = assess(m, now, POLICY, now - 40, set())  # no task of it left anywhere: stuck
    assert found is not None and "no heartbeat" in found.reason
    assert assess(m, now, POLICY, now - 40, None) is not None  # broker unreadable: the heartbeat rule holds
    unsplit = _manifest("processing", now - 50, started_at=now - 50)
    assert assess(unsplit, now, POLICY, now - 40, {key}) is not None  # only a split study waits so
    late = _manifest("processing", now - 200, started_at=now - 200, split=split)
    assert "hard time limit" in assess(late, now, POLICY, now - 1, {key}).reason  # type: ignore[union-attr]


def test_processing_past_the_hard_time_limit_is_stuck_even_with_a_heartbeat() -> None:
    now = 1_000_000.0
    m = _manifest("processing", now - 200, started_at=now - 200)
    found = assess(m, now, POLICY, now - 1, None)
    assert found is not None and "hard time limit" in found.reason


def test_queued_is_lost_only_without_a_broker_message_and_after_the_threshold() -> None:
    now = 1_000_000.0
    m = _manifest("queued", now - 30)
    assert assess(m, now, POLICY, None, None) is None  # broker not readable: no verdict
    assert assess(m, now, POLICY, None, {m.study_key}) is None  # its message is there
    found = assess(m, now, POLICY, None, set())
    assert found is not None and "no message" in found.reason
    assert assess(_manifest("queued", now - 5), now, POLICY, None, set()) is None
    for state in ("done", "failed", "exporting", "held", "collecting", "complete"):
        assert assess(_manifest(state, now - 10_000), now, POLICY, None, set()) is None


def test_attempts_count_since_the_study_was_last_assembled() -> None:
    m = _manifest("processing", time.time())
    set_state(m, "queued", REASON_PREFIX + "x")
    set_state(m, "processing")
    set_state(m, "queued", REASON_PREFIX + "y")
    assert attempts(m)[0] == 2
    set_state(m, "done")
    set_state(m, "collecting")
    set_state(m, "complete")
    set_state(m, "queued")
    assert attempts(m) == (0, None)


def _write(data_dir: Path, m: Manifest) -> Path:
    path = manifest_path(data_dir, m.study_key)
    save_manifest(m, path)
    return path


def test_reconciler_requeues_with_backoff_then_fails_with_the_reason(tmp_path: Path) -> None:
    sent: list[str] = []
    rec = Reconciler(tmp_path, lambda k: sent.append(k) or f"task-{len(sent) + 1}", POLICY,
                     broker_keys=lambda: set())
    t0 = time.time()
    path = _write(tmp_path, _manifest("processing", t0 - 50, started_at=t0 - 50))
    assert rec.run_once(t0) == [("0123456789abcdef", "queued")]
    m = load_manifest(path)
    assert m.state == "queued" and m.reason is not None and m.reason.startswith(REASON_PREFIX)
    assert "no heartbeat" in m.reason and "attempt 1 of 2" in m.reason
    assert m.task_id == "task-2" and "task-1" in m.results["task_ids"]  # the killed task is superseded
    assert sent == ["0123456789abcdef"]

    def stuck_again(at: float) -> None:  # the worker took it, then died again
        m = load_manifest(path)
        set_state(m, "processing")
        m.history[-1].at = _iso(at)
        m.results["started_at"] = at
        save_manifest(m, path)

    t1 = time.time()
    stuck_again(t1 - 11)
    assert rec.run_once(t1) == []  # second re-queue waits for the backoff (30 s after the first)
    assert load_manifest(path).state == "processing"
    assert rec.run_once(t1 + 31) == [("0123456789abcdef", "queued")]
    assert "attempt 2 of 2" in str(load_manifest(path).reason)
    stuck_again(t1 + 31)
    assert rec.run_once(t1 + 31 + 11) == [("0123456789abcdef", "failed")]
    m = load_manifest(path)
    assert m.state == "failed" and "gave up after 2 re-queue(s)" in str(m.reason)
    assert len(sent) == 2
    assert rec.run_once(t1 + 1000) == []  # failed is final for the reconciler


def test_lost_queued_message_is_confirmed_on_a_second_pass(tmp_path: Path) -> None:
    sent: list[str] = []
    in_broker: set[str] = set()
    rec = Reconciler(tmp_path, lambda k: sent.append(k) or "t", POLICY, broker_keys=lambda: set(in_broker))
    now = time.time()
    path = _write(tmp_path, _manifest("queued", now - 30))
    assert rec.run_once(now) == [] and sent == []  # first sighting only
    assert rec.run_once(now + 1) == [("0123456789abcdef", "queued")]
    assert sent == ["0123456789abcdef"] and "no message" in str(load_manifest(path).reason)


def test_broker_unreadable_leaves_queued_alone_but_still_handles_processing(tmp_path: Path) -> None:
    def broken() -> set[str]:
        raise ConnectionError("down")

    rec = Reconciler(tmp_path, lambda k: "t", POLICY, broker_keys=broken)
    now = time.time()
    _write(tmp_path, _manifest("queued", now - 1000, key="aaaaaaaaaaaaaaaa"))
    _write(tmp_path, _manifest("processing", now - 50, key="bbbbbbbbbbbbbbbb", started_at=now - 50))
    assert rec.run_once(now) == [("bbbbbbbbbbbbbbbb", "queued")]
    assert rec.run_once(now + 1) == []


def test_heartbeat_touches_while_running_and_stops(tmp_path: Path) -> None:
    m = _manifest("processing", time.time())
    _write(tmp_path, m)
    hb = heartbeat_path(tmp_path, m.study_key)
    with Heartbeat(tmp_path, m.study_key, interval=0.05):
        first = os.stat(hb).st_mtime_ns
        deadline = time.monotonic() + 5
        while os.stat(hb).st_mtime_ns == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.stat(hb).st_mtime_ns > first
    stopped = os.stat(hb).st_mtime_ns
    time.sleep(0.2)
    assert os.stat(hb).st_mtime_ns == stopped
    assert find_stuck(tmp_path, POLICY, time.time()) == []
    assert len(find_stuck(tmp_path, POLICY, time.time() + 11)) == 1


def test_policy_validates() -> None:
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        ReconcilePolicy(heartbeat_interval=10, heartbeat_timeout=15)

"""Incomplete breathing cycles are held; ``itvnode release`` (a subprocess, like an admin) on a stopped node;
``incomplete_cycle: process`` (process and flag)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from assembly_helpers import SMALL, all_files, broker_messages, ingest, make_assembler, manifest
from test_status import itvnode

from service.intake.queue import TASK_SEGMENT, Enqueuer
from service.store.manifest import study_key
from service.store.spool import Spool

Factory = Callable[..., Any]
TEN = {**SMALL, "n_phases": 10}


def _three_of_ten(phantom_dicom_factory: Factory, spool: Spool, seed: str) -> tuple[Any, str, float]:
    ph = phantom_dicom_factory("siemens", uid_seed=seed, **TEN)
    ingest(spool, [f for pct in (0.0, 30.0, 60.0) for f in ph.by_percent(pct).files])
    return ph, study_key(ph.study_instance_uid, ph.frame_of_reference_uid), \
        spool.last_received(ph.study_instance_uid) or 0.0


def test_three_of_ten_held_then_released_on_a_stopped_node(phantom_dicom_factory: Factory, spool: Spool,
                                                          data_dir: Path, embedded: Enqueuer) -> None:
    ph, key, last = _three_of_ten(phantom_dicom_factory, spool, "release-stopped")
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0, expected_phases=10)
    asm.poll_once(last + 31)
    m = manifest(data_dir, key)
    assert m.state == "held"
    assert (m.reason or "").startswith("3 of 10 phases: 10 %, 20 %, 40 %, 50 %, 70 %, 80 %, 90 % missing")
    assert f"itvnode release {key}" in (m.reason or "")
    assert broker_messages(data_dir) == []
    status = json.loads(itvnode(data_dir, "status", "--json").stdout)
    (row,) = status
    assert (row["phases_used"], row["phases_expected"]) == (3, 10)
    assert m.cycle is not None and row["warnings"] == [m.cycle.describe()]

    # the node is stopped (no assembler polls): release by key
    res = itvnode(data_dir, "release", key)
    assert res.returncode == 0, res.stderr
    assert "released (3 of 10 phases)" in res.stdout
    m = manifest(data_dir, key)
    assert m.state == "complete" and m.released is not None
    assert m.released.held_reason and m.released.held_reason.startswith("3 of 10 phases")
    # again, by StudyInstanceUID: nothing changes, still success
    again = itvnode(data_dir, "release", ph.study_instance_uid)
    assert again.returncode == 0, again.stderr
    assert "already released" in again.stdout
    assert manifest(data_dir, key).history == m.history
    unknown = itvnode(data_dir, "release", "0123456789abcdef")
    assert unknown.returncode == 1 and "no study '0123456789abcdef'" in unknown.stderr

    # the node starts: its assembler queues the released study once
    asm2 = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0, expected_phases=10)
    asm2.poll_once(last + 40)
    asm2.poll_once(last + 41)
    assert manifest(data_dir, key).state == "queued"
    assert [(x["task"], x["args"]) for x in broker_messages(data_dir)] == [(TASK_SEGMENT, [key])]
    third = itvnode(data_dir, "release", key)
    assert third.returncode == 0 and "already released; now queued" in third.stdout
    table = itvnode(data_dir, "status").stdout
    assert "phases: 3 of 10 phases (released by admin)" in table


def test_release_of_a_study_that_is_not_held(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                                             embedded: Enqueuer) -> None:
    ph = phantom_dicom_factory("siemens", uid_seed="release-not-held", **SMALL)
    ingest(spool, all_files(ph))
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0, expected_phases=4)
    asm.poll_once((spool.last_received(ph.study_instance_uid) or 0) + 31)
    key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)
    assert manifest(data_dir, key).state == "queued"
    res = itvnode(data_dir, "release", key)
    assert res.returncode == 1
    assert f"study {key} is queued, not held: nothing to release" in res.stderr


def test_new_instances_after_release_are_assessed_again(phantom_dicom_factory: Factory, spool: Spool,
                                                        data_dir: Path, embedded: Enqueuer) -> None:
    ph, key, last = _three_of_ten(phantom_dicom_factory, spool, "release-late")
    asm = make_assembler(spool, data_dir, None, quiet_period=30.0, expected_phases=10)
    asm.poll_once(last + 31)
    from service.ops.admin import release_study

    assert release_study(data_dir, key)[0].changed
    ingest(spool, ph.by_percent(10.0).files)  # a late phase: other content than the one released
    last = spool.last_received(ph.study_instance_uid) or 0.0
    asm.poll_once(last + 31)
    m = manifest(data_dir, key)
    assert m.state == "held" and (m.reason or "").startswith("4 of 10 phases: 20 %")


def test_process_and_flag(phantom_dicom_factory: Factory, spool: Spool, data_dir: Path,
                          embedded: Enqueuer) -> None:
    _, key, last = _three_of_ten(phantom_dicom_factory, spool, "release-flag")
    asm = make_assembler(spool, data_dir, embedded.segment_study, quiet_period=30.0, expected_phases=10,
                         incomplete_cycle="process")
    asm.poll_once(last + 29)
    assert manifest(data_dir, key).state == "collecting"
    asm.poll_once(last + 31)
    m = manifest(data_dir, key)
    assert m.state == "queued" and m.released is None
    assert m.cycle is not None and not m.cycle.complete and m.cycle.summary() == "3 of 10 phases"
    assert "processed and flagged (incomplete_cycle: process)" in (m.history[-2].reason or "")
    assert [x["args"] for x in broker_messages(data_dir)] == [[key]]

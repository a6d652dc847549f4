"""Issue 10 with real peers (dcmtk storescu -> itvnode serve + worker -> dcmtk storescp, embedded broker):
retention and the watermark purge while a study arrives, the admin commands on a running and a stopped node,
and a study killed by Celery's hard time limit that is retried and ends ``done``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    REPO,
    Proc,
    StoreSCP,
    describe,
    free_port,
    itvnode_argv,
    manifests,
    node_env,
    port_open,
    storescu,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
SPEC = {"n_phases": 10, "shape": (8, 64, 64)}


def _node(procs: list[Proc], tmp: Path, env: dict[str, str], *, worker: bool = True) -> None:
    serve = Proc("serve", itvnode_argv("serve"), tmp, env=env, cwd=REPO)
    procs.append(serve)
    wait_for(lambda: port_open(int(env["ITVNODE_PORT"])), 60, "itvnode serve", diagnose=serve.log)
    if worker:
        argv = itvnode_argv("worker", "--queues", "inference,export", "--concurrency", "1")
        procs.append(Proc("worker", argv, tmp, env=env, cwd=REPO))


def _stop(procs: list[Proc]) -> None:
    for p in [p for p in procs if p.name in ("serve", "worker")]:
        p.stop(timeout=30)
        procs.remove(p)


def _states(data: Path) -> dict[str, str]:
    return {m["study_instance_uid"]: m["state"] for m in manifests(data)}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(itvnode_argv(*args), env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_watermark_purges_finished_work_before_0xa700_while_a_study_arrives(
    tmp_path: Path, procs: list[Proc], phantom_dicom_factory: Callable[..., Any],
) -> None:
    """A spool quota that holds two studies: the third arrives and is accepted because the oldest finished
    study is purged first (logged, counted in /metrics); the one still collecting and the newer finished one
    are kept."""
    a, b, c = (phantom_dicom_factory("siemens", uid_seed=f"wm-{n}", **SPEC) for n in "abc")
    size = _du(a.root)
    rx = StoreSCP(tmp_path / "rx", tmp_path)
    procs.append(rx.proc)
    data = tmp_path / "data"
    # the quota fits A + B + a bit, not A + B + C: without the purge the SCP must refuse C with 0xA700
    quota, floor = int(2.6 * size), int(0.2 * size)
    assert 3 * size + floor > quota
    env = node_env(data, free_port(), broker_url=None, destinations=rx.destination, sam3_dir=None, extra={
        "ITVNODE_SPOOL_MAX_BYTES": str(quota), "ITVNODE_MIN_FREE_BYTES": str(floor),
        "ITVNODE_RETENTION_FREE_BYTES": str(floor), "ITVNODE_RETENTION_INTERVAL": "3600",
        "ITVNODE_QUIET_PERIOD": "3"})
    _node(procs, tmp_path, env)
    for ph in (a, b):
        storescu(int(env["ITVNODE_PORT"]), "ITVNODE", [ph.root])
        wait_for(lambda ph=ph: _states(data).get(ph.study_instance_uid) == "done", 200, "a study done",
                 diagnose=lambda: describe(data, *procs))
    storescu(int(env["ITVNODE_PORT"]), "ITVNODE", [c.root])  # asserts rc 0: nothing refused
    serve_log = procs[1].log(200_000)
    assert "0xA700" not in serve_log and "SpoolFull" not in serve_log, serve_log[-3000:]
    states = _states(data)
    assert a.study_instance_uid not in states, states  # the oldest finished study went first
    assert states[b.study_instance_uid] == "done"
    wait_for(lambda: _states(data).get(c.study_instance_uid) == "done", 200, "the third study done",
             diagnose=lambda: describe(data, *procs))
    assert len(rx.files()) == 3
    assert "purged study key(s)" in serve_log and "(watermark)" in serve_log
    from prometheus_client import CollectorRegistry, generate_latest

    from service.ops.metrics import NodeCollector

    reg = CollectorRegistry()
    reg.register(NodeCollector(data, None))
    text = generate_latest(reg).decode()
    assert 'itvnode_purged_studies_total{reason="watermark"} 1.0' in text, text
    assert not (data / "spool" / a.study_instance_uid).exists()


def test_admin_commands_on_a_running_and_a_stopped_node(
    tmp_path: Path, procs: list[Proc], phantom_dicom_factory: Callable[..., Any],
) -> None:
    ph = phantom_dicom_factory("siemens", uid_seed="admin-1", **SPEC)
    held = phantom_dicom_factory("siemens", uid_seed="admin-2", **SPEC)
    rx = StoreSCP(tmp_path / "rx", tmp_path)
    rx2 = StoreSCP(tmp_path / "rx2", tmp_path, ae="RX2")
    procs += [rx.proc, rx2.proc]
    data = tmp_path / "data"
    env = node_env(data, free_port(), broker_url=None, destinations=rx.destination, sam3_dir=None, extra={
        "ITVNODE_QUIET_PERIOD": "3", "ITVNODE_RETENTION_INTERVAL": "3600"})
    _node(procs, tmp_path, env)
    port = int(env["ITVNODE_PORT"])
    storescu(port, "ITVNODE", [ph.root])
    storescu(port, "ITVNODE", [held.by_percent(p).folder for p in (0.0, 50.0)])
    wait_for(lambda: _states(data).get(ph.study_instance_uid) == "done"
             and _states(data).get(held.study_instance_uid) == "held", 200, "one done, one held",
             diagnose=lambda: describe(data, *procs))
    key = next(m["study_key"] for m in manifests(data) if m["study_instance_uid"] == ph.study_instance_uid)
    assert rx.store_requests() == 1

    # status names its data directory; status STUDY shows history, timings and delivery per destination
    st = _cli(env, "status", key)
    assert st.returncode == 0 and f"data directory: {data.resolve()}" in st.stdout, st.stdout + st.stderr
    assert "history:" in st.stdout and "timings (s):" in st.stdout and f"{rx.destination}" in st.stdout
    (detail,) = json.loads(_cli(env, "status", "--json", ph.study_instance_uid).stdout)
    assert [d["status"] for d in detail["deliveries"]] == ["delivered"]

    # running node: resend (configured destination, then --to another), by key and by StudyInstanceUID
    r = _cli(env, "resend", key)
    assert r.returncode == 0 and "re-sending" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: rx.store_requests() == 2 and _states(data)[ph.study_instance_uid] == "done", 60,
             "the re-send delivered", diagnose=lambda: describe(data, *procs))
    r = _cli(env, "resend", ph.study_instance_uid, "--to", rx2.destination)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: rx2.store_requests() == 1 and _states(data)[ph.study_instance_uid] == "done", 60,
             "the re-send --to delivered", diagnose=lambda: describe(data, *procs))
    # retry refuses a study that did not fail; delete removes the held one, and again is harmless
    r = _cli(env, "retry", key)
    assert r.returncode == 1 and "not failed" in r.stderr
    hkey = next(m["study_key"] for m in manifests(data) if m["study_instance_uid"] == held.study_instance_uid)
    for _ in range(2):
        r = _cli(env, "delete", hkey)
        assert r.returncode == 0, r.stdout + r.stderr
    assert held.study_instance_uid not in _states(data)
    assert not (data / "spool" / held.study_instance_uid).exists()
    time.sleep(4)  # the running assembler does not bring it back
    assert held.study_instance_uid not in _states(data)

    # stopped node: a failed study retried (twice: the second changes nothing), a resend queued in the outbox
    _stop(procs)
    from service.store.manifest import manifest_path, set_state, update_manifest

    update_manifest(manifest_path(data, key), lambda m: set_state(m, "failed", "inference: CUDA error"))
    for expect in ("will be processed again", "already retried"):
        r = _cli(env, "retry", key)
        assert r.returncode == 0 and expect in r.stdout, r.stdout + r.stderr
    _node(procs, tmp_path, env)
    wait_for(lambda: _states(data).get(ph.study_instance_uid) == "done" and rx.store_requests() == 3, 200,
             "the retried study done", diagnose=lambda: describe(data, *procs))
    hist = [h["reason"] or "" for h in manifests(data)[0]["history"]]
    assert any(h.startswith("retry by admin (was failed: inference: CUDA error)") for h in hist)
    _stop(procs)
    r = _cli(env, "resend", key, "--to", rx2.destination)
    assert r.returncode == 0, r.stdout + r.stderr
    _node(procs, tmp_path, env)
    wait_for(lambda: rx2.store_requests() == 2, 60, "the re-send queued while stopped delivered",
             diagnose=lambda: describe(data, *procs))

    # purge: dry run removes nothing; then the finished study goes (running node); again: nothing to do
    wait_for(lambda: _states(data).get(ph.study_instance_uid) == "done", 60, "done again")
    r = _cli(env, "purge", "--older-than", "0", "--dry-run")
    assert r.returncode == 0 and f"would purge {key}" in r.stdout, r.stdout + r.stderr
    assert ph.study_instance_uid in _states(data)
    r = _cli(env, "purge", "--older-than", "0")
    assert r.returncode == 0 and f"purged {key}" in r.stdout, r.stdout + r.stderr
    assert _states(data) == {} and not (data / "spool" / ph.study_instance_uid).exists()
    r = _cli(env, "purge", "--older-than", "0")
    assert r.returncode == 0 and "nothing finished" in r.stdout
    stats = json.loads((data / "retention.json").read_text())
    assert stats["studies"]["admin"] == 1 and stats["studies"]["delete"] == 1 and stats["bytes"]["admin"] > 0
    # stopped node: purge and delete of what is gone are harmless
    _stop(procs)
    assert _cli(env, "purge", "--older-than", "0").returncode == 0
    assert _cli(env, "delete", key).returncode == 0


def test_hard_time_limit_kill_is_retried_then_done(
    tmp_path: Path, procs: list[Proc], phantom_dicom_factory: Callable[..., Any],
) -> None:
    """The inference pool process is frozen mid-study (SIGSTOP) until Celery's hard time limit kills it;
    the reconciler sees the study without heartbeat and re-queues it; the next attempt ends ``done``."""
    ph = phantom_dicom_factory("siemens", uid_seed="tlimit", **SPEC)
    rx = StoreSCP(tmp_path / "rx", tmp_path)
    procs.append(rx.proc)
    data = tmp_path / "data"
    env = node_env(data, free_port(), broker_url=None, destinations=rx.destination, sam3_dir=None, extra={
        "ITVNODE_QUIET_PERIOD": "3", "ITVNODE_INFERENCE_SOFT_TIME_LIMIT": "40",
        "ITVNODE_TIME_LIMIT_GRACE": "2", "ITVNODE_HEARTBEAT_INTERVAL": "0.5",
        "ITVNODE_HEARTBEAT_TIMEOUT": "45", "ITVNODE_RECONCILE_INTERVAL": "1",
        "ITVNODE_RECONCILE_BACKOFF": "1"})
    _node(procs, tmp_path, env)
    worker = procs[-1]
    storescu(int(env["ITVNODE_PORT"]), "ITVNODE", [ph.root])
    m = wait_for(lambda: next((m for m in manifests(data) if m["state"] == "processing"
                               and (m.get("results") or {}).get("worker", {}).get("pid")), None), 120,
                 "the study processing", interval=0.05, diagnose=lambda: describe(data, *procs))
    pid = int(m["results"]["worker"]["pid"])
    os.kill(pid, signal.SIGSTOP)  # frozen: neither the soft limit nor the heartbeat can run
    wait_for(lambda: "Hard time limit" in worker.log(200_000), 90, "Celery's hard time limit",
             diagnose=lambda: worker.log())
    wait_for(lambda: manifests(data)[0]["state"] == "done", 200, "the study done after the retry",
             diagnose=lambda: describe(data, *procs))
    hist = manifests(data)[0]["history"]
    states = [h["state"] for h in hist]
    i = states.index("processing")
    assert states[i + 1] == "queued" and "reconcile:" in (hist[i + 1]["reason"] or ""), hist
    assert "processing" in states[i + 2:] and states[-1] == "done"
    assert len(rx.files()) == 1

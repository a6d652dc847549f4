"""Stuck studies end (issue 9 item 8): /health reports them, the reconciler re-queues them, a real Celery
worker finishes them. Brokers: the embedded one, and a real Redis that loses its queue (a restart without
persistence, simulated by FLUSHDB)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.intake.queue import Enqueuer, queued_study_keys
from service.ops.http_server import HealthServer, HealthServerConfig
from service.ops.reconcile import REASON_PREFIX, ReconcilePolicy, Reconciler, heartbeat_path
from service.store.manifest import load_manifest, manifest_path, set_state, update_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

POLICY = ReconcilePolicy(interval=1, heartbeat_interval=0.5, heartbeat_timeout=3, hard_time_limit=600,
                         queued_lost_after=1, max_attempts=2, backoff=1)
REDIS_DB = 14


def _health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def node_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    def apply(data_dir: Path) -> None:
        monkeypatch.setenv("ITVNODE_DATA_DIR", str(data_dir))
        monkeypatch.setenv("ITVNODE_DESTINATIONS", "")
        monkeypatch.setenv("ITVNODE_HEARTBEAT_INTERVAL", "0.5")
        monkeypatch.setenv("ITVNODE_DEVICE", "cpu")
        for k in ("ITVNODE_BROKER_URL", "ITVNODE_CONFIG", "ITVNODE_SAM3_DIR", "ITVNODE_ADAPTER_DIR"):
            monkeypatch.delenv(k, raising=False)

    return apply


@pytest.fixture
def redis_url() -> Iterator[str]:
    import redis

    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex(("127.0.0.1", 6379)) != 0:
            pytest.fail("Redis on 127.0.0.1:6379 is not running (run tests/peers.sh)")
    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def _run_worker_until_done(broker_url: str | None, data_dir: Path, key: str) -> dict[str, Any]:
    from celery.contrib.testing.worker import start_worker

    from worker.celery_app import create_app

    app = create_app(broker_url, data_dir, include=["worker.tasks"], main="itvnode-reconcile-test")
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        _wait(lambda: load_manifest(manifest_path(data_dir, key)).state == "done", 120, "the study done")
    return load_manifest(manifest_path(data_dir, key)).model_dump()


def test_processing_left_by_a_hard_time_limit_kill_is_requeued_and_finished(
    assembled: tuple[Path, str, Any], node_env: Callable[[Path], None],
) -> None:
    data_dir, key, _series = assembled
    node_env(data_dir)
    path = manifest_path(data_dir, key)

    def killed(m: Any) -> Any:  # what Celery's hard time limit leaves: processing, message acked, no task
        set_state(m, "processing")
        m.task_id = "killed-task"
        m.results = {"started_at": time.time() - 900, "worker": {"node": "gone@host", "boot": "x"}}
        return m

    update_manifest(path, killed)
    server = HealthServer("127.0.0.1", 0, HealthServerConfig(data_dir, None, reconcile=POLICY)).start()
    enqueuer = Enqueuer(None, data_dir)
    try:
        code, report = _health(server.port)
        assert code == 503 and report["checks"]["studies"]["ok"] is False, report
        assert key in report["checks"]["studies"]["detail"]
        assert "hard time limit" in report["checks"]["studies"]["detail"]

        rec = Reconciler(data_dir, enqueuer.segment_study, POLICY)
        assert rec.run_once() == [(key, "queued")]
        assert key in queued_study_keys(None, data_dir)  # the new message is in the embedded broker
        assert _health(server.port)[0] == 200

        m = _run_worker_until_done(None, data_dir, key)
        assert "killed-task" in m["results"]["task_ids"]
        assert heartbeat_path(data_dir, key).is_file()  # the worker's task kept a heartbeat while running
        reasons = [h["reason"] or "" for h in m["history"]]
        assert any(r.startswith(REASON_PREFIX) and "hard time limit" in r for r in reasons)
        assert rec.run_once() == []
        code, report = _health(server.port)
        assert code == 200 and report["checks"]["studies"]["ok"], report
    finally:
        enqueuer.close()
        server.stop()


def test_queued_study_whose_redis_message_was_lost_is_requeued_and_finished(
    tmp_path: Path, phantom_dicom_factory: Callable[..., Any], redis_url: str,
    node_env: Callable[[Path], None],
) -> None:
    import redis

    from service.intake.assembler import Assembler
    from service.store.header_scan import meta_from_bytes
    from service.store.spool import Spool

    series = phantom_dicom_factory("siemens", with_avg=True)
    data_dir = tmp_path / "data"
    node_env(data_dir)
    enqueuer = Enqueuer(redis_url, data_dir)
    spool = Spool(data_dir / "spool", fsync=False)
    server = HealthServer("127.0.0.1", 0, HealthServerConfig(data_dir, redis_url, reconcile=POLICY)).start()
    try:
        for f in series.all_files():
            encoded = f.read_bytes()
            spool.store(meta_from_bytes(encoded), encoded)
        Assembler(spool, data_dir, enqueuer.segment_study, quiet_period=0.0, expected_phases=None,
                  settle=0.0).poll_once(time.time() + 1.0)
        (key,) = [p.parent.name for p in (data_dir / "studies").glob("*/manifest.json")]
        assert load_manifest(manifest_path(data_dir, key)).state == "queued"
        assert queued_study_keys(redis_url, data_dir) == {key}  # the message is in Redis' inference list

        client = redis.Redis.from_url(redis_url)
        client.flushdb()  # Redis restarted without persistence: the message is gone, the study says queued
        client.close()
        assert queued_study_keys(redis_url, data_dir) == set()
        time.sleep(POLICY.queued_lost_after + 0.2)
        code, report = _health(server.port)
        assert code == 503 and key in report["checks"]["studies"]["detail"], report
        assert "no message" in report["checks"]["studies"]["detail"]

        rec = Reconciler(data_dir, enqueuer.segment_study, POLICY, broker_url=redis_url)
        assert rec.run_once() == []  # seen lost once: confirmed on the next pass
        assert rec.run_once() == [(key, "queued")]
        assert queued_study_keys(redis_url, data_dir) == {key}

        m = _run_worker_until_done(redis_url, data_dir, key)
        assert any((h["reason"] or "").startswith(REASON_PREFIX) for h in m["history"])
        assert _health(server.port)[0] == 200
    finally:
        server.stop()
        spool.close()
        enqueuer.close()

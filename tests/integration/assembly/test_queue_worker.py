"""The enqueued job consumed by a real Celery worker process, through the embedded broker and through Redis.

The worker runs ``tests/integration/assembly/assembly_celery_app.py``: the production configuration
(``worker.celery_app.create_app`` and ``worker_argv``) with a small task registered under the production name
``itvnode.segment_study`` that records the study key it received.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from assembly_helpers import SMALL, all_files, broker_messages, ingest, make_assembler, manifest

from service.intake.queue import QUEUE_INFERENCE, Enqueuer, prune_embedded_broker
from service.store.manifest import study_key
from service.store.spool import Spool
from worker.celery_app import create_app, worker_argv

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
REDIS_DB = int(os.environ.get("ITVNODE_TEST_REDIS_DB", "13"))
WAIT_S = 90.0  # bounded: a cold worker on a busy 2-core machine takes a few seconds

Factory = Callable[..., Any]


class Worker:
    """A real ``celery worker`` subprocess on the test app."""

    def __init__(self, data_dir: Path, broker: str | None, record: Path, name: str, prefix: str = "") -> None:
        app = create_app(broker, data_dir, include=[])
        argv = worker_argv(app, [QUEUE_INFERENCE], 1, hostname=f"{name}@%h")
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{HERE}", ITVNODE_TEST_BROKER=broker or "",
                   ITVNODE_TEST_DATA_DIR=str(data_dir), ITVNODE_TEST_RECORD=str(record),
                   ITVNODE_TEST_KEYPREFIX=prefix)
        self.log = data_dir / f"{name}.log"
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "assembly_celery_app", *argv],
                                     cwd=REPO, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._fh.close()


def wait_for_lines(record: Path, n: int, workers: list[Worker]) -> list[str]:
    deadline = time.monotonic() + WAIT_S
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = record.read_text().split("\n")[:-1] if record.exists() else []
        if len(lines) >= n:
            time.sleep(0.5)  # let a duplicate delivery show up if there were one
            return record.read_text().split("\n")[:-1]
        for w in workers:
            assert w.proc.poll() is None, f"worker exited: {w.log.read_text()[-3000:]}"
        time.sleep(0.2)
    logs = "\n".join(w.log.read_text()[-2000:] for w in workers)
    raise AssertionError(f"only {len(lines)} of {n} jobs consumed in {WAIT_S} s\n{logs}")


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:  # warm shutdown of all at once, then wait
        w.terminate()
    for w in started:
        w.stop()


def _assemble_one(factory: Factory, data_dir: Path, enqueuer: Enqueuer, seed: str) -> str:
    ph = factory("siemens", uid_seed=seed, **SMALL)
    spool = Spool(data_dir / "spool", fsync=False)
    try:
        ingest(spool, all_files(ph))
        asm = make_assembler(spool, data_dir, enqueuer.segment_study)
        asm.poll_once((spool.last_received(ph.study_instance_uid) or 0) + 3)
    finally:
        spool.close()
    key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)
    assert manifest(data_dir, key).state == "queued"
    return key


@pytest.mark.slow
def test_embedded_broker_job_consumed_by_real_worker(phantom_dicom_factory: Factory, data_dir: Path,
                                                     workers: list[Worker]) -> None:
    record = data_dir / "record.txt"
    enqueuer = Enqueuer(None, data_dir)
    try:
        key = _assemble_one(phantom_dicom_factory, data_dir, enqueuer, "worker-embedded")
    finally:
        enqueuer.close()
    workers.append(Worker(data_dir, None, record, "w-embedded"))
    lines = wait_for_lines(record, 1, workers)
    assert [ln.split()[0] for ln in lines] == [key]
    assert lines[0].split()[1] == manifest(data_dir, key).task_id
    delivered = [m for m in broker_messages(data_dir) if not m["visible"]]
    assert [m["args"] for m in delivered] == [[key]]
    assert prune_embedded_broker(data_dir, older_than_s=7 * 86400) == 0  # too recent to prune
    assert prune_embedded_broker(data_dir, older_than_s=-60) == 1
    assert broker_messages(data_dir) == []


@pytest.mark.slow
def test_redis_job_consumed_by_real_worker(phantom_dicom_factory: Factory, data_dir: Path,
                                           workers: list[Worker]) -> None:
    redis = pytest.importorskip("redis")
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379 (tests/peers.sh starts one)")
    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    prefix = f"itvnode-test-{os.getpid()}-{time.monotonic_ns()}:"  # isolates this run inside the shared DB
    record = data_dir / "record.txt"
    enqueuer = Enqueuer(url, data_dir, broker_transport_options={"global_keyprefix": prefix})
    try:
        key = _assemble_one(phantom_dicom_factory, data_dir, enqueuer, "worker-redis")
        assert client.llen(prefix + QUEUE_INFERENCE) == 1  # the message really is in Redis
        workers.append(Worker(data_dir, url, record, "w-redis", prefix))
        lines = wait_for_lines(record, 1, workers)
        assert [ln.split()[0] for ln in lines] == [key]
        assert client.llen(prefix + QUEUE_INFERENCE) == 0
    finally:
        enqueuer.close()
        for w in workers:
            w.stop()
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    assert not (data_dir / "broker").exists() or not any((data_dir / "broker").iterdir())


@pytest.mark.slow
def test_embedded_broker_two_workers_exactly_once_and_crash_requeue(data_dir: Path,
                                                                    workers: list[Worker]) -> None:
    """Two worker processes share the SQLite broker: every job runs once; a job whose pool process dies is
    re-delivered (acks_late + reject_on_worker_lost) and runs to the end."""
    record = data_dir / "record.txt"
    enqueuer = Enqueuer(None, data_dir)
    keys = [f"{i:016x}" for i in range(12)]
    try:
        for k in keys:
            enqueuer.segment_study(k)
        enqueuer._app.send_task("itvnode.test_crash_once", args=[str(data_dir / "crash.flag")],
                                queue=QUEUE_INFERENCE)
    finally:
        enqueuer.close()
    workers.append(Worker(data_dir, None, record, "w1"))
    workers.append(Worker(data_dir, None, record, "w2"))
    lines = wait_for_lines(record, len(keys) + 1, workers)
    got = [ln.split()[0] for ln in lines]
    assert sorted(got) == sorted([*keys, "crash-once"]), got
    assert (data_dir / "crash.flag").exists()
    logs = (data_dir / "w1.log").read_text() + (data_dir / "w2.log").read_text()
    assert "segment_study" in logs


@pytest.mark.slow
def test_itvnode_worker_command_starts_and_stops(tmp_path: Path) -> None:
    """``itvnode worker`` on the embedded broker: consumes the asked queue, stops on SIGTERM."""
    env = dict(os.environ, ITVNODE_DATA_DIR=str(tmp_path))
    env.pop("ITVNODE_CONFIG", None)
    env.pop("ITVNODE_BROKER_URL", None)
    log = tmp_path / "worker.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "itvnode.cli", "worker", "--queues", "export"],
                                cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline and b" ready." not in log.read_bytes():
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
            text = log.read_text()
            assert " ready." in text, text[-3000:]
            assert "export" in text and "sqla+sqlite:///" in text and "--without" not in text
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    assert (tmp_path / "broker" / "broker.sqlite").exists()
    bad = subprocess.run([sys.executable, "-m", "itvnode.cli", "worker", "--queues", "bogus"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown queue" in bad.stderr

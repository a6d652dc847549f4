"""The Celery configuration the node runs with (the behaviour is exercised in test_queue_worker.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.intake.queue import (
    QUEUE_EXPORT,
    QUEUE_INFERENCE,
    TASK_EXPORT,
    TASK_FINISH_STUDY,
    TASK_SEGMENT,
    TASK_SEGMENT_PHASES,
    celery_config,
    embedded_broker_path,
    prune_embedded_broker,
    queued_study_keys,
)
from worker.celery_app import create_app, worker_argv

REPO = Path(__file__).resolve().parents[3]


def test_embedded_config(tmp_path: Path) -> None:
    conf = celery_config(None, tmp_path, inference_soft_time_limit=100, export_soft_time_limit=10)
    assert conf["broker_url"] == f"sqla+sqlite:///{embedded_broker_path(tmp_path)}"
    assert embedded_broker_path(tmp_path).parent.is_dir()
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["accept_content"] == ["json"]
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_routes"][TASK_SEGMENT] == {"queue": QUEUE_INFERENCE}
    assert conf["task_routes"][TASK_EXPORT] == {"queue": QUEUE_EXPORT}
    assert conf["task_annotations"][TASK_SEGMENT] == {"soft_time_limit": 100, "time_limit": 400}
    assert conf["task_annotations"][TASK_EXPORT] == {"soft_time_limit": 10, "time_limit": 310}
    assert conf["worker_enable_remote_control"] is False
    assert conf["task_ignore_result"] is True


def test_split_studies_get_a_result_backend_for_their_chord(tmp_path: Path) -> None:
    """phase_groups > 1: the chord needs a result backend; the explicit setting wins."""
    assert celery_config(None, tmp_path)["result_backend"] is None
    conf = celery_config(None, tmp_path, phase_groups=2, inference_soft_time_limit=100)
    results = embedded_broker_path(tmp_path).parent / "results.sqlite"
    assert conf["result_backend"] == f"db+sqlite:///{results}"
    for task in (TASK_SEGMENT_PHASES, TASK_FINISH_STUDY):
        assert conf["task_routes"][task] == {"queue": QUEUE_INFERENCE}
        assert conf["task_annotations"][task] == {"soft_time_limit": 100, "time_limit": 400}
    redis = "redis://127.0.0.1:6379/5"
    assert celery_config(redis, tmp_path, phase_groups=2)["result_backend"] == redis
    assert celery_config(redis, tmp_path, phase_groups=2, result_backend="redis://x/1")["result_backend"] == \
        "redis://x/1"
    with pytest.raises(ValueError, match="result_backend"):
        celery_config("amqp://guest@127.0.0.1//", tmp_path, phase_groups=2)


def test_the_broker_knows_a_split_studys_waiting_tasks(tmp_path: Path) -> None:
    """The reconciler leaves a split study alone while its tasks wait: it finds their study keys (a chord
    body carries the groups' results first)."""
    app = create_app(None, tmp_path, include=[], main="itvnode-keys-test")
    try:
        app.send_task(TASK_SEGMENT_PHASES, args=["k-group", "run-1", [0, 1]], queue=QUEUE_INFERENCE)
        app.send_task(TASK_FINISH_STUDY, args=[[{"phases": [0]}], "k-finish", "run-1"], queue=QUEUE_INFERENCE)
        app.send_task(TASK_EXPORT, args=["item-1"], queue=QUEUE_EXPORT)
        assert queued_study_keys(None, tmp_path) == {"k-group", "k-finish"}
    finally:
        app.close()


def test_redis_config(tmp_path: Path) -> None:
    conf = celery_config("redis://127.0.0.1:6379/5", tmp_path, inference_soft_time_limit=3600,
                         broker_transport_options={"global_keyprefix": "a:"})
    assert conf["broker_url"] == "redis://127.0.0.1:6379/5"
    # a running study must never be re-delivered while it runs
    assert conf["broker_transport_options"] == {"visibility_timeout": 3600 + 300 + 600,
                                                "global_keyprefix": "a:"}
    assert not (tmp_path / "broker").exists()


def test_worker_argv(tmp_path: Path) -> None:
    embedded = create_app(None, tmp_path, include=[])
    argv = worker_argv(embedded, ["inference"], 1)
    assert argv[:4] == ["worker", "--queues", "inference", "--concurrency"]
    assert {"--without-gossip", "--without-mingle", "--without-heartbeat"} <= set(argv)
    redis = create_app("redis://127.0.0.1:6379/5", tmp_path, include=[])
    argv = worker_argv(redis, ["inference", "export"], 2)
    assert "inference,export" in argv and "--without-mingle" not in argv
    assert [q.name for q in redis.conf.task_queues] == ["inference", "export"]
    with pytest.raises(ValueError, match="unknown queue"):
        worker_argv(redis, ["gpu"], 1)


def test_module_app_reads_settings_lazily(tmp_path: Path) -> None:
    code = ("import os, sys; from worker.celery_app import app; d = sys.argv[1]; "
            "a = os.path.exists(os.path.join(d, 'broker')); u = app.conf.broker_url; "
            "print(a, os.path.exists(os.path.join(d, 'broker')), u)")
    env = dict(os.environ, ITVNODE_DATA_DIR=str(tmp_path / "d"), PYTHONPATH=str(REPO))
    env.pop("ITVNODE_BROKER_URL", None)
    env.pop("ITVNODE_CONFIG", None)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    before, after, url = out.stdout.split()
    assert (before, after) == ("False", "True")  # importing created nothing; configuring did
    assert url.startswith("sqla+sqlite:///") and url.endswith("/d/broker/broker.sqlite")


def test_prune_embedded_broker_without_broker(tmp_path: Path) -> None:
    assert prune_embedded_broker(tmp_path) == 0

"""service.ops.health (HTTP /health, /metrics from data_dir state), itvnode health, and worker orphan
recovery."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from itvnode.cli import main
from service.intake.queue import Enqueuer
from service.ops.health import check_health, queue_depths, resolve_broker_url
from service.ops.http_server import HealthServer, HealthServerConfig
from service.store.manifest import load_manifest, manifest_path, set_state, update_manifest
from worker.tasks import recover_orphans


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_and_metrics_over_http(assembled: tuple[Path, str, Any]) -> None:
    from service.setting_values import Destination
    from service.settings import load_settings
    from worker.engine_settings import LoadedSegmenter, engine_config
    from worker.pipeline import process_study

    data_dir, key, series = assembled
    enq = Enqueuer(None, data_dir)
    enq.export_item("item-1")
    enq.close()
    server = HealthServer("127.0.0.1", 0, HealthServerConfig(data_dir, None)).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        code, body = _get(f"{base}/health")
        assert code == 200, body
        report = json.loads(body)
        assert report["status"] == "ok"
        assert set(report["checks"]) == {"data_dir", "broker", "studies", "model"}

        # a computed study waiting for its (unreachable) destination
        cfg = engine_config(load_settings(sam3_dir=None))
        process_study(key, data_dir, cfg, LoadedSegmenter(None, "SAM 3 unavailable: test"),
                      [Destination.parse("RX@127.0.0.1:1")])
        code, metrics = _get(f"{base}/metrics")
        assert code == 200
        assert 'itvnode_studies{state="exporting"} 1.0' in metrics
        assert 'itvnode_outbox_items{state="pending"} 2.0' in metrics  # the RTSTRUCT and the QA report
        assert "itvnode_export_failures_total 0.0" in metrics
        assert 'itvnode_stage_duration_seconds_count{stage="rtstruct"} 1.0' in metrics
        assert f"itvnode_instances_received_total {len(series.all_files())}.0" in metrics
        assert 'itvnode_queue_depth{queue="export"} 1.0' in metrics
        assert "itvnode_broker_up 1.0" in metrics
        n = len(series.phases)  # the assembled phantom covers its cycle
        assert f'itvnode_study_phases{{kind="used",study_key="{key}"}} {n}.0' in metrics
        assert f'itvnode_study_phases{{kind="expected",study_key="{key}"}} {n}.0' in metrics
        assert "itvnode_studies_released 0.0" in metrics
        assert "# TYPE itvnode_qa_warnings gauge" in metrics

        def finished(m: Any) -> Any:
            set_state(m, "done")
            m.results["timings"] = {"load": 0.5, "inference": 42.0, "rtstruct": 2.0}
            return m

        update_manifest(manifest_path(data_dir, key), finished)
        metrics = _get(f"{base}/metrics")[1]
        assert "itvnode_studies_completed_total 1.0" in metrics
        assert 'itvnode_studies{state="done"} 1.0' in metrics
        assert 'itvnode_stage_duration_seconds_bucket{le="60.0",stage="inference"} 1.0' in metrics
        assert 'itvnode_stage_duration_seconds_bucket{le="30.0",stage="inference"} 0.0' in metrics
        assert _get(f"{base}/nothing")[0] == 404
    finally:
        server.stop()


def test_health_fails_with_unreachable_broker(tmp_path: Path) -> None:
    server = HealthServer("127.0.0.1", 0, HealthServerConfig(tmp_path, "redis://127.0.0.1:1/0")).start()
    try:
        code, body = _get(f"http://127.0.0.1:{server.port}/health")
        assert code == 503
        report = json.loads(body)
        assert report["checks"]["broker"]["ok"] is False and report["checks"]["data_dir"]["ok"] is True
        code, metrics = _get(f"http://127.0.0.1:{server.port}/metrics")
        assert code == 200 and "itvnode_broker_up 0.0" in metrics
    finally:
        server.stop()


def test_health_low_disk_and_dicom_echo_failures(tmp_path: Path) -> None:
    report = check_health(tmp_path, None, min_free_bytes=1 << 62, dicom=("127.0.0.1", 1, "ITVNODE"),
                          timeout=2)
    assert not report.ok
    assert "below" in report.checks["data_dir"]["detail"]
    assert report.checks["dicom"]["ok"] is False


def test_queue_depth_of_redis(tmp_path: Path) -> None:
    import redis

    url = "redis://127.0.0.1:6379/6"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        enq = Enqueuer(url, tmp_path)
        enq.segment_study("abc")
        enq.close()
        assert queue_depths(url) == {"inference": 1, "export": 0}
    finally:
        client.flushdb()
        client.close()


def test_health_command_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ITVNODE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ITVNODE_MIN_FREE_BYTES", "0")
    monkeypatch.delenv("ITVNODE_BROKER_URL", raising=False)
    assert main(["health"]) == 0
    assert "ok   broker" in capsys.readouterr().out
    monkeypatch.setenv("ITVNODE_BROKER_URL", "redis://127.0.0.1:1/0")
    assert main(["health", "--timeout", "1", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "fail"
    assert resolve_broker_url(None, tmp_path).startswith("sqla+sqlite:///")


def test_orphan_recovery_requeues_only_earlier_incarnations(assembled: tuple[Path, str, Any]) -> None:
    data_dir, key, _ = assembled
    path = manifest_path(data_dir, key)

    def processing(m: Any) -> Any:
        set_state(m, "processing")
        m.task_id = "killed-task"
        m.results = {"worker": {"node": "inference@host", "boot": "boot-1", "pid": 1}}
        return m

    update_manifest(path, processing)
    sent: list[str] = []
    assert recover_orphans(data_dir, "inference@host", "boot-1", sent.append) == []  # still alive: same boot
    assert recover_orphans(data_dir, "other@host", "boot-2", sent.append) == []  # another node's job
    assert recover_orphans(data_dir, "inference@host", "boot-2", sent.append) == [key]
    assert sent == [key]
    m = load_manifest(path)
    assert m.state == "queued" and "re-queued" in (m.reason or "")
    assert m.results["task_ids"] == ["killed-task"]  # a late re-delivery of the killed task does nothing


def test_health_dicom_echoes_the_configured_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An SCP bound to one address (ITVNODE_HOST) is C-ECHOed there, not on 127.0.0.1."""
    from service.net.scp import StorageSCP
    from service.store.spool import Spool

    spool = Spool(tmp_path / "spool", fsync=False)
    scp = StorageSCP(spool, host="127.0.0.2", port=0)
    port = scp.start()
    try:
        monkeypatch.setenv("ITVNODE_DATA_DIR", str(tmp_path))
        monkeypatch.setenv("ITVNODE_MIN_FREE_BYTES", "0")
        monkeypatch.setenv("ITVNODE_HOST", "127.0.0.2")
        monkeypatch.setenv("ITVNODE_PORT", str(port))
        monkeypatch.delenv("ITVNODE_BROKER_URL", raising=False)
        assert main(["health", "--dicom", "--timeout", "2"]) == 0, capsys.readouterr().out
        assert f"ok   dicom: C-ECHO to ITVNODE@127.0.0.2:{port} ok" in capsys.readouterr().out
    finally:
        scp.stop()
        spool.close()

"""``itvnode.export_item`` on a real Celery worker (embedded SQLite broker): retry, then delivered."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service.setting_values import Destination
from service.store.outbox import Outbox, RetryPolicy


@pytest.mark.slow
def test_export_task_retries_on_a_real_worker(tmp_path: Path, ct_files, storescp,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.contrib.testing.worker import start_worker

    from worker.celery_app import create_app
    from worker.export_task import TASK_EXPORT, run_sweep

    data_dir = tmp_path / "data"
    monkeypatch.setenv("ITVNODE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("ITVNODE_AE_TITLE", "ITVNODE_TEST")
    monkeypatch.setenv("ITVNODE_EXPORT_RETRY_BASE", "1")
    monkeypatch.setenv("ITVNODE_EXPORT_RETRY_MAX_DELAY", "1")
    monkeypatch.delenv("ITVNODE_BROKER_URL", raising=False)
    monkeypatch.delenv("ITVNODE_CONFIG", raising=False)

    scp = storescp(start=False)
    policy = RetryPolicy(base=1, max_delay=1, horizon=3600)
    box = Outbox(data_dir / "outbox", policy)
    item = box.put(ct_files(2), [Destination.parse(scp.address)])

    app = create_app(None, data_dir, include=["worker.export_task"], main="itvnode-export-test")
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        app.send_task(TASK_EXPORT, args=[item.item_id], queue="export")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and box.get(item.item_id).enqueued_for is None:
            time.sleep(0.05)  # the first attempt is recorded, then its retry scheduled
        st = box.get(item.item_id).destinations[scp.address]
        assert st.attempts == 1 and st.status == "pending", st
        assert box.get(item.item_id).enqueued_for == st.next_attempt_at  # the task scheduled its retry
        scp.start()
        while (time.monotonic() < deadline
               and box.get(item.item_id).destinations[scp.address].status == "pending"):
            time.sleep(0.1)
    st = box.get(item.item_id).destinations[scp.address]
    assert st.status == "delivered" and st.attempts == 2
    assert len(scp.received()) == 2
    assert run_sweep(data_dir, policy, lambda _i: None) == []

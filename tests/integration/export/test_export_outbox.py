"""Durable outbox + delivery: retries with backoff, dead letters, restarts, independent destinations."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from export_peers import ABORT, dataset_bytes
from pydicom import dcmread

from service.net.scu import Timeouts, deliver_item
from service.setting_values import Destination
from service.store.outbox import Outbox, RetryPolicy

AE = "ITVNODE_TEST"
REPO = Path(__file__).resolve().parents[3]
FAST = Timeouts(connect=2.0, acse=3.0, dimse=10.0, network=10.0)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, not listening) for the test's duration."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def uids(paths: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_retry_policy_doubles_and_caps() -> None:
    p = RetryPolicy(base=30, max_delay=100, horizon=3600)
    assert [p.delay(n) for n in range(1, 6)] == [30, 60, 100, 100, 100]
    with pytest.raises(ValueError):
        RetryPolicy(base=0)


def test_put_is_durable_and_idempotent(tmp_path: Path, ct_files) -> None:
    files = ct_files(3)
    box = Outbox(tmp_path / "outbox")
    dest = Destination.parse("PACS@127.0.0.1:104")
    item = box.put(files, [dest], study_key="abc123", now=1000.0)
    again = box.put(files, [dest], study_key="abc123", now=2000.0)
    assert again.item_id == item.item_id and again.created_at == 1000.0
    assert box.item_ids() == [item.item_id]
    assert list((tmp_path / "outbox" / "tmp").iterdir()) == []
    stored = box.files(item)
    assert sorted(p.read_bytes() for p in stored) == sorted(p.read_bytes() for p in files)
    on_disk = json.loads((box.item_dir(item.item_id) / "item.json").read_text())
    st = on_disk["destinations"][str(dest)]
    assert st["status"] == "pending" and st["attempts"] == 0 and st["next_attempt_at"] == 1000.0
    assert on_disk["horizon_at"] == 1000.0 + 24 * 3600
    # another destination set is another item
    assert box.put(files, [Destination.parse("TPS@127.0.0.1:105")]).item_id != item.item_id
    with pytest.raises(ValueError):
        box.put([files[0], files[0]], [dest])


def test_put_datasets_writes_part10_files(tmp_path: Path, ct_files) -> None:
    ds = dcmread(ct_files(1)[0])
    box = Outbox(tmp_path / "outbox")
    item = box.put_datasets([ds], [Destination.parse("PACS@127.0.0.1:104")])
    (path,) = box.files(item)
    assert dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert item.files[0].sop_instance_uid == ds.SOPInstanceUID


def test_down_destination_retries_with_backoff_then_dead_letter_at_horizon(
        tmp_path: Path, ct_files, refused_port: int) -> None:
    files = ct_files(2)
    box = Outbox(tmp_path / "outbox", RetryPolicy(base=10, max_delay=40, horizon=100))
    key = f"DOWN@127.0.0.1:{refused_port}"
    item = box.put(files, [Destination.parse(key)], now=0.0)
    seen = []
    now = 0.0
    for _ in range(10):  # bounded: the horizon ends it after 6 attempts
        assert deliver_item(box, item.item_id, AE, now=now - 0.001, timeouts=FAST) == {}  # not due yet
        states = deliver_item(box, item.item_id, AE, now=now, timeouts=FAST)
        st = states[key]
        seen.append((st.attempts, st.status, st.next_attempt_at))
        assert st.last_error is not None and "connection refused" in st.last_error
        if st.status == "dead":
            break
        now = st.next_attempt_at
    # 0 -> 10 -> 30 -> 70 -> 100 (capped by the horizon) -> dead
    assert [s[2] for s in seen[:-1]] == [10.0, 30.0, 70.0, 100.0]
    assert seen[-1][:2] == (5, "dead")
    (reason_file,) = box.dead_letters()
    reason = json.loads(reason_file.read_text())
    assert reason["destination"] == key and reason["attempts"] == 5
    assert "horizon" in reason["reason"] and "connection refused" in reason["reason"]
    dead_files = sorted((reason_file.parent / "files").iterdir())
    assert uids(dead_files) == uids(files)
    assert reason["resend"].startswith("itvnode send ")
    # finished: the item left items/, its record stays in done/, delivering again is a no-op
    assert box.item_ids() == []
    assert box.get(item.item_id).destinations[key].status == "dead"
    assert deliver_item(box, item.item_id, AE, now=1e9) == {}


def test_destination_down_then_up_is_delivered(tmp_path: Path, ct_files, storescp) -> None:
    files = ct_files(3)
    scp = storescp(start=False)
    box = Outbox(tmp_path / "outbox", RetryPolicy(base=5, max_delay=60, horizon=3600))
    item = box.put(files, [Destination.parse(scp.address)], now=100.0)
    st = deliver_item(box, item.item_id, AE, now=100.0, timeouts=FAST)[scp.address]
    assert st.status == "pending" and st.attempts == 1 and st.next_attempt_at == 105.0
    assert "connection refused" in (st.last_error or "")
    scp.start()  # the destination comes back
    assert box.due(now=104.0) == [] and box.due(now=105.0) == [(item.item_id, scp.address)]
    ran: list[str] = []

    def enqueue(item_id: str) -> None:
        ran.append(item_id)
        deliver_item(box, item_id, AE, now=105.0, timeouts=FAST)

    assert box.sweep(enqueue, now=105.0) == [item.item_id]
    final = box.get(item.item_id).destinations[scp.address]
    assert final.status == "delivered" and final.attempts == 2 and final.last_error is None
    got = scp.received()
    assert uids(got) == uids(files) and len(got) == 3
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in got}
    for f in files:
        uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(by_uid[uid]) == dataset_bytes(f)
    # delivered: more sweeps and deliveries are no-ops
    assert box.sweep(enqueue, now=1e9) == [] and deliver_item(box, item.item_id, AE, force=True) == {}
    assert len(scp.received()) == 3


_FIRST_PROCESS = """
import sys
from pathlib import Path
from service.net.scu import Timeouts, deliver_item
from service.store.outbox import Outbox, RetryPolicy
from service.setting_values import Destination
box = Outbox(Path(sys.argv[1]), RetryPolicy(base=0.5, max_delay=1, horizon=3600))
item = box.put([Path(p) for p in sys.argv[3:]], [Destination.parse(sys.argv[2])])
st = deliver_item(box, item.item_id, "ITVNODE_TEST", timeouts=Timeouts(connect=2, acse=3))[sys.argv[2]]
assert st.status == "pending" and st.attempts == 1, st
print(item.item_id)
"""


def test_restart_mid_retry_delivers_exactly_once(tmp_path: Path, ct_files, storescp) -> None:
    files = ct_files(2)
    scp = storescp(start=False)
    root = tmp_path / "outbox"
    # the first process records a failed attempt (destination down) and exits
    proc = subprocess.run([sys.executable, "-c", _FIRST_PROCESS, str(root), scp.address, *map(str, files)],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    item_id = proc.stdout.strip().splitlines()[-1]
    scp.start()
    # a new process (here: a new Outbox from disk) sweeps and delivers once the retry is due
    box = Outbox(root, RetryPolicy(base=0.5, max_delay=1, horizon=3600))
    st = box.get(item_id).destinations[scp.address]
    assert st.attempts == 1 and st.status == "pending"
    deadline = time.monotonic() + 10
    delivered: list[str] = []
    while time.monotonic() < deadline and not delivered:
        box.sweep(lambda i: delivered.extend(deliver_item(box, i, AE, timeouts=FAST)))
        time.sleep(0.1)
    assert delivered == [scp.address]
    for _ in range(3):  # further sweeps (another restart, a duplicate message) change nothing
        assert box.sweep(lambda i: deliver_item(box, i, AE)) == []
        assert deliver_item(box, item_id, AE, force=True) == {}
    assert len(scp.received()) == 2 and uids(scp.received()) == uids(files)
    assert box.get(item_id).destinations[scp.address].attempts == 2


def test_rejected_called_ae_goes_to_dead_letter_at_once(tmp_path: Path, ct_files, orthanc) -> None:
    box = Outbox(tmp_path / "outbox")
    key = f"WRONG_AE@127.0.0.1:{orthanc.dicom_port}"
    item = box.put(ct_files(1), [Destination.parse(key)])
    st = deliver_item(box, item.item_id, AE, timeouts=FAST)[key]
    assert st.status == "dead" and st.attempts == 1
    assert st.dead_reason is not None and st.dead_reason.startswith("permanent failure")
    reason = json.loads((box.root / st.dead_letter / "reason.json").read_text())  # type: ignore[operator]
    assert "called AE title not recognised" in reason["reason"]
    assert len(reason["files_not_delivered"]) == 1
    assert box.item_ids() == []


def test_one_destination_down_does_not_delay_the_other(tmp_path: Path, ct_files, storescp) -> None:
    scp = storescp()
    with socket.socket() as mute:  # accepts TCP, never answers: the worst kind of down
        mute.bind(("127.0.0.1", 0))
        mute.listen(4)
        mute_key = f"MUTE@127.0.0.1:{mute.getsockname()[1]}"
        box = Outbox(tmp_path / "outbox")
        item = box.put(ct_files(2), [Destination.parse(mute_key), Destination.parse(scp.address)])
        t0 = time.time()
        states = deliver_item(box, item.item_id, AE, timeouts=FAST)
        elapsed = time.time() - t0
    good, bad = states[scp.address], states[mute_key]
    assert good.status == "delivered" and bad.status == "pending"
    assert "no association response" in (bad.last_error or "")
    assert elapsed >= FAST.acse  # the mute one took its whole ACSE timeout...
    # ...the other did not wait for it
    assert good.delivered_at is not None and good.delivered_at - t0 < FAST.acse / 2
    assert len(scp.received()) == 2


def test_partial_failure_resends_only_missing_files(tmp_path: Path, ct_files, scripted_scp) -> None:
    scp = scripted_scp(statuses=[0x0000, 0xA700, 0x0000])  # out of resources for the second file
    box = Outbox(tmp_path / "outbox", RetryPolicy(base=1, max_delay=1, horizon=60))
    files = ct_files(3)
    item = box.put(files, [Destination.parse(scp.address)], now=0.0)
    st = deliver_item(box, item.item_id, AE, now=0.0, timeouts=FAST)[scp.address]
    assert st.status == "pending" and len(st.delivered) == 2 and "0xA700" in (st.last_error or "")
    st = deliver_item(box, item.item_id, AE, now=1.0, timeouts=FAST)[scp.address]
    assert st.status == "delivered" and scp.requests == 4
    assert sorted(scp.received) == sorted(uids(files))


def test_peer_abort_mid_association_is_retried(tmp_path: Path, ct_files, scripted_scp) -> None:
    scp = scripted_scp(statuses=[0x0000, ABORT])
    box = Outbox(tmp_path / "outbox", RetryPolicy(base=1, max_delay=1, horizon=60))
    files = ct_files(3)
    item = box.put(files, [Destination.parse(scp.address)], now=0.0)
    t0 = time.monotonic()
    st = deliver_item(box, item.item_id, AE, now=0.0, timeouts=FAST)[scp.address]
    assert time.monotonic() - t0 < FAST.dimse / 2  # the abort is noticed at once, not after a DIMSE timeout
    assert st.status == "pending" and len(st.delivered) == 1, st
    assert "not sent: no C-STORE response" in (st.last_error or "")
    st = deliver_item(box, item.item_id, AE, now=1.0, timeouts=FAST)[scp.address]
    assert st.status == "delivered" and sorted(scp.received) == sorted(uids(files))


def test_permanent_status_dead_letters_only_undelivered(tmp_path: Path, ct_files, scripted_scp) -> None:
    scp = scripted_scp(statuses=[0x0000, 0xC000, 0x0000])
    box = Outbox(tmp_path / "outbox")
    item = box.put(ct_files(3), [Destination.parse(scp.address)])
    st = deliver_item(box, item.item_id, AE, timeouts=FAST)[scp.address]
    assert st.status == "dead" and "0xC000" in (st.dead_reason or "")
    reason = json.loads((box.root / str(st.dead_letter) / "reason.json").read_text())
    assert len(reason["files_not_delivered"]) == 1 and len(reason["files_delivered"]) == 2
    assert len(list((box.root / str(st.dead_letter) / "files").iterdir())) == 1


def test_concurrent_workers_deliver_each_file_once(tmp_path: Path, ct_files, storescp) -> None:
    scp = storescp()
    box = Outbox(tmp_path / "outbox")
    item = box.put(ct_files(4), [Destination.parse(scp.address)])
    barrier = threading.Barrier(3)

    def worker() -> None:
        barrier.wait(timeout=10)
        deliver_item(Outbox(tmp_path / "outbox"), item.item_id, AE, timeouts=FAST)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert box.get(item.item_id).destinations[scp.address].status == "delivered"
    assert box.get(item.item_id).destinations[scp.address].attempts == 1
    assert len(scp.received()) == 4


def test_sweep_is_idempotent_until_grace(tmp_path: Path, ct_files, refused_port: int) -> None:
    box = Outbox(tmp_path / "outbox")
    item = box.put(ct_files(1), [Destination.parse(f"DOWN@127.0.0.1:{refused_port}")], now=0.0)
    sent: list[str] = []
    assert box.sweep(sent.append, now=10.0, grace=60) == [item.item_id]
    assert box.sweep(sent.append, now=20.0, grace=60) == []  # a message is on its way
    assert box.sweep(sent.append, now=71.0, grace=60) == [item.item_id]  # presumed lost: sent again
    assert sent == [item.item_id] * 2

    def broken(_: str) -> None:
        raise ConnectionError("broker down")

    box2 = Outbox(tmp_path / "outbox2")
    item2 = box2.put(ct_files(1), [Destination.parse(f"DOWN@127.0.0.1:{refused_port}")], now=0.0)
    assert box2.sweep(broken, now=1.0) == []
    assert box2.sweep(sent.append, now=2.0) == [item2.item_id]  # the failed enqueue was not remembered


def test_state_counts_for_metrics(tmp_path: Path, ct_files, scripted_scp, refused_port: int) -> None:
    from service.store.outbox_item import state_counts

    ok, bad = scripted_scp(), scripted_scp(statuses=[0xA900])
    box = Outbox(tmp_path / "outbox")
    down = Destination.parse(f"DOWN@127.0.0.1:{refused_port}")
    one = box.put(ct_files(1), [Destination.parse(ok.address), down])
    two = box.put(ct_files(1), [Destination.parse(bad.address)])
    for item in (one, two):
        deliver_item(box, item.item_id, AE, timeouts=FAST)
    assert state_counts(box.root) == {"pending": 1, "sent": 1, "dead": 1}
    assert box.item_ids() == [one.item_id]

"""The spool's write-ahead journal: replay after an unclean stop, torn and stale records, rotation, and no
resurrection of deleted instances."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_spool import ct, encode

from service.store import journal as journal_mod
from service.store.header_scan import meta_from_bytes
from service.store.journal import Journal, read_segment
from service.store.layout import SPOOL_JOURNAL
from service.store.spool import Spool


def _crash(spool: Spool) -> None:
    """What a kill -9 leaves: nothing closed, nothing checkpointed, the slot's flock released."""
    j = spool._journal
    assert j is not None
    with j._cond:
        j._closed = True  # the checkpointer stops without checkpointing
        j._cond.notify_all()
    j._thread.join(timeout=10)
    for seg in j._segs:
        os.close(seg.fd)
    os.close(j._lock_fd)
    spool._db.close()


def _records(root: Path) -> list[tuple[int, str, bytes]]:
    return [r for seg in sorted((root / SPOOL_JOURNAL).glob("*/seg-*")) for r in read_segment(seg)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def test_acknowledged_instances_survive_losing_their_files(root: Path) -> None:
    spool = Spool(root, journal=True, journal_checkpoint_s=3600)
    sent = {}
    for z in range(5):
        raw = encode(ct(z=float(z)))
        sent[spool.store(meta_from_bytes(raw), raw)] = raw
    _crash(spool)
    assert len(_records(root)) == 5
    for path in sent:  # a power cut loses what was only in the page cache
        path.unlink()
    (root / "index.sqlite").unlink()
    spool = Spool(root, journal=True)
    spool.reconcile()
    try:
        assert spool.count() == 5
        assert {p: p.read_bytes() for p in sent} == sent
        assert _records(root) == []  # the dead writer's slot is gone; ours is empty
        assert len(list((root / SPOOL_JOURNAL).iterdir())) == 1
    finally:
        spool.close()
    assert list((root / SPOOL_JOURNAL).iterdir()) == []


def test_last_revision_wins_on_replay(root: Path) -> None:
    spool = Spool(root, journal=True, journal_checkpoint_s=3600)
    ds = ct()
    first = encode(ds)
    ds.SeriesDescription = "RespCT  3.0  B30f  50% Ex corrected"
    second = encode(ds)
    path = spool.store(meta_from_bytes(first), first)
    spool.store(meta_from_bytes(second), second)
    _crash(spool)
    path.write_bytes(first)  # the older content on disk
    spool = Spool(root, journal=True)
    spool.reconcile()
    try:
        assert path.read_bytes() == second
        assert spool.revisions(ds.StudyInstanceUID) == {ds.SOPInstanceUID: 1}
    finally:
        spool.close()


def test_torn_record_and_stale_generation_end_the_scan(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", tmp_path)
    (tmp_path / "a").write_bytes(b"x")
    for i in range(3):
        j.append("a", bytes([i]) * 1000)
    seg = j._segs[j._active]
    assert [r[2][0] for r in read_segment(seg.path)] == [0, 1, 2]
    os.pwrite(seg.fd, b"\xff", seg.offset - 10)  # the last record torn: never acknowledged
    assert [r[2][0] for r in read_segment(seg.path)] == [0, 1]
    seg.reset()  # a recycled segment: the old records are of another generation
    assert read_segment(seg.path) == []
    j.append("a", b"new")
    assert [r[2] for r in read_segment(seg.path)] == [b"new"]
    j.close()


def test_segments_rotate_and_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_mod, "SEGMENT_BYTES", 64 * 1024)
    monkeypatch.setattr(journal_mod, "GROW_BYTES", 16 * 1024)
    synced: list[list[str]] = []
    monkeypatch.setattr(journal_mod, "sync_spool_files", lambda root, rels: synced.append(rels))
    j = Journal(tmp_path / "j", tmp_path, idle_s=3600)
    for i in range(40):  # 40 x 10 kB through two 64 kB segments
        j.append(f"f{i}", b"y" * 10_000)
    j.checkpoint()
    assert sorted(r for batch in synced for r in batch) == sorted(f"f{i}" for i in range(40))
    assert all(not seg.pending for seg in j._segs)
    assert all(os.fstat(seg.fd).st_size <= 64 * 1024 + 16 * 1024 for seg in j._segs)
    j.close()


def test_deleted_study_is_not_resurrected(root: Path) -> None:
    spool = Spool(root, journal=True, journal_checkpoint_s=3600)
    raw = encode(ct())
    meta = meta_from_bytes(raw)
    spool.store(meta, raw)
    spool.remove_study(meta.study_instance_uid)  # checkpoints first: nothing left to replay
    _crash(spool)
    assert _records(root) == []
    spool = Spool(root, journal=True)
    spool.reconcile()
    try:
        assert spool.count() == 0
    finally:
        spool.close()


def test_journal_only_with_fsync(root: Path) -> None:
    spool = Spool(root, journal=True, fsync=False)
    try:
        assert spool._journal is None
    finally:
        spool.close()

"""Durable before success through the spool's journal: ``itvnode serve`` killed with SIGKILL right after
storescu's last acknowledgement, the not-yet-fsynced spool files then lost (what a power cut can do), and
a restart finds every acknowledged instance in the spool and its index, byte for byte."""

from __future__ import annotations

import signal

from scp_ctdata import new_study, write_study
from scp_helpers import RunningSCP
from test_serve_peers import dataset_bytes, storescu

from service.store.journal import read_segment
from service.store.layout import SPOOL_JOURNAL
from service.store.spool import Spool


def test_sigkill_after_acks_then_lost_files_are_replayed(serve_process, tmp_path) -> None:
    study = new_study([0.0, 50.0], seed="journal-kill")
    files = write_study(study, tmp_path / "in", n_slices=8)
    # no checkpoint for an hour: every acknowledged instance is still only durable in the journal
    node: RunningSCP = serve_process(ITVNODE_SPOOL_JOURNAL_CHECKPOINT="3600")
    res = storescu(node.port, files)
    assert res.returncode == 0, res.stdout + res.stderr
    assert node.proc is not None
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(timeout=10)

    journal = node.spool_dir / SPOOL_JOURNAL
    records = [r for seg in sorted(journal.glob("*/seg-*")) for r in read_segment(seg)]
    assert len(records) == len(files)
    for _seq, rel, _data in records:  # the power cut: page-cache files and the index gone
        (node.spool_dir / rel).unlink()
    (node.spool_dir / "index.sqlite").unlink()

    again: RunningSCP = serve_process(ITVNODE_DATA_DIR=str(node.data_dir))
    spool = Spool(node.spool_dir)  # the same data directory
    try:
        stored = {p.name: p for _m, p in spool.instances(study.study_uid)}
    finally:
        spool.close()
    assert len(stored) == len(files)
    for f in files:
        assert dataset_bytes(stored[f.name]) == dataset_bytes(f)
    assert again.log is not None and "spool journal replayed" in again.log.read_text()

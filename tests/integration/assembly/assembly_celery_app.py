"""Test-only Celery app: the real configuration (``worker.celery_app.create_app``) with a tiny task registered
under the production name ``itvnode.segment_study`` that appends the study key it received to a file.

Environment: ``ITVNODE_TEST_BROKER`` (a broker URL, or empty for the embedded broker),
``ITVNODE_TEST_DATA_DIR`` (data_dir) and ``ITVNODE_TEST_RECORD`` (the file the task appends to).
"""

from __future__ import annotations

import os
from pathlib import Path

from service.intake.queue import TASK_SEGMENT
from worker.celery_app import create_app

_prefix = os.environ.get("ITVNODE_TEST_KEYPREFIX")
app = create_app(os.environ.get("ITVNODE_TEST_BROKER") or None, Path(os.environ["ITVNODE_TEST_DATA_DIR"]),
                 include=[], main="itvnode-test",
                 broker_transport_options={"global_keyprefix": _prefix} if _prefix else None)
app.conf.worker_lost_wait = 1.0  # test only: the crash test need not wait the default 10 s for a lost job


@app.task(name=TASK_SEGMENT, bind=True)
def segment_study(self: object, study_key: str) -> str:
    record = Path(os.environ["ITVNODE_TEST_RECORD"])
    task_id = getattr(getattr(self, "request", None), "id", "")
    with record.open("a") as fh:
        fh.write(f"{study_key} {task_id}\n")
        fh.flush()
        os.fsync(fh.fileno())
    return study_key


@app.task(name="itvnode.test_crash_once", bind=True)
def crash_once(self: object, marker: str) -> str:
    """Kills its pool process the first time (as an OOM kill would); records on the second delivery."""
    flag = Path(marker)
    if not flag.exists():
        flag.write_text("crashed once\n")
        os._exit(1)
    record = Path(os.environ["ITVNODE_TEST_RECORD"])
    with record.open("a") as fh:
        fh.write(f"crash-once {getattr(getattr(self, 'request', None), 'id', '')}\n")
    return marker

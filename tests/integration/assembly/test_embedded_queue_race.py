"""Two workers starting at once on a fresh embedded broker: kombu's SQLite transport creates a queue row with
a SELECT then an INSERT, so the slower process's INSERT fails on ``UNIQUE constraint failed:
kombu_queue.name`` and that worker died at start-up (seen in tests/e2e/test_split_workers.py).
``itvnode worker`` now declares the queues first and retries that race
(worker.celery_app.declare_embedded_queues).

The race is injected exactly: just before this process's INSERT is flushed, another connection (standing for
the other worker) inserts the same queue row."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.intake.queue import QUEUES, embedded_broker_path
from worker.celery_app import create_app, declare_embedded_queues


@pytest.fixture
def other_worker_wins(tmp_path: Path) -> Iterator[list[str]]:
    """Before the first flush that creates a queue row, insert that row from another connection."""
    raced: list[str] = []

    def before_flush(session: Session, *_: Any) -> None:
        for obj in session.new:
            name = getattr(obj, "name", None)
            if getattr(obj, "__tablename__", "") == "kombu_queue" and name and not raced:
                con = sqlite3.connect(embedded_broker_path(tmp_path), timeout=10)
                with con:
                    con.execute("INSERT INTO kombu_queue (name) VALUES (?)", (name,))
                con.close()
                raced.append(name)

    event.listen(Session, "before_flush", before_flush)
    try:
        yield raced
    finally:
        event.remove(Session, "before_flush", before_flush)


def _queue_rows(data_dir: Path) -> list[str]:
    con = sqlite3.connect(embedded_broker_path(data_dir))
    try:
        return sorted(r[0] for r in con.execute("SELECT name FROM kombu_queue"))
    finally:
        con.close()


def test_the_race_is_real_without_a_retry(tmp_path: Path, other_worker_wins: list[str]) -> None:
    app = create_app(None, tmp_path, include=[], main="itvnode-race-test")
    try:
        with pytest.raises(IntegrityError, match="kombu_queue.name"):
            declare_embedded_queues(app, attempts=1)
    finally:
        app.close()
    assert other_worker_wins


def test_declaring_retries_the_race_and_every_queue_exists_once(tmp_path: Path,
                                                                other_worker_wins: list[str]) -> None:
    app = create_app(None, tmp_path, include=[], main="itvnode-race-test")
    try:
        declare_embedded_queues(app)
    finally:
        app.close()
    assert other_worker_wins  # the race happened
    assert _queue_rows(tmp_path) == sorted(QUEUES)

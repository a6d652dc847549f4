"""Fixtures for the assembly tests: a real spool, the real embedded broker (helpers: assembly_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.intake.queue import Enqueuer
from service.store.spool import Spool


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def spool(data_dir: Path) -> Iterator[Spool]:
    s = Spool(data_dir / "spool", fsync=False)
    yield s
    s.close()


@pytest.fixture
def embedded(data_dir: Path) -> Iterator[Enqueuer]:
    e = Enqueuer(None, data_dir)
    yield e
    e.close()


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound then released)."""
    from tests.support.net import free_port

    return free_port()

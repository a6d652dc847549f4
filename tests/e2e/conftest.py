"""Fixtures of the end-to-end tests: a 10-phase small phantom, the tiny SAM 3 on disk, process cleanup."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import Proc, port_open

E2E_SPEC = {"n_phases": 10, "shape": (16, 96, 96)}


def _require_peers() -> None:
    missing = [p for p in ("/usr/bin/storescu", "/usr/bin/storescp") if not Path(p).exists()]
    missing += [p for p in ("dciodvfy", "redis-server") if shutil.which(p) is None]
    if missing:
        pytest.fail(f"end-to-end peers missing: {missing} (run tests/peers.sh)")


@pytest.fixture(scope="session")
def e2e_phantom(phantom_dicom_factory: Callable[..., Any]) -> Any:
    """10 phases x 16 slices x 96 x 96 (siemens style) plus an AVG series."""
    _require_peers()
    return phantom_dicom_factory("siemens", with_avg=True, **E2E_SPEC)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-init tiny SAM 3 in HF format, loaded by the node through the real loader."""
    from models.sam3.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_sam3"))


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Proc]]:
    """Processes started by a test; stopped (then killed) at teardown whatever happened."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop(timeout=15)


@pytest.fixture
def shared_redis() -> Iterator[Callable[[int], str]]:
    """``shared_redis(db) -> url`` on redis://127.0.0.1:6379 (tests/peers.sh starts it); the database is
    flushed before use and after the test, whatever happened."""
    import redis

    if not port_open(6379):
        pytest.fail("Redis on 127.0.0.1:6379 is not running (run tests/peers.sh)")
    used: list[str] = []

    def flush(url: str) -> None:
        client = redis.Redis.from_url(url)
        try:
            client.flushdb()
        finally:
            client.close()

    def get(db: int) -> str:
        url = f"redis://127.0.0.1:6379/{db}"
        flush(url)
        used.append(url)
        return url

    yield get
    for url in used:
        flush(url)

"""Fixtures for the Storage SCP tests: an in-process SCP and ``itvnode serve`` as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from scp_helpers import ITVNODE, REPO, RunningSCP, echo_ok

from service.net.scp import StorageSCP
from service.store.spool import Spool
from tests.support.net import free_port


@pytest.fixture
def make_scp(tmp_path: Path) -> Iterator[Callable[..., RunningSCP]]:
    """In-process SCP factory: ``make_scp(**StorageSCP kwargs)``; stopped after the test."""
    started: list[tuple[StorageSCP, Spool]] = []

    def _make(min_free_bytes: int = 0, **kwargs: Any) -> RunningSCP:
        data = tmp_path / f"data{len(started)}"
        spool = Spool(data / "spool", min_free_bytes=min_free_bytes)
        scp = StorageSCP(spool, host="127.0.0.1", port=0, **kwargs)
        port = scp.start()
        started.append((scp, spool))
        return RunningSCP(port=port, data_dir=data, spool_dir=data / "spool",
                          ae_title=kwargs.get("ae_title", "ITVNODE"), scp=scp)

    yield _make
    for scp, spool in started:
        scp.stop()
        spool.close()


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., RunningSCP]]:
    """``itvnode serve`` in a subprocess on a free port; ``serve_process(*serve_args, ENV=value, ...)``."""
    procs: list[RunningSCP] = []

    def _start(*serve_args: str, **env_extra: str) -> RunningSCP:
        data = tmp_path / f"serve{len(procs)}"
        data.mkdir()
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
        env.update({"ITVNODE_PORT": str(port), "ITVNODE_HOST": "127.0.0.1", "ITVNODE_DATA_DIR": str(data),
                    "ITVNODE_MIN_FREE_BYTES": "0", "PYTHONUNBUFFERED": "1"})
        env.update(env_extra)
        log = data / "serve.log"
        cmd = [str(ITVNODE), "serve"] if ITVNODE.exists() else [sys.executable, "-m", "itvnode.cli", "serve"]
        proc = subprocess.Popen([*cmd, *serve_args], cwd=REPO, env=env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, text=True)
        running = RunningSCP(port=port, data_dir=data, spool_dir=data / "spool",
                             ae_title=env.get("ITVNODE_AE_TITLE", "ITVNODE"), proc=proc, log=log)
        procs.append(running)
        calling = env.get("ITVNODE_ALLOWED_CALLERS", "ECHOSCU").split(",")[0]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"itvnode serve exited {proc.returncode}:\n{log.read_text()}")
            if echo_ok(port, running.ae_title, calling).returncode == 0:
                return running
            time.sleep(0.2)
        raise AssertionError(f"itvnode serve did not answer C-ECHO in 30 s:\n{log.read_text()}")

    yield _start
    for running in procs:
        assert running.proc is not None
        if running.proc.poll() is None:
            running.proc.terminate()
            try:
                rc = running.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                running.proc.kill()
                running.proc.wait(timeout=5)
                raise AssertionError("itvnode serve did not stop on SIGTERM within 15 s") from None
            assert rc == 0, f"itvnode serve exited {rc} on SIGTERM"

"""Helpers shared by the export tests (a module name unique in the test tree, unlike ``conftest``)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

ABORT = -1  # a ScriptedSCP "status" that aborts the association instead of answering


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"peer exited with {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file: everything after the File Meta Information group."""
    from pynetdicom.dsutils import split_dataset

    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]

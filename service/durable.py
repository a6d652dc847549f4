"""Durable file writes: what is acknowledged survives a power cut.

One primitive for the spool, the manifests and the outbox: write a temp file in the target directory,
fsync it, rename it over the target (readers see the old or the new content, never a torn file), fsync the
directory so that the rename itself is on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def write_atomic(
    path: Path, data: bytes, *, tmp: Path | None = None, fsync: bool = True, mode: int = 0o640
) -> None:
    """Write ``data`` to ``path`` atomically; ``fsync=False`` (tests, benches) is atomic but not durable."""
    path = Path(path)
    tmp = tmp or path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON (indented, sorted keys, trailing newline) written with :func:`write_atomic`."""
    write_atomic(Path(path), (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())

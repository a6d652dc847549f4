"""Durable file writes: what is acknowledged survives a power cut.

One primitive for the spool, the manifests and the outbox: write a temp file in the target directory,
fsync it, rename it over the target (readers see the old or the new content, never a torn file), fsync the
directory so that the rename itself is on disk. The spool's received instances are made durable instead
by its write-ahead journal (:mod:`service.store.journal`, one ``fdatasync`` each), which checkpoints them
into files written here.

It also owns the permission rule for everything under the data directory, which holds patient data
(instances, manifests with names, IDs, birth dates, accession numbers, RTSTRUCTs, outbox copies): owner-only,
files :data:`FILE_MODE` 0600 and directories :data:`DIR_MODE` 0700. Three layers apply it:
:func:`write_atomic` and :func:`private_dir` set the modes explicitly, and the ``itvnode`` processes that
touch patient data run with :data:`PRIVATE_UMASK` (:func:`use_private_umask`) so that files written by
libraries (SQLite, the embedded broker, pydicom, shutil) are owner-only too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import uuid
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
PRIVATE_UMASK = 0o077


def use_private_umask() -> int:
    """Owner-only by default for whatever this process creates from now on; returns the previous umask."""
    return os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """``mkdir -p`` with every directory it creates at :data:`DIR_MODE` (``Path.mkdir(parents=True)`` would
    create the parents with the umask's default)."""
    path = Path(path)
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue
        os.chmod(d, DIR_MODE)  # mkdir's mode is filtered by the umask; this is the rule, whatever the umask
    return path


def secure_data_dir(path: Path) -> Path:
    """Create the data directory owner-only, or make an existing one owner-only (it is the one gate to
    everything below it, including files older releases wrote 0644)."""
    path = private_dir(path)
    st = path.stat()
    if st.st_mode & 0o077 and st.st_uid == os.getuid():
        LOG.warning("data directory %s was mode %o; now %o (owner only: it holds patient data)", path,
                    stat.S_IMODE(st.st_mode), DIR_MODE)
        os.chmod(path, DIR_MODE)
    return path


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
    path: Path, data: bytes, *, tmp: Path | None = None, fsync: bool = True, mode: int = FILE_MODE
) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` (owner-only by default, whatever the umask);
    ``fsync=False`` (tests, benches) is atomic but not durable."""
    path = Path(path)
    tmp = tmp or path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # os.open's mode is filtered by the umask
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

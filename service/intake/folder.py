"""Offline intake (``itvnode segment``, ``itvnode evaluate``): the assembler on files already on disk."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.intake.assembler import Assembler
from service.intake.phases import compile_rules


def assemble_folder(
    files: Sequence[Path],
    work_dir: Path,
    *,
    expected_phases: int | None,
    phase_rules: Sequence[Any] = (),
    incomplete_cycle: str = "process",
) -> tuple[int, dict[str, int]]:
    """Offline intake (``itvnode segment``, ``itvnode evaluate``): the SCP's header rules, spool and phase
    assembly on files already on disk, completed at once (no quiet period, no queue). Manifests land under
    ``work_dir``. Returns the number of instances stored and the count of ignored files per reason.

    An incomplete cycle is processed and flagged by default: running a command on a folder is the deliberate
    act that ``itvnode release`` is on the node, and nothing is sent anywhere."""
    from service.store.header_scan import meta_from_bytes
    from service.store.ingest_errors import IngestError
    from service.store.spool import Spool

    stored = 0
    ignored: defaultdict[str, int] = defaultdict(int)
    spool = Spool(work_dir / "spool", fsync=False)  # a scratch copy: the originals stay where they are
    try:
        for f in files:
            try:
                encoded = f.read_bytes()
                spool.store(meta_from_bytes(encoded), encoded)
                stored += 1
            except (IngestError, OSError, ValueError) as exc:
                ignored[type(exc).__name__] += 1
        assembler = Assembler(spool, work_dir, None, quiet_period=0.0, expected_phases=expected_phases,
                              settle=0.0, site_rules=compile_rules(list(phase_rules)),
                              incomplete_cycle=incomplete_cycle)
        assembler.poll_once(time.time() + 1.0)
    finally:
        spool.close()
    return stored, dict(ignored)

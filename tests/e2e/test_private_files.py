"""Everything a node writes under its data directory is owner-only (issue 9 item 10): the spool (instances as
received, the index), manifests (patient name, ID, birth date, accession, referring physician), the embedded
broker, RTSTRUCTs and QA. Run from a umask 022 parent, as a shell or a container would start it."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from e2e_helpers import (
    REPO,
    Proc,
    free_port,
    itvnode_argv,
    manifests,
    node_env,
    port_open,
    storescu,
    wait_for,
)


def _walk(root: Path) -> Iterator[Path]:
    yield root
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def _not_private(*roots: Path) -> list[str]:
    bad = []
    for root in roots:
        for p in _walk(root):
            st = p.lstat()
            want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
            if stat.S_IMODE(st.st_mode) != want:
                bad.append(f"{oct(stat.S_IMODE(st.st_mode))} {p.relative_to(root.parent)}")
    return bad


def test_serve_and_segment_write_owner_only(tmp_path: Path, e2e_phantom: Any, procs: list[Proc]) -> None:
    old = os.umask(0o022)
    try:
        data = tmp_path / "data"
        data.mkdir(mode=0o755)  # a data directory left by an older release: tightened at start
        port = free_port()
        env = node_env(data, port, broker_url=None, destinations="", sam3_dir=None,
                       extra={"ITVNODE_QUIET_PERIOD": "1"})
        serve = Proc("serve", itvnode_argv("serve"), tmp_path, env=env, cwd=REPO)
        procs.append(serve)
        wait_for(lambda: port_open(port), 60, "itvnode serve to listen", diagnose=serve.log)
        storescu(port, "ITVNODE", [e2e_phantom.root])
        wait_for(lambda: manifests(data), 60, "the assembler's manifest", diagnose=serve.log)
        assert serve.stop() == 0

        work, out = tmp_path / "work", tmp_path / "out"
        res = subprocess.run(itvnode_argv("segment", str(e2e_phantom.root), "--out", str(out),
                                          "--work-dir", str(work)),
                             env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
        assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    finally:
        os.umask(old)
    # the files that carry patient data are there, so the walk below covers them
    assert list(data.glob("spool/*/*/*.dcm")) and (data / "spool" / "index.sqlite").is_file()
    assert list(data.glob("studies/*/manifest.json")) and (data / "broker").is_dir()
    assert list(work.glob("studies/*/manifest.json")) and list(work.glob("studies/*/results/RS.*.dcm"))
    assert list(out.glob("RS.*.dcm")) and (out / "qa.json").is_file()
    assert _not_private(data, work, out) == []

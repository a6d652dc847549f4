"""Owner-only files and directories under the data dir, whatever the process umask (issue 9 item 10).

These check the explicit modes of the primitives; tests/e2e/test_private_files.py walks a real node's data
directory (where the ``itvnode`` processes also run with umask 077)."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from test_spool import ct, encode

from service.dicomio.output import write_dataset
from service.store.durable import DIR_MODE, FILE_MODE, private_dir, secure_data_dir, write_atomic
from service.store.header_scan import meta_from_bytes
from service.store.manifest import Manifest, manifest_path, save_manifest
from service.store.outbox import Outbox
from service.store.spool import Spool


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o022)  # what a login shell or a container gives
    yield
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_write_atomic_and_private_dir(tmp_path: Path) -> None:
    d = private_dir(tmp_path / "a" / "b" / "c")
    assert [mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", d)] == [DIR_MODE] * 3
    write_atomic(d / "f", b"x", fsync=False)
    assert mode(d / "f") == FILE_MODE == 0o600
    (d / "g").write_bytes(b"old")
    os.chmod(d / "g", 0o644)
    write_atomic(d / "g", b"new", fsync=False)  # replacing a file written 0644 by an older release
    assert mode(d / "g") == 0o600


def test_secure_data_dir_tightens_an_existing_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="service.store.durable")  # in-process CLI runs raise it
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)  # explicit: an earlier in-process CLI call may have set the private umask
    secure_data_dir(data)
    assert mode(data) == 0o700
    assert "was mode 755; now 700" in caplog.text


def test_spool_manifest_rtstruct_outbox_are_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    spool = Spool(data / "spool", fsync=False)
    try:
        raw = encode(ct())
        stored = spool.store(meta_from_bytes(raw), raw)
    finally:
        spool.close()
    assert mode(stored) == 0o600
    assert {mode(p) for p in (data / "spool", stored.parent, stored.parent.parent)} == {0o700}

    m = Manifest(study_key="k1", study_instance_uid="1.2.3", frame_of_reference_uid="1.2.3.9")
    path = manifest_path(data, "k1")
    save_manifest(m, path)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700

    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    rs = write_dataset(ds, data / "studies" / "k1" / "results", "RS")
    assert mode(rs) == 0o600 and mode(rs.parent) == 0o700

    outbox = Outbox(data / "outbox")
    assert {mode(outbox.root / sub) for sub in ("items", "dead", "done", "tmp")} == {0o700}

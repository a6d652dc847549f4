"""C-STORE data sets streamed from the socket into the spool (FastDUL / FastDIMSE, issue 14): the same bytes
as pynetdicom's assembled path, no temp file left by an association that ends mid-transfer, and a PDV item
that overruns its PDU ends the association like any undecodable PDU."""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from scp_ctdata import new_study, write_study
from scp_helpers import CT, RunningSCP
from test_serve_peers import storescu

import service.net._pynetdicom_fast
from service.store.spool import Spool


def _digests(spool_dir: Path) -> dict[str, str]:
    return {p.relative_to(spool_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in spool_dir.glob("*/*/*.dcm")}


def _leftovers(spool_dir: Path) -> list[Path]:
    return [*spool_dir.glob(".incoming-*"), *spool_dir.glob("*/*/.*.part")]


def test_streamed_files_are_the_assembled_ones(make_scp: Callable[..., RunningSCP], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_study(new_study([0.0, 50.0], seed="stream"), tmp_path / "in", size=128, n_slices=6)
    streamed = make_scp()
    assert streamed.scp is not None
    kinds: list[str] = []
    real = streamed.scp.spool.store

    def recording(meta: object, encoded: object) -> Path:
        kinds.append(type(encoded).__name__)
        return real(meta, encoded)  # type: ignore[arg-type]

    monkeypatch.setattr(streamed.scp.spool, "store", recording)
    assert storescu(streamed.port, files).returncode == 0
    assert kinds == ["Incoming"] * len(files)  # every data set went through the stream
    monkeypatch.setattr(service.net._pynetdicom_fast, "FAST_REACTOR", False)
    stock = make_scp()
    assert storescu(stock.port, files).returncode == 0
    got = _digests(streamed.spool_dir)
    assert len(got) == len(files) and got == _digests(stock.spool_dir)
    assert not _leftovers(streamed.spool_dir)
    for path in streamed.spool_dir.glob("*/*/*.dcm"):
        assert dcmread(path).file_meta.ImplementationVersionName.startswith("PYNETDICOM")


def _pdata(context_id: int, *pdvs: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack(">LBB", len(data) + 2, context_id, control) + data for control, data in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def _store_command(path: Path) -> bytes:
    ds = dcmread(path)
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 0
    req.DataSet = BytesIO(b"x")  # only makes CommandDataSetType say "a data set follows"
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    pdata = P_DATA_TF()
    pdata.from_primitive(next(msg.encode_msg(1, 0)))
    return bytes(pdata.encode())[12:]  # the command set, after the PDU and PDV item headers and control


def _wait(cond: Callable[[], bool], limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.mark.parametrize("ending", ["abort", "close", "overrun"])
def test_association_ending_mid_data_set_leaves_nothing(make_scp: Callable[..., RunningSCP], tmp_path: Path,
                                                       ending: str) -> None:
    files = write_study(new_study([0.0], seed=f"mid-{ending}"), tmp_path / "in", size=128, n_slices=2)
    node = make_scp()
    assoc = node.associate()
    assert assoc.is_established
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CT)
    raw = files[0].read_bytes()
    sock = assoc.dul.socket.socket
    sock.sendall(_pdata(cx.context_id, (0x03, _store_command(files[0]))))
    sock.sendall(_pdata(cx.context_id, (0x00, raw[-5000:])))  # a first data set fragment
    assert _wait(lambda: bool(list(node.spool_dir.glob(".incoming-*"))))  # being streamed
    if ending == "abort":
        assoc.abort()
    elif ending == "close":
        sock.close()
    else:  # a PDV item claiming more than its PDU holds
        sock.sendall(struct.pack(">BBLLBB", 0x04, 0, 6 + 10, 1_000_000, cx.context_id, 0x02) + b"x" * 10)
        assert _wait(lambda: assoc.is_aborted or not assoc.is_established)
    assert _wait(lambda: not _leftovers(node.spool_dir))
    if not assoc.is_aborted:
        assoc.abort()
    spool = Spool(node.spool_dir)
    try:
        assert spool.count() == 0
    finally:
        spool.close()
    assert storescu(node.port, files).returncode == 0  # and the SCP still serves

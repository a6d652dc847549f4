"""Instances streamed into the spool as they arrive (``Spool.incoming`` / ``Incoming``): filed byte for byte
like ``Spool.store(bytes)``, through the journal by ``copy_file_range``, header read from the first bytes,
refusals that leave no temp file behind, and the byte-exact encodings the SCP writes without pydicom."""

from __future__ import annotations

import errno
import os
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.pdu_primitives import P_DATA
from test_spool import ct, encode

from service.net._pynetdicom_fast.dimse import _store_request_fields, _store_success_command, file_head
from service.store import journal as journal_mod
from service.store.header_scan import meta_from_bytes, meta_from_prefix
from service.store.ingest_errors import SpoolFull, UndecodableDataset
from service.store.journal import Journal, read_segment
from service.store.spool import Incoming, Spool


def _incoming(spool: Spool, data: bytes, chunk: int = 7_000) -> Incoming:
    """``data`` as the SCP streams it: the head (preamble + file meta) first, then fragments."""
    head_len = 132 + 12 + int.from_bytes(data[140:144], "little")
    inc = spool.incoming(data[:head_len])
    for pos in range(head_len, len(data), chunk):
        inc.write(memoryview(data)[pos:pos + chunk])
    return inc


def _temp_files(root: Path) -> list[Path]:
    return sorted(root.glob(".incoming-*")) + sorted(root.glob("*/*/.*.part"))


@pytest.mark.parametrize("journal", [True, False])
def test_streamed_instance_is_filed_like_bytes(tmp_path: Path, journal: bool) -> None:
    spool = Spool(tmp_path / "spool", journal=journal)
    data = _large()
    inc = _incoming(spool, data)
    meta = meta_from_prefix(bytes(inc.prefix), inc.size, inc.read_all)
    assert meta == meta_from_bytes(data)
    path = spool.store(meta, inc)
    assert path.read_bytes() == data
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert spool.count() == 1 and not _temp_files(spool.root)
    if journal:
        records = [r for seg in (spool.root / "journal").glob("*/seg-*") for r in read_segment(seg)]
        rel = path.relative_to(spool.root).as_posix()
        assert [(r, body) for _seq, r, body in records] == [(rel, data)]
    spool.close()


def test_identical_resend_and_changed_resend_through_incoming(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    ds = ct()
    first = encode(ds)
    path = spool.store(meta_from_bytes(first), first)
    again = _incoming(spool, first)
    assert spool.store(meta_from_bytes(first), again) == path
    ds.InstanceNumber = 99
    changed = encode(ds)
    spool.store(meta_from_bytes(changed), _incoming(spool, changed))
    assert path.read_bytes() == changed
    assert spool.revisions(ds.StudyInstanceUID) == {ds.SOPInstanceUID: 1}
    assert not _temp_files(spool.root)
    spool.close()


def test_watermark_refuses_and_removes_the_temp_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = encode(ct())
    inc = _incoming(spool, data)
    spool.min_free_bytes = spool.free_bytes() + 1
    with pytest.raises(SpoolFull, match="watermark"):
        spool.store(meta_from_bytes(data), inc)
    assert not _temp_files(spool.root) and spool.count() == 0
    spool.close()


def test_stream_past_the_free_space_stops_writing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    inc = spool.incoming(b"\0" * 132)
    inc.limit = 1000  # what the file system had free
    inc.write(b"x" * 2000)
    inc.write(b"y" * 10)
    assert inc.size == 132 and os.fstat(inc.fd).st_size == 0
    with pytest.raises(SpoolFull):
        inc.check()
    inc.close()
    assert not _temp_files(spool.root)
    spool.close()


def test_write_error_is_the_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    data = encode(ct())
    inc = spool.incoming(data[:200])

    def full(fd: int, view: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    inc.write(data[200:])
    monkeypatch.undo()
    with pytest.raises(SpoolFull):
        spool.store(meta_from_bytes(data), inc)
    assert not _temp_files(spool.root) and spool.count() == 0
    spool.close()


def test_dropped_incoming_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    inc = spool.incoming(b"\0" * 132)
    path = inc.path
    del inc  # an association that ended mid-transfer: collected without being filed
    assert not path.exists()
    spool.close()


def test_stale_incoming_files_are_removed_at_start(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    Spool(root).close()
    stale, fresh = root / ".incoming-1-2-3.part", root / ".incoming-1-2-4.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (1_000_000, 1_000_000))
    Spool(root).close()
    assert not stale.exists() and fresh.exists()


def _large(ts: str | None = None) -> bytes:
    ds = ct(ts=ts) if ts else ct()
    ds.Rows = ds.Columns = 64
    ds.PixelData = bytes(64 * 64 * 2)
    return encode(ds)


def test_header_from_a_prefix() -> None:
    data = _large()
    prefix = data[:2048]  # the header, the Pixel Data element header, a little of its value
    assert len(prefix) < len(data)
    assert meta_from_prefix(prefix, len(data), lambda: pytest.fail("read back")) == meta_from_bytes(data)
    with pytest.raises(UndecodableDataset, match="PixelData truncated"):
        meta_from_prefix(prefix, len(data) - 1, lambda: data[:-1])
    implicit = _large(ImplicitVRLittleEndian)
    assert meta_from_prefix(implicit[:2048], len(implicit), lambda: implicit) == meta_from_bytes(implicit)
    # a header the prefix does not hold: read back, the same answer as for the whole
    assert meta_from_prefix(data[:300], len(data), lambda: data) == meta_from_bytes(data)


def test_append_file_and_growth_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_mod, "SEGMENT_BYTES", 256 * 1024)
    monkeypatch.setattr(journal_mod, "GROW_BYTES", 16 * 1024)
    monkeypatch.setattr(journal_mod, "GROW_AHEAD", 32 * 1024)
    monkeypatch.setattr(journal_mod, "sync_spool_files", lambda root, rels: None)
    src = tmp_path / "src"
    payloads = [bytes([i]) * (3_000 + 97 * i) for i in range(60)]
    j = Journal(tmp_path / "j", tmp_path, idle_s=3600)
    for i, body in enumerate(payloads):
        src.write_bytes(body)
        fd = os.open(src, os.O_RDONLY)
        try:
            j.append_file(f"f{i}", fd, len(body), journal_mod.zlib.crc32(body))
        finally:
            os.close(fd)
    got = {rel: body for seg in j._segs for _s, rel, body in read_segment(seg.path)}
    # what the segments still hold (the first one was recycled after a checkpoint) is the latest records
    first = min(int(rel[1:]) for rel in got)
    assert got == {f"f{i}": payloads[i] for i in range(first, 60)}
    assert all(os.fstat(seg.fd).st_size <= 256 * 1024 for seg in j._segs)
    j.close()


def test_file_head_is_pynetdicoms_file_meta() -> None:
    for sop_class, sop, ts in [("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1"),
                               ("1.2.840.10008.5.1.4.1.1.2", "1.2.34", "1.2.840.10008.1.2"),
                               ("1.2", "1.2.840.99999." + ".".join(str(i) for i in range(1, 23)) + ".222",
                                "1.2.840.10008.1.2.4.50")]:  # over 64 characters: pydicom encodes it
        meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop, transfer_syntax=ts)
        assert file_head(sop_class, sop, ts) == b"\0" * 128 + b"DICM" + encode_file_meta(meta)


def test_success_response_is_pynetdicoms_encoding() -> None:
    for sop, msg_id in [("1.2.3.4.5", 7), ("1.2.3.45", 65535)]:
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = msg_id
        rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        rsp.AffectedSOPInstanceUID = sop
        rsp.Status = 0
        msg = C_STORE_RSP()
        msg.primitive_to_message(rsp)
        stock = b"".join(bytes(p.presentation_data_value_list[0][1]) for p in msg.encode_msg(1, 16384))
        assert b"\x03" + (_store_success_command(rsp) or b"") == stock
    rsp.Status = 0xA700
    assert _store_success_command(rsp) is None  # anything but plain success: pynetdicom encodes it


def _store_command(sop: str, msg_id: int, priority: int, move: bool = False) -> bytes:
    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    req.AffectedSOPInstanceUID = sop
    req.Priority = priority
    if move:
        req.MoveOriginatorApplicationEntityTitle = "MOVER"
        req.MoveOriginatorMessageID = 3
    req.DataSet = BytesIO(b"x")
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return bytes(next(msg.encode_msg(1, 0)).presentation_data_value_list[0][1])[1:]


def test_store_request_fields_match_pynetdicoms_decoding() -> None:
    for sop, msg_id, priority in [("1.2.3.4", 1, 0), ("1.2.826.0.1.3680043.8.498.123", 65535, 2)]:
        command = _store_command(sop, msg_id, priority)
        msg = DIMSEMessage()
        pdata = P_DATA()
        pdata.presentation_data_value_list = [[1, b"\x03" + command]]  # type: ignore[list-item]
        msg.decode_msg(pdata)
        stock = msg.message_to_primitive()
        assert _store_request_fields(command) == (stock.AffectedSOPClassUID, stock.MessageID, stock.Priority,
                                                  stock.AffectedSOPInstanceUID)
    assert _store_request_fields(_store_command("1.2.3", 1, 0, move=True)) is None  # pynetdicom decodes it
    assert _store_request_fields(_store_command("1.2.3", 1, 0)[:-2]) is None
    assert _store_request_fields(b"") is None

"""Bad input is answered with the documented status, and the SCP keeps serving and keeps what it stored."""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import _config
from pynetdicom.dsutils import encode_file_meta
from scp_ctdata import Study, classic_slice, new_study
from scp_helpers import CT, ENHANCED_CT, STORESCU, RunningSCP, scu

from service.net import dimse_status as st
from service.store.spool import Spool

MR = "1.2.840.10008.5.1.4.1.1.4"


def part10(ds: Dataset, sop_class: str, sop_instance: str, body: bytes | None = None) -> bytes:
    """A Part 10 byte string with a valid file meta group around any data set bytes."""
    if body is None:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds)
        body = fp.getvalue()
    meta = Dataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return b"\0" * 128 + b"DICM" + encode_file_meta(meta) + body  # type: ignore[arg-type]


class Sender:
    """Sends raw Part 10 files (pynetdicom chunked mode: data set bytes go out untouched)."""

    def __init__(self, node: RunningSCP, tmp: Path, study: Study) -> None:
        self.node, self.tmp, self.study = node, tmp, study
        self.good_sent: list[str] = []
        self.n = 0

    def send_raw(self, raw: bytes) -> Dataset:
        self.n += 1
        path = self.tmp / f"case{self.n}.dcm"
        path.write_bytes(raw)
        assoc = self.node.associate()
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(path)
        finally:
            assoc.release()
        return rsp

    def send(self, ds: Dataset, sop_class: str = CT, sop_instance: str | None = None) -> Dataset:
        return self.send_raw(part10(ds, sop_class, sop_instance or str(ds.SOPInstanceUID)))

    def fresh(self) -> Dataset:
        """A valid slice with a new SOP Instance UID."""
        ds = classic_slice(self.study, 0.0, self.n % 12)
        ds.SOPInstanceUID = generate_uid()
        return ds

    def good_store_still_works(self, case: str) -> None:
        ds = self.fresh()
        rsp = self.send(ds)
        assert rsp.Status == 0x0000, f"after {case}: good C-STORE answered 0x{rsp.Status:04X}"
        self.good_sent.append(str(ds.SOPInstanceUID))
        spool = Spool(self.node.spool_dir)
        try:
            stored = {m.sop_instance_uid: p for m, p in spool.instances(self.study.study_uid)}
        finally:
            spool.close()
        assert set(stored) == set(self.good_sent), f"after {case}: spool lost or gained instances"
        assert all(p.is_file() for p in stored.values())
        assert not list(self.node.spool_dir.glob("*/*/.*.part")), f"after {case}: half-written file left"


def _without(keyword: str) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        delattr(ds, keyword)
    return mutate


def _set(keyword: str, value: Any) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        setattr(ds, keyword, value)
    return mutate


# (case, mutation of a valid slice, expected status)
DATASET_CASES: list[tuple[str, Callable[[Dataset], None], int]] = [
    ("missing SOP Instance UID", _without("SOPInstanceUID"), st.MISSING_ATTRIBUTE),
    ("missing Study Instance UID", _without("StudyInstanceUID"), st.MISSING_ATTRIBUTE),
    ("missing Series Instance UID", _without("SeriesInstanceUID"), st.MISSING_ATTRIBUTE),
    ("missing Frame of Reference UID", _without("FrameOfReferenceUID"), st.MISSING_GEOMETRY),
    ("missing ImagePositionPatient", _without("ImagePositionPatient"), st.MISSING_GEOMETRY),
    ("missing ImageOrientationPatient", _without("ImageOrientationPatient"), st.MISSING_GEOMETRY),
    ("missing PixelSpacing", _without("PixelSpacing"), st.MISSING_GEOMETRY),
    ("SOP class in data set differs", _set("SOPClassUID", ENHANCED_CT), st.SOP_CLASS_MISMATCH),
    ("MR modality in CT Image Storage", _set("Modality", "MR"), st.SOP_CLASS_MISMATCH),
    ("Study UID that is a path", _set("StudyInstanceUID", "1.2/../../etc"), st.INVALID_IDENTIFIER),
    ("missing PixelData", _without("PixelData"), st.UNDECODABLE),
    # issue 9 item 5: geometry present but not usable
    ("NaN ImagePositionPatient", _set("ImagePositionPatient", ["NaN", 0, 0]), st.INVALID_GEOMETRY),
    ("infinite ImageOrientationPatient", _set("ImageOrientationPatient", [1, 0, 0, 0, "Infinity", 0]),
     st.INVALID_GEOMETRY),
    ("zero PixelSpacing", _set("PixelSpacing", [0, 0]), st.INVALID_GEOMETRY),
    # issue 9 item 6: what can be checked with arithmetic on the header
    ("PixelData shorter than Rows x Columns", _set("PixelData", b"\0" * 1000), st.PIXEL_DATA_LENGTH),
    ("UID with a leading zero", _set("SeriesInstanceUID", "1.02.3.4"), st.INVALID_IDENTIFIER),
    ("UID with an empty component", _set("FrameOfReferenceUID", "1.2..4"), st.INVALID_IDENTIFIER),
    ("UID over 64 characters", _set("StudyInstanceUID", "1.2." + "3" * 62), st.INVALID_IDENTIFIER),
]


def test_bad_data_sets_answered_and_service_keeps_serving(serve_process, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node: RunningSCP = serve_process()
    sender = Sender(node, tmp_path, new_study([0.0], "bad-input"))
    sender.good_store_still_works("start")

    for case, mutate, expected in DATASET_CASES:
        ds = sender.fresh()
        affected = str(ds.SOPInstanceUID)
        mutate(ds)
        rsp = sender.send(ds, sop_instance=affected)
        assert rsp.Status == expected, f"{case}: 0x{rsp.Status:04X} ({rsp.get('ErrorComment')})"
        assert rsp.get("ErrorComment"), f"{case}: no ErrorComment"
        sender.good_store_still_works(case)

    raw = part10(sender.fresh(), CT, generate_uid())
    rsp = sender.send_raw(raw)
    assert rsp.Status == st.SOP_INSTANCE_MISMATCH, "SOP Instance UID differs from Affected SOP Instance UID"
    sender.good_store_still_works("instance mismatch")

    good = sender.fresh()
    raw = part10(good, CT, str(good.SOPInstanceUID))
    for case, cut in (("truncated header", 400), ("truncated pixel data", len(raw) - 100)):
        rsp = sender.send_raw(raw[:cut])
        assert rsp.Status == st.UNDECODABLE, f"{case}: 0x{rsp.Status:04X}"
        sender.good_store_still_works(case)

    garbage = np.random.default_rng(1).bytes(4000)
    rsp = sender.send_raw(part10(good, CT, str(good.SOPInstanceUID), body=garbage))
    assert rsp.Status == st.UNDECODABLE
    sender.good_store_still_works("garbage data set")


def test_unsupported_sop_class_refused_at_negotiation(serve_process, tmp_path: Path) -> None:
    node: RunningSCP = serve_process()
    assoc = scu(contexts=(MR, CT)).associate("127.0.0.1", node.port, ae_title="ITVNODE")
    assert assoc.is_established
    try:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [CT]
        rejected = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == MR]
        assert rejected and rejected[0].result == 0x03  # abstract syntax not supported
        mr = classic_slice(new_study([0.0], "mr"), 0.0, 0)
        mr.SOPClassUID = MR
        with pytest.raises(ValueError):
            assoc.send_c_store(mr)
        ct = classic_slice(new_study([0.0], "ct"), 0.0, 0)
        assert assoc.send_c_store(ct).Status == 0x0000
    finally:
        assoc.release()


def test_garbage_pdu_and_abort_mid_transfer(serve_process, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node: RunningSCP = serve_process()
    sender = Sender(node, tmp_path, new_study([0.0], "pdu"))
    sender.good_store_still_works("start")

    # 1. not DICOM at all: an unknown PDU type, then noise
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(b"\x09\x00" + np.random.default_rng(2).bytes(2000))
        s.settimeout(10)
        try:
            while s.recv(4096):  # the SCP answers (A-ABORT) and closes; bounded by the timeout
                pass
        except (ConnectionResetError, TimeoutError):
            pass
    sender.good_store_still_works("garbage PDU")

    # 2. an established association whose P-DATA-TF stops half way, then the TCP connection drops
    assoc = node.associate()
    assert assoc.is_established
    raw_sock = assoc.dul.socket.socket
    raw_sock.sendall(struct.pack(">BBL", 0x04, 0, 600_000) + b"\x00" * 50_000)
    raw_sock.shutdown(socket.SHUT_RDWR)
    assoc.kill()
    deadline = time.monotonic() + 10
    ended = re.compile(r"association (aborted|closed): TESTSCU .* 0 stored, 0 refused")
    while time.monotonic() < deadline and not (node.log and ended.search(node.log.read_text())):
        time.sleep(0.1)
    assert node.log is not None and ended.search(node.log.read_text()), "the SCP did not drop the connection"
    sender.good_store_still_works("abort mid-transfer")

    # 3. A-ABORT from the peer right after association
    assoc = node.associate()
    assoc.abort()
    sender.good_store_still_works("A-ABORT")


def test_association_limit(serve_process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node: RunningSCP = serve_process(ITVNODE_MAX_ASSOCIATIONS="2")
    held = [node.associate() for _ in range(2)]
    assert all(a.is_established for a in held)
    extra = node.associate()
    assert extra.is_rejected
    rej = extra.acceptor.primitive
    assert (rej.result, rej.result_source, rej.diagnostic) == (0x02, 0x03, 0x02)  # local limit exceeded
    held.pop().release()
    # the released association's thread ends a moment after A-RELEASE-RP: a transient refusal until then
    deadline = time.monotonic() + 10
    while True:
        probe = node.associate()
        if probe.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert probe.is_established
    probe.release()
    sender = Sender(node, tmp_path, new_study([0.0], "limit"))
    sender.good_store_still_works("association limit")
    for a in held:
        a.release()


def test_disk_watermark_refuses_with_out_of_resources(make_scp, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node: RunningSCP = make_scp()
    sender = Sender(node, tmp_path, new_study([0.0], "disk"))
    sender.good_store_still_works("start")
    assert node.scp is not None
    node.scp.spool.min_free_bytes = node.scp.spool.free_bytes() + 1
    rsp = sender.send(sender.fresh())
    assert rsp.Status == st.OUT_OF_RESOURCES
    assert "watermark" in rsp.ErrorComment
    node.scp.spool.min_free_bytes = 0
    sender.good_store_still_works("disk watermark")


def test_unexpected_exception_is_cannot_understand(make_scp, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node: RunningSCP = make_scp()
    assert node.scp is not None
    sender = Sender(node, tmp_path, new_study([0.0], "boom"))
    real_store = node.scp.spool.store

    def broken(*args: Any, **kwargs: Any) -> Path:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(node.scp.spool, "store", broken)
    rsp = sender.send(sender.fresh())
    assert rsp.Status == st.CANNOT_UNDERSTAND
    assert rsp.ErrorComment == "internal error: RuntimeError"
    monkeypatch.setattr(node.scp.spool, "store", real_store)
    sender.good_store_still_works("unexpected exception")


def _storescu(node: RunningSCP, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STORESCU, "-d", "-aet", "PACS", "-aec", node.ae_title, "-to", "10", "127.0.0.1",
                           str(node.port), *map(str, files)], capture_output=True, text=True, timeout=120)


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_another_study_reusing_sop_instance_uids_keeps_the_first(serve_process, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9 item 3, with dcmtk storescu: a second study reusing the first one's SOP Instance UIDs deleted
    the first study's files. Now both are kept apart; the same UID in another series of a study is refused
    with 0xC005; an identical re-send stays a success."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node: RunningSCP = serve_process()
    first = new_study([0.0], "reuse-a")
    a_files = [_write(classic_slice(first, 0.0, i), tmp_path / f"a{i}.dcm") for i in range(12)]
    assert _storescu(node, a_files).returncode == 0
    a_bytes = {}
    spool = Spool(node.spool_dir)
    try:
        a_paths = {m.sop_instance_uid: p for m, p in spool.instances(first.study_uid)}
        a_bytes = {uid: p.read_bytes() for uid, p in a_paths.items()}
    finally:
        spool.close()
    assert len(a_paths) == 12

    second = new_study([0.0], "reuse-b")
    b_files = []
    for i in range(12):
        ds = classic_slice(first, 0.0, i)  # same SOP Instance UIDs, another study (an anonymiser, a copy)
        ds.StudyInstanceUID = second.study_uid
        ds.SeriesInstanceUID = second.series[0.0]
        b_files.append(_write(ds, tmp_path / f"b{i}.dcm"))
    assert _storescu(node, b_files).returncode == 0
    assert _storescu(node, a_files[:3]).returncode == 0  # identical re-send: success, nothing rewritten

    spool = Spool(node.spool_dir)
    try:
        assert {m.sop_instance_uid for m, _ in spool.instances(second.study_uid)} == set(a_paths)
        assert {uid: p.read_bytes() for uid, p in a_paths.items()} == a_bytes, "study A's files changed"
        assert spool.revisions(first.study_uid) == {} and spool.count() == 24
    finally:
        spool.close()

    sender = Sender(node, tmp_path, first)
    moved = classic_slice(first, 0.0, 0)
    moved.SeriesInstanceUID = generate_uid()
    rsp = sender.send(moved)
    assert rsp.Status == st.CONFLICTING_DUPLICATE == 0xC005
    assert "another series" in rsp.ErrorComment
    assert next(iter(a_paths.values())).exists() and not (node.spool_dir / first.study_uid /
                                                          str(moved.SeriesInstanceUID)).exists()


def test_storescu_sees_refusals_for_unusable_values(serve_process, tmp_path: Path) -> None:
    """Issue 9 items 5 and 6, with dcmtk storescu: NaN geometry, short Pixel Data and a leading-zero UID
    were answered 0x0000; each is now refused with its status and comment, and nothing is stored."""
    node: RunningSCP = serve_process()
    study = new_study([0.0], "storescu-values")
    cases = []
    ds = classic_slice(study, 0.0, 0)
    ds.ImagePositionPatient = ["NaN", -100.0, 0.0]
    cases.append((_write(ds, tmp_path / "nan.dcm"), 0xC006, "ImagePositionPatient not finite"))
    ds = classic_slice(study, 0.0, 1)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    cases.append((_write(ds, tmp_path / "short.dcm"), 0xC007, "PixelData 4096 bytes, image needs 8192"))
    ds = classic_slice(study, 0.0, 2)
    ds.SeriesInstanceUID = "1.02.3.4"
    cases.append((_write(ds, tmp_path / "uid.dcm"), 0xC002, "not a valid UID (leading zero"))
    for path, status, comment in cases:
        run = _storescu(node, [path])
        out = run.stdout + run.stderr
        assert run.returncode != 0, f"{path.name}: storescu reported success"
        assert f"0x{status:04x}".lower() in out.lower(), f"{path.name}: {out[-2000:]}"
        assert comment in out, f"{path.name}: ErrorComment missing from the response"
    good = _write(classic_slice(study, 0.0, 3), tmp_path / "good.dcm")
    assert _storescu(node, [good]).returncode == 0
    spool = Spool(node.spool_dir)
    try:
        assert len(spool.instances(study.study_uid)) == 1
    finally:
        spool.close()

"""C-STORE SCU against real peers: dcmtk storescp, Orthanc, pynetdicom SCPs with scripted answers."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from export_peers import dataset_bytes
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian, MRImageStorage, RLELossless
from pynetdicom import evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from service.net._pynetdicom_fast.ae import NoDelayAE
from service.net.scu import classify_status, send_files
from service.setting_values import Destination

AE_TITLE = "ITVNODE_TEST"


def test_storescp_receives_files_byte_identical(ct_files, storescp) -> None:
    files = ct_files(3) + ct_files(2, transfer_syntax=ImplicitVRLittleEndian)
    scp = storescp()
    outcome = send_files(files, Destination.parse(scp.address), AE_TITLE)
    assert outcome.ok, outcome.summary()
    assert [r.status for r in outcome.results] == [0] * 5
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in scp.received()}
    assert len(received) == 5
    for f in files:
        sent_meta = dcmread(f, stop_before_pixels=True).file_meta
        got = received[str(sent_meta.MediaStorageSOPInstanceUID)]
        got_meta = dcmread(got, stop_before_pixels=True).file_meta
        # storescp writes its own File Meta Information (its implementation UID, our AE as source AE), so the
        # meta group differs; what must match is the negotiated transfer syntax and the data set bytes.
        assert got_meta.TransferSyntaxUID == sent_meta.TransferSyntaxUID
        assert got_meta.MediaStorageSOPClassUID == sent_meta.MediaStorageSOPClassUID
        assert dataset_bytes(got) == dataset_bytes(f)
        assert got_meta.get("SourceApplicationEntityTitle", AE_TITLE).strip() == AE_TITLE


def test_compressed_file_is_sent_in_its_own_transfer_syntax(ct_files, storescp, tmp_path: Path) -> None:
    src = ct_files(1)[0]
    ds = dcmread(src)
    ds.compress(RLELossless)
    rle = tmp_path / "rle.dcm"
    ds.save_as(rle, enforce_file_format=True)
    scp = storescp()
    outcome = send_files([rle], Destination.parse(scp.address), AE_TITLE)
    assert outcome.ok, outcome.summary()
    (got,) = scp.received()
    assert dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLELossless
    assert dataset_bytes(got) == dataset_bytes(rle)


def test_orthanc_roundtrip_byte_identical(ct_files, orthanc) -> None:
    files = ct_files(2)
    outcome = send_files(files, Destination.parse(orthanc.address), AE_TITLE)
    assert outcome.ok, outcome.summary()
    for f in files:
        uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        data = orthanc.instance_file(uid)
        back = f.with_suffix(".orthanc")
        back.write_bytes(data)
        assert dataset_bytes(back) == dataset_bytes(f)


def test_orthanc_resend_replaces_instead_of_duplicating(ct_files, orthanc) -> None:
    files = ct_files(2)
    before = orthanc.instance_count()
    for _ in range(2):
        assert send_files(files, Destination.parse(orthanc.address), AE_TITLE).ok
    assert orthanc.instance_count() == before + 2


def test_orthanc_rejects_wrong_called_ae_permanently(ct_files, orthanc) -> None:
    dest = Destination(ae_title="NOT_ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
    outcome = send_files(ct_files(1), dest, AE_TITLE)
    assert not outcome.ok and outcome.permanent
    assert outcome.error is not None and "rejected (permanent)" in outcome.error
    assert "called AE title not recognised" in outcome.error


def test_unreachable_is_transient_with_reason(ct_files) -> None:
    with socket.socket() as s:  # a port that is bound but not listening refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        outcome = send_files(ct_files(1), Destination(ae_title="DOWN", host="127.0.0.1", port=port), AE_TITLE,
                             connect_timeout=2)
    assert not outcome.ok and not outcome.permanent and not outcome.connected
    assert outcome.error == f"cannot reach DOWN@127.0.0.1:{port}: connection refused"


def test_unresolvable_host_is_transient_not_raised(ct_files) -> None:
    dest = Destination(ae_title="NOWHERE", host="no-such-host.invalid", port=104)  # RFC 2606: never resolves
    outcome = send_files(ct_files(1), dest, AE_TITLE, connect_timeout=2)
    assert not outcome.ok and not outcome.permanent
    assert outcome.error is not None
    assert outcome.error.startswith("cannot reach NOWHERE@no-such-host.invalid:104")


def test_silent_peer_times_out_transient(ct_files) -> None:
    with socket.socket() as srv:  # accepts TCP but never answers the A-ASSOCIATE-RQ
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        port = srv.getsockname()[1]
        outcome = send_files(ct_files(1), Destination(ae_title="MUTE", host="127.0.0.1", port=port), AE_TITLE,
                             acse_timeout=0.5, connect_timeout=2)
    assert outcome.connected and not outcome.ok and not outcome.permanent
    assert outcome.error is not None and "no association response" in outcome.error


def test_status_classification_follows_ps34() -> None:
    assert classify_status(0x0000) == (True, False, "success")
    assert classify_status(0xB000)[:2] == (True, False)
    assert classify_status(0xA700)[:2] == (False, False)
    assert classify_status(0xA7FF)[:2] == (False, False)
    assert classify_status(0xA900)[:2] == (False, True)
    assert classify_status(0xC123)[:2] == (False, True)
    assert classify_status(0x0122)[:2] == (False, True)
    assert classify_status(0x0110)[:2] == (False, False)


def test_scripted_statuses_per_file(ct_files, scripted_scp) -> None:
    scp = scripted_scp(statuses=[0xA700, 0x0000, 0xC000])
    outcome = send_files(ct_files(3), Destination.parse(scp.address), AE_TITLE)
    got = [(r.delivered, r.permanent, r.status) for r in outcome.results]
    assert got == [(False, False, 0xA700), (True, False, 0x0000), (False, True, 0xC000)]
    assert outcome.permanent and len(scp.received) == 1


def test_sop_class_not_accepted_is_permanent(ct_files, scripted_scp) -> None:
    scp = scripted_scp(sop_classes=[MRImageStorage])
    outcome = send_files(ct_files(2), Destination.parse(scp.address), AE_TITLE)
    assert outcome.permanent and not outcome.delivered
    assert all("presentation contexts rejected" in r.message for r in outcome.results)
    assert scp.requests == 0


def test_transfer_syntax_is_not_converted(ct_files, scripted_scp) -> None:
    """A peer that accepts CT only in Implicit VR gets nothing: we never transcode Explicit VR files."""
    scp = scripted_scp(transfer_syntaxes=[ImplicitVRLittleEndian])
    explicit = ct_files(1)
    implicit = ct_files(1, transfer_syntax=ImplicitVRLittleEndian)
    outcome = send_files(explicit + implicit, Destination.parse(scp.address), AE_TITLE)
    assert [r.delivered for r in outcome.results] == [False, True]
    assert outcome.results[0].permanent


def test_our_socket_has_tcp_nodelay(scripted_scp) -> None:
    scp = scripted_scp()
    seen: list[int] = []

    def on_open(event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]
        assert sock is not None
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    ae = NoDelayAE(ae_title=AE_TITLE)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    try:
        assert assoc.is_established
    finally:
        assoc.release()
        ae.shutdown()
    assert seen and seen[0] != 0


def test_not_dicom_file_is_reported_not_raised(tmp_path: Path, scripted_scp) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    dest = Destination.parse(scripted_scp().address)
    outcome = send_files([junk, tmp_path / "missing.dcm"], dest, AE_TITLE)
    assert [r.delivered for r in outcome.results] == [False, False]
    assert all(r.permanent for r in outcome.results)


def test_parallel_sends_do_not_interfere(ct_files, storescp) -> None:
    scp = storescp()
    batches = [ct_files(2) for _ in range(3)]
    outcomes: list[bool] = []

    def go(files: list[Path]) -> None:
        outcomes.append(send_files(files, Destination.parse(scp.address), AE_TITLE).ok)

    threads = [threading.Thread(target=go, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert outcomes == [True, True, True]
    assert len(scp.received()) == 6


@pytest.mark.parametrize("bad", ["ITVNODE", "x@y", "A@host:notaport"])
def test_destination_parse_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        Destination.parse(bad)


@pytest.mark.slow
def test_concurrent_senders_never_lose_a_response(ct_files, scripted_scp) -> None:
    """Regression: pynetdicom's reactor could take a C-STORE-RSP meant for send_c_store (see
    _pynetdicom_fast.dimse.guard_reactor); without the guard about 1 in 200 sends here waited out the DIMSE
    timeout."""
    scp = scripted_scp()
    files = ct_files(2)
    failures: list[str] = []

    def sender() -> None:
        for _ in range(25):
            out = send_files(files, Destination.parse(scp.address), AE_TITLE, dimse_timeout=5)
            if not out.ok:
                failures.append(out.summary())

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert failures == []
    assert scp.requests == 4 * 25 * 2

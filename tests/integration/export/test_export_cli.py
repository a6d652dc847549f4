"""``itvnode send`` in a subprocess, against dcmtk storescp and a TLS pynetdicom SCP."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage
from pynetdicom import AE, evt

from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[3]


def itvnode(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
    return subprocess.run([sys.executable, "-m", "itvnode.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_send_reports_each_file_and_exits_zero(ct_files, storescp) -> None:
    files = ct_files(3)
    scp = storescp()
    proc = itvnode("send", *map(str, files), "--to", scp.address, "--calling-ae", "RESENDER")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("OK     0x0000 ") for line in lines)
    assert "3 of 3 file(s) stored" in proc.stderr
    assert len(scp.received()) == 3
    meta = dcmread(scp.received()[0], stop_before_pixels=True).file_meta
    assert str(meta.SourceApplicationEntityTitle).strip() == "RESENDER"


def test_send_a_folder_to_two_destinations(ct_files, storescp) -> None:
    files = ct_files(2)
    a, b = storescp(), storescp()
    proc = itvnode("send", str(files[0].parent), "--to", a.address, "--to", b.address)
    assert proc.returncode == 0, proc.stderr
    assert len(a.received()) == 2 and len(b.received()) == 2


def test_send_unreachable_says_so_and_fails(ct_files) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        proc = itvnode("send", *map(str, ct_files(2)), "--to", f"NOBODY@127.0.0.1:{port}", "--timeout", "3")
    assert proc.returncode == 3
    assert f"cannot reach NOBODY@127.0.0.1:{port}: connection refused" in proc.stderr
    assert proc.stdout.count("FAILED") == 2


def test_send_partial_failure_exits_one(ct_files, tmp_path: Path, storescp) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 200)
    scp = storescp()
    proc = itvnode("send", str(ct_files(1)[0]), str(junk), "--to", scp.address)
    assert proc.returncode == 1
    assert "OK" in proc.stdout and "FAILED" in proc.stdout and "not a DICOM Part 10 file" in proc.stdout


def test_send_bad_destination_is_usage_error(ct_files) -> None:
    proc = itvnode("send", str(ct_files(1)[0]), "--to", "nohostport")
    assert proc.returncode == 2 and "AE@host:port" in proc.stderr


def _make_ca(tmp: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    ossl = shutil.which("openssl")
    if ossl is None:
        pytest.skip("openssl not installed")

    def run(*args: str) -> None:
        subprocess.run([ossl, *args], cwd=tmp, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=itvnode test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr",
        "-subj", "/CN=127.0.0.1")
    (tmp / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "srv.pem", "-days", "2", "-extfile", "ext.cnf")
    return tmp / "ca.pem", tmp / "srv.pem", tmp / "srv.key"


@pytest.fixture
def tls_scp(tmp_path: Path) -> Iterator[tuple[int, Path, list[str]]]:
    """A pynetdicom Storage SCP behind TLS with a throw-away CA: ``(port, ca.pem, received SOP UIDs)``."""
    from service.net.tls import server_context

    ca, cert, key = _make_ca(tmp_path)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[union-attr]
        return 0x0000

    ae = AE(ae_title="TLSSCP")
    ae.add_supported_context(CTImageStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)],
                             ssl_context=server_context(cert, key))
    assert server is not None
    try:
        yield port, ca, received
    finally:
        server.shutdown()


@pytest.mark.slow
def test_send_over_tls(ct_files, tls_scp: tuple[int, Path, list[str]], tmp_path: Path) -> None:
    port, ca, received = tls_scp
    files = ct_files(2)
    proc = itvnode("send", *map(str, files), "--to", f"TLSSCP@127.0.0.1:{port}", "--tls-ca", str(ca))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(received) == 2
    # a CA that did not sign the server certificate: refused, and no plaintext fallback
    proc = itvnode("send", str(files[0]), "--to", f"TLSSCP@127.0.0.1:{port}", "--tls-ca",
                   str(tmp_path / "srv.pem"), "--timeout", "5")
    assert proc.returncode == 3 and len(received) == 2
    assert "TLS handshake failed: CERTIFICATE_VERIFY_FAILED" in proc.stderr


@pytest.mark.slow
def test_outbox_delivers_over_tls_to_a_yaml_destination(
        ct_files, tls_scp: tuple[int, Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.net.scu import Timeouts, deliver_item
    from service.settings import load_settings
    from service.store.outbox import Outbox, RetryPolicy

    port, ca, received = tls_scp
    cfg = tmp_path / "itvnode.yaml"
    cfg.write_text(f"destinations:\n  - ae_title: TLSSCP\n    host: 127.0.0.1\n    port: {port}\n"
                   f"    tls: {{ca: {ca}}}\n  - PLAIN@127.0.0.1:{free_port()}\n")
    monkeypatch.setenv("ITVNODE_CONFIG", str(cfg))
    monkeypatch.delenv("ITVNODE_DESTINATIONS", raising=False)
    settings = load_settings(data_dir=tmp_path / "data")
    assert settings.destinations[0].tls is not None
    box = Outbox(settings.outbox_dir, RetryPolicy.from_settings(settings))
    item = box.put(ct_files(2), settings.destinations)
    states = deliver_item(box, item.item_id, settings.ae_title, timeouts=Timeouts(connect=5, acse=5))
    assert states[f"TLSSCP@127.0.0.1:{port}"].status == "delivered" and len(received) == 2
    plain = [k for k in states if k.startswith("PLAIN@")][0]
    assert states[plain].status == "pending"  # nothing listens there: retried later, TLS one unaffected

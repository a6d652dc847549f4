"""DICOM TLS: a throwaway CA (openssl CLI), mutual authentication, plain and unauthenticated peers refused."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scp_ctdata import classic_slice, new_study
from scp_helpers import scu

from service.net.scp import build_scp
from service.net.tls import client_context
from service.settings import load_settings
from service.store.spool import Spool

OPENSSL = "/usr/bin/openssl"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=itvnode test CA", cwd=d)
    for name, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", None)):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        ext = ["-extfile", f"{name}.ext"] if san else []
        if san:
            (d / f"{name}.ext").write_text(san + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", *ext, cwd=d)
    return d


@pytest.fixture
def tls_node(pki: Path, tmp_path: Path) -> Iterator[tuple[int, Spool]]:
    tls = {"cert": pki / "server.crt", "key": pki / "server.key", "ca": pki / "ca.crt"}
    settings = load_settings(host="127.0.0.1", port=0, data_dir=tmp_path, min_free_bytes=0, tls=tls)
    spool = Spool(settings.spool_dir)
    scp = build_scp(settings, spool)
    assert scp.ssl_context is not None
    port = scp.start()
    yield port, spool
    scp.stop()
    spool.close()


def test_mutual_tls_association_stores(tls_node: tuple[int, Spool], pki: Path) -> None:
    port, spool = tls_node
    ctx = client_context(pki / "ca.crt", pki / "client.crt", pki / "client.key")
    assoc = scu().associate("127.0.0.1", port, ae_title="ITVNODE", tls_args=(ctx, "127.0.0.1"))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        ds = classic_slice(new_study([0.0], "tls"), 0.0, 0)
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert spool.count() == 1


def test_client_without_certificate_and_plain_tcp_refused(tls_node: tuple[int, Spool], pki: Path) -> None:
    port, spool = tls_node
    silent = socket.create_connection(("127.0.0.1", port), timeout=5)  # never handshakes, blocks no one
    no_cert = client_context(pki / "ca.crt")
    assoc = scu().associate("127.0.0.1", port, ae_title="ITVNODE", tls_args=(no_cert, "127.0.0.1"))
    assert not assoc.is_established
    plain = scu().associate("127.0.0.1", port, ae_title="ITVNODE")
    assert not plain.is_established
    # still serving authenticated peers
    ctx = client_context(pki / "ca.crt", pki / "client.crt", pki / "client.key")
    assoc = scu().associate("127.0.0.1", port, ae_title="ITVNODE", tls_args=(ctx, "127.0.0.1"))
    assert assoc.is_established
    assoc.release()
    silent.close()


def test_silent_peer_closed_during_the_tls_handshake(pki: Path, tmp_path: Path) -> None:
    """The first-PDU timer covers the handshake: a peer that connects and never speaks TLS is closed after
    first_pdu_timeout, not after the 60 s network timeout its socket carries."""
    tls = {"cert": pki / "server.crt", "key": pki / "server.key", "ca": pki / "ca.crt"}
    settings = load_settings(host="127.0.0.1", port=0, data_dir=tmp_path, min_free_bytes=0, tls=tls,
                             first_pdu_timeout=1.0)
    spool = Spool(settings.spool_dir)
    scp = build_scp(settings, spool)
    port = scp.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
            t0 = time.monotonic()
            try:
                assert silent.recv(1) == b""
            except ConnectionResetError:
                pass
            assert time.monotonic() - t0 < 3.0
        assert scp.gate.counts() == (0, 0)
    finally:
        scp.stop()
        spool.close()

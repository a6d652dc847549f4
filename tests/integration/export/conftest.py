"""Real peers for the export tests: dcmtk storescp, Orthanc and pynetdicom SCPs on loopback (free ports)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from export_peers import ABORT, wait_listening
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.ctdata import make_ct
from tests.support.net import free_port

STORESCP = Path("/usr/bin/storescp")
ORTHANC = Path("/usr/sbin/Orthanc")


@pytest.fixture
def ct_files(tmp_path: Path) -> Callable[..., list[Path]]:
    """``ct_files(n, transfer_syntax=...)`` writes ``n`` CT files of one new series."""
    counter = iter(range(10_000))

    def make(n: int = 3, transfer_syntax: str = ExplicitVRLittleEndian) -> list[Path]:
        folder = tmp_path / f"ct{next(counter)}"
        study, series = generate_uid(), generate_uid()
        return [make_ct(folder, i, study_uid=study, series_uid=series, transfer_syntax=transfer_syntax)
                for i in range(n)]

    return make


# ----------------------------------------------------------------------------------------------- storescp


@dataclass
class StoreSCP:
    port: int
    out_dir: Path
    ae_title: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TCP_NODELAY="1")
        # +B: write the data set exactly as received (bit-preserving); storescp still writes its own meta.
        # Its log goes to a file: an unread pipe would eventually block it.
        with open(self.out_dir.parent / f"{self.out_dir.name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(STORESCP), "-od", str(self.out_dir), "-aet", self.ae_title, "+B", "+xa", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_listening(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """``storescp(start=True, port=None, ae_title="STORESCP")``: dcmtk storescp writing to a tmp folder."""
    started: list[StoreSCP] = []

    def make(start: bool = True, port: int | None = None, ae_title: str = "STORESCP") -> StoreSCP:
        scp = StoreSCP(port=port or free_port(), out_dir=tmp_path / f"storescp{len(started)}",
                       ae_title=ae_title)
        started.append(scp)
        return scp.start() if start else scp

    yield make
    for scp in started:
        scp.stop()


# ----------------------------------------------------------------------------------------------- Orthanc


@dataclass
class Orthanc:
    dicom_port: int
    http_port: int
    ae_title: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as rsp:
            data = rsp.read()
            return json.loads(data) if rsp.headers.get_content_type() == "application/json" else data

    def post(self, path: str, body: str) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body.encode(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return json.loads(rsp.read())

    def instance_file(self, sop_instance_uid: str) -> bytes:
        found = self.post("/tools/lookup", sop_instance_uid)
        ids = [f["ID"] for f in found if f["Type"] == "Instance"]
        assert len(ids) == 1, f"instance {sop_instance_uid} not found in Orthanc: {found}"
        data = self.get(f"/instances/{ids[0]}/file")
        assert isinstance(data, bytes)
        return data

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.dicom_port}"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A real Orthanc (module-scoped: starting it costs ~1 s) that checks the called AE title."""
    if not ORTHANC.exists():
        pytest.skip("Orthanc is not installed (tests/peers.sh installs it)")
    root = tmp_path_factory.mktemp("orthanc")
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "itvnode-export-test",
        "DicomAet": "ORTHANCTEST",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "StorageCompression": False,
        "SaveJobs": False,
        "Plugins": [],
        "DicomModalities": {},
        "HttpServerEnabled": True,
    }
    cfg = root / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log_path = root / "orthanc.log"
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen([str(ORTHANC), str(cfg)], stdout=log_fh, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TCP_NODELAY="1"))
    server = Orthanc(dicom_port, http_port, "ORTHANCTEST", proc, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                server.get("/system")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("Orthanc did not answer /system within 30 s") from None
                time.sleep(0.1)
        wait_listening(dicom_port, proc)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# ----------------------------------------------------------------------------------------------- pynetdicom


@dataclass
class ScriptedSCP:
    """A pynetdicom Storage SCP whose C-STORE answers follow ``statuses`` (then 0x0000); ``ABORT`` in
    ``statuses`` aborts the association instead of answering."""

    port: int
    ae_title: str
    statuses: list[int] = field(default_factory=list)
    received: list[str] = field(default_factory=list)  # SOP instance UIDs answered 0x0000
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def handle_store(self, event: Any) -> int:
        with self.lock:
            self.requests += 1
            status = self.statuses.pop(0) if self.statuses else 0x0000
            if status == ABORT:
                event.assoc.abort()
                return 0xA700  # never reaches the peer
            if status == 0x0000:
                self.received.append(str(event.request.AffectedSOPInstanceUID))
        return status


@pytest.fixture
def scripted_scp() -> Iterator[Callable[..., ScriptedSCP]]:
    """``scripted_scp(statuses=[...], sop_classes=[CTImageStorage], ae_title="SCRIPTED",
    require_called_aet=True, transfer_syntaxes=None)``."""
    servers: list[Any] = []  # ThreadedAssociationServer

    def make(statuses: list[int] | None = None, sop_classes: list[str] | None = None,
             ae_title: str = "SCRIPTED", require_called_aet: bool = True,
             transfer_syntaxes: list[str] | None = None) -> ScriptedSCP:
        scp = ScriptedSCP(port=0, ae_title=ae_title, statuses=list(statuses or []))
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        ts = transfer_syntaxes or [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        for sop in sop_classes or [CTImageStorage]:
            ae.add_supported_context(sop, ts)
        ae.add_supported_context(Verification)
        server = ae.start_server(("127.0.0.1", 0), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, scp.handle_store)])
        assert server is not None and server.socket is not None
        scp.port = int(server.socket.getsockname()[1])
        servers.append(server)
        return scp

    yield make
    for server in servers:
        server.shutdown()

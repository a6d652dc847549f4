"""Helpers shared by the Storage SCP tests (peers, ports, SCU factory)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from service.net.scp import StorageSCP
from service.store.spool import Spool

REPO = Path(__file__).resolve().parents[3]
ITVNODE = REPO / ".venv" / "bin" / "itvnode"
ECHOSCU = "/usr/bin/echoscu"
STORESCU = "/usr/bin/storescu"
CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"


def scu(ae_title: str = "TESTSCU", contexts: tuple[str, ...] = (CT, ENHANCED_CT, VERIFICATION)) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 10
    for uid in contexts:  # explicit VR first: the SCP takes the requestor's first choice
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae


@dataclass
class RunningSCP:
    port: int
    data_dir: Path
    spool_dir: Path
    ae_title: str = "ITVNODE"
    scp: StorageSCP | None = None  # in-process only
    proc: subprocess.Popen[str] | None = None  # subprocess only
    log: Path | None = None

    def spool(self) -> Spool:
        return Spool(self.spool_dir)

    def associate(self, calling: str = "TESTSCU", **kwargs: Any) -> Any:
        return scu(calling).associate("127.0.0.1", self.port, ae_title=self.ae_title, **kwargs)



def echo_ok(port: int, called: str = "ITVNODE", calling: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run([ECHOSCU, "-aet", calling, "-aec", called, "-to", "5", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=20)



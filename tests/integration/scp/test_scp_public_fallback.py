"""The SCP on pynetdicom's stock classes: what any pynetdicom other than the pinned 3.0.x gets.

``service.net._pynetdicom_fast.FAST_REACTOR`` is false when the installed version is not the one the private
overrides mirror (tests/unit/test_pynetdicom_contract.py); the SCP must then still serve, through the public
API plus the policy ACSE, against the real dcmtk peers.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket
from scp_ctdata import new_study, write_study
from scp_helpers import STORESCU, RunningSCP, echo_ok

import service.net._pynetdicom_fast
from service.net._pynetdicom_fast.acse import PolicyACSE
from service.net._pynetdicom_fast.transport import SCPRequestHandler


@pytest.fixture
def stock_classes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[type, type, type, type]]:
    """Switch the fast reactor off in-process; record the classes each association is built from."""
    monkeypatch.setattr(service.net._pynetdicom_fast, "FAST_REACTOR", False)
    seen: list[tuple[type, type, type, type]] = []
    original: Callable[[Any], Association] = SCPRequestHandler._create_association

    def spy(self: Any) -> Association:
        assoc = original(self)
        seen.append((type(assoc), type(assoc.dul), type(assoc.dul.socket), type(assoc.acse)))
        return assoc

    monkeypatch.setattr(SCPRequestHandler, "_create_association", spy)
    return seen


def test_the_stock_reactor_serves_c_echo_and_c_store(make_scp, stock_classes, tmp_path: Path) -> None:
    node: RunningSCP = make_scp()
    assert echo_ok(node.port).returncode == 0

    study = new_study([0.0, 50.0], seed="fallback")
    files = write_study(study, tmp_path / "in", n_slices=3, size=32)
    res = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", node.ae_title, "-to", "10", "127.0.0.1",
                          str(node.port), *map(str, files)], capture_output=True, text=True, timeout=120,
                         env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stdout + res.stderr

    assert node.scp is not None
    stored = node.scp.spool.instances(study.study_uid)
    assert sorted(m.sop_instance_uid for m, _ in stored) == sorted(p.stem for p in files)
    assert len(stock_classes) == 2  # one association each for echoscu and storescu
    for assoc_cls, dul_cls, socket_cls, acse_cls in stock_classes:
        assert (assoc_cls, dul_cls, socket_cls) == (Association, DULServiceProvider, AssociationSocket)
        assert acse_cls is PolicyACSE  # the caller policy still applies


def test_the_caller_policy_still_refuses_on_the_stock_reactor(make_scp, stock_classes) -> None:
    node: RunningSCP = make_scp(allowed_callers=["PACS"])
    refused = echo_ok(node.port, calling="STRANGER")
    assert refused.returncode != 0
    assert echo_ok(node.port, calling="PACS").returncode == 0
    assert [c[1] for c in stock_classes] == [DULServiceProvider, DULServiceProvider]

"""The pynetdicom internals that service/net/_pynetdicom_fast/ overrides or calls, fenced.

That package (used by service/net/scp.py and service/net/scu.py) subclasses private pynetdicom classes and
mirrors some of their loops (see the docstrings there: event-driven reactors, PDU length checks before
allocation, TCP_NODELAY requestor sockets, the reactor guard for C-STORE responses, the chunked-send
switch). pyproject.toml pins the pynetdicom they were written against. An upgrade must fail here, naming
what changed, rather than misbehave on a hospital network:

- every private name we use still exists, with the parameters we pass;
- every stock method that we mirror or replace is unchanged (a fingerprint of its source: comment-only and
  blank lines ignored). When one fails: diff that method between the pinned and the new pynetdicom, port the
  change into the override named in the message, then update the fingerprint below.

tests/integration/scp/test_scp_public_fallback.py checks that the SCP still serves through the stock classes
when ``service.net._pynetdicom_fast.FAST_REACTOR`` is off (what another pynetdicom version gets).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import tomllib
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association

ROOT = Path(__file__).resolve().parents[2]
PINNED = "3.0.4"
#: Where the overrides live; the labels below are relative to it.
FENCE = "service/net/_pynetdicom_fast/"

#: Stock methods that an override of ours copies or replaces, fingerprinted in pynetdicom PINNED.
#: path under ``pynetdicom`` -> (fingerprint, our code in FENCE that depends on its exact body)
MIRRORED: dict[str, tuple[str, str]] = {
    "acse.ACSE._negotiate_as_acceptor": (
        "f49644a6d11ff64a", "acse.py PolicyACSE._negotiate_as_acceptor (checks, then calls it)"),
    "ae.ApplicationEntity._create_socket": (
        "9b9f827b2e6ddfdd", "ae.py NoDelayAE._create_socket (replaces it)"),
    "association.Association.__init__": (
        "b806282a2d942c1d", "association.py FastAssociation.__init__ (swaps in FastDUL)"),
    "association.Association._run_reactor": (
        "ca3acbb824fbca27", "association.py FastAssociation._run_reactor (a copy blocking on DIMSE)"),
    "dimse.DIMSEServiceProvider.get_msg": (
        "c212cbcab6189184", "dimse.py guard_reactor (wraps it)"),
    "association.Association._serve_request": (
        "7718713783b27256", "dimse.py FastDIMSE._serve_here (which requests it may serve in the DUL thread: "
        "its aborting branches wait for that thread)"),
    "service_class.StorageServiceClass.SCP": (
        "43ee94934c94e0df", "dimse.py FastDIMSE._serve_here (run in the DUL thread; must not block on it)"),
    "dimse.DIMSEServiceProvider.receive_primitive": (
        "ce54996cc62896fa", "dimse.py FastDIMSE.stream_done (a copy of its tail for a C-STORE-RQ)"),
    "dimse_messages.DIMSEMessage.decode_msg": (
        "df7467ef19607cff", "dimse.py FastDIMSE (streams the data set fragments it would assemble)"),
    "events.Event.encoded_dataset": (
        "d3eb56bceaf780b7", "dimse.py FastDIMSE._open_stream (the same file meta, then the data set)"),
    "events.Event.file_meta.fget": (
        "d862fd34e520ba3e", "dimse.py FastDIMSE._open_stream (the same file meta elements)"),
    "fsm.DT_2": (
        "b2cf0649ade29e42", "dul.py FastDUL._read_pdata (P-DATA-TF in Sta6 goes straight to DIMSE)"),
    "pdu.P_DATA_TF._generate_items": (
        "d4bfbc773c1f4f23", "dul.py FastDUL._read_pdata (reads the PDV items itself)"),
    "dul.DULServiceProvider.__init__": (
        "bfebea18107e93cc", "dul.py FastDUL.__init__ (extends it)"),
    "dul.DULServiceProvider._read_pdu_data": (
        "500d0ff5100c941f", "dul.py FastDUL._read_pdu_data (length checked first)"),
    "dul.DULServiceProvider.run_reactor": (
        "c648dadd489eec02", "dul.py FastDUL.run_reactor (a copy with select())"),
    "transport.AssociationSocket._create_socket": (
        "c142d63cc576d0b4", "transport.py NoDelaySocket._create_socket (a copy plus TCP_NODELAY)"),
    "transport.AssociationSocket.recv": (
        "08f867a5b4ff58f3", "transport.py FastSocket.recv (replaces it)"),
    "transport.RequestHandler._create_association": (
        "21eeee1815067005",
        "transport.py SCPRequestHandler._create_association (a copy with our classes)"),
}

#: Private (or easily missed) names we import, call or set, and where in FENCE.
NAMES: dict[str, str] = {
    "_globals.MODE_ACCEPTOR": "transport.py SCPRequestHandler._create_association",
    "_handlers.standard_dimse_recv_handler": "handlers.py _STANDARD_LOG_HANDLERS (unbound)",
    "_handlers.standard_dimse_sent_handler": "handlers.py _STANDARD_LOG_HANDLERS",
    "_handlers.standard_pdu_recv_handler": "handlers.py _STANDARD_LOG_HANDLERS",
    "_handlers.standard_pdu_sent_handler": "handlers.py _STANDARD_LOG_HANDLERS",
    "_config.STORE_SEND_CHUNKED_DATASET":
        "config.py send_files_as_stored (files sent as stored, set by send_files)",
    "pdu.A_ABORT_RQ": "dul.py FastDUL._send_abort",
    "pdu_primitives.A_P_ABORT": "dul.py FastDUL (wakes the association thread)",
    "dul.DULServiceProvider._decode_pdu": "dul.py FastDUL._read_pdu_data",
    "dul.DULServiceProvider._process_recv_primitive": "dul.py FastDUL.run_reactor",
    "dul.DULServiceProvider._is_transport_event": "dul.py FastDUL.run_reactor",
    "dul.DULServiceProvider.send_pdu": "dul.py FastDUL.send_pdu (wakes the reactor)",
    "dul.DULServiceProvider.kill_dul": "dul.py FastDUL.kill_dul (wakes the reactor)",
    "dul.DULServiceProvider.idle_timer_expired": "association.py FastAssociation._run_reactor",
    "dul.DULServiceProvider.receive_pdu": "association.py FastAssociation._run_reactor",
    "association.Association._serve_request": "association.py FastAssociation._run_reactor",
    "association.Association.set_socket": "transport.py SCPRequestHandler._create_association",
    "association.Association.unbind": "handlers.py unbind_standard_log_handlers",
    "acse.ACSE.send_reject": "acse.py PolicyACSE._negotiate_as_acceptor",
    "acse.ACSE.is_release_requested": "association.py FastAssociation._run_reactor",
    "acse.ACSE.is_aborted": "association.py FastAssociation._run_reactor",
    "acse.ACSE.send_release": "association.py FastAssociation._run_reactor",
    "transport.ThreadedAssociationServer.process_request_thread": "transport.py SCPServer",
    "transport.ThreadedAssociationServer.service_actions":
        "transport.py SCPServer (the admission gate)",
    "transport.ThreadedAssociationServer.get_request":
        "transport.py SCPServer (TLS handshake per thread)",
    "events.NotificationEvent": "transport.py SCPRequestHandler._create_association",
    "dimse_messages.C_STORE_RQ": "dimse.py FastDIMSE._open_stream",
    "dimse_messages.DIMSEMessage.message_to_primitive": "dimse.py FastDIMSE.stream_done",
    "dsutils.create_file_meta": "dimse.py FastDIMSE._open_stream",
    "dsutils.encode_file_meta": "dimse.py FastDIMSE._open_stream",
    "pdu_primitives.P_DATA": "dimse.py FastDIMSE.receive_fragment",
    "association.Association.get_handlers": "dul.py FastDUL._fast_pdata",
    "sop_class.uid_to_service_class": "dimse.py FastDIMSE._serve_here",
    "events.EVT_DATA_RECV": "dul.py FastDUL._fast_pdata (raw PDU listeners: the stock path)",
}

#: Instance attributes (set in ``__init__``, so not on the classes) that our overrides read or write.
DUL_ATTRIBUTES = ("event_queue", "to_user_queue", "to_provider_queue", "_recv_pdu", "_kill_thread",
                  "_idle_timer", "artim_timer", "state_machine", "_run_loop_delay", "socket")
ASSOCIATION_ATTRIBUTES = ("_accepted_cx", "_sent_release", "_dul_ready", "_kill", "_reactor_checkpoint",
                          "_is_paused", "_server", "dul", "dimse", "acse", "acceptor", "requestor",
                          "is_established", "is_released", "is_aborted")
SERVER_ATTRIBUTES = ("_handlers", "contexts", "ae_title", "ae", "ssl_context", "active_associations")


def fingerprint(obj: Any) -> str:
    """sha256 of an object's source, blank and comment-only lines dropped, indentation ignored."""
    lines = (line.strip() for line in inspect.getsource(obj).splitlines())
    kept = [line for line in lines if line and not line.startswith("#")]
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


def resolve(path: str) -> Any:
    module, _, rest = path.partition(".")
    obj: Any = importlib.import_module(f"pynetdicom.{module}")
    for part in rest.split("."):
        obj = getattr(obj, part)
    return obj


def test_pynetdicom_is_the_pinned_version() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if re.match(r"pynetdicom\b", d)]
    assert pins == [f"pynetdicom=={PINNED}"], (
        f"pyproject.toml must pin pynetdicom=={PINNED} (the version service/net/_pynetdicom_fast/ "
        f"overrides), found {pins}")
    assert pynetdicom.__version__ == PINNED, (
        f"pynetdicom {pynetdicom.__version__} is installed, the overrides were written against {PINNED}: "
        "run `make install`, or read this file's docstring before moving the pin")


def test_the_fast_reactor_is_on_for_the_pinned_version() -> None:
    import service.net._pynetdicom_fast

    assert service.net._pynetdicom_fast.FAST_REACTOR, (
        f"service/net/_pynetdicom_fast FAST_REACTOR is off on pynetdicom {pynetdicom.__version__}")


@pytest.mark.parametrize("path", sorted(NAMES))
def test_private_names_still_exist(path: str) -> None:
    try:
        resolve(path)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"pynetdicom {pynetdicom.__version__} has no {path} ({exc}); "
                    f"{FENCE}{NAMES[path]} uses it")


@pytest.mark.parametrize("path", sorted(MIRRORED))
def test_mirrored_methods_are_unchanged(path: str) -> None:
    expected, used_by = MIRRORED[path]
    used_by = FENCE + used_by
    try:
        got = fingerprint(resolve(path))
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"pynetdicom {pynetdicom.__version__} has no {path} ({exc}); {used_by} depends on it")
    assert got == expected, (
        f"pynetdicom {pynetdicom.__version__} changed {path} (fingerprint {got}, {expected} in {PINNED}); "
        f"{used_by} depends on its body: diff it against {PINNED}, port the change, then update MIRRORED "
        f"in {Path(__file__).name}")


def test_instance_attributes_that_the_overrides_use() -> None:
    assoc = Association(AE(), MODE_ACCEPTOR)  # builds the DUL and ACSE; starts no thread
    missing = [f"DULServiceProvider().{a}" for a in DUL_ATTRIBUTES if not hasattr(assoc.dul, a)]
    missing += [f"Association().{a}" for a in ASSOCIATION_ATTRIBUTES if not hasattr(assoc, a)]
    missing += [f"Association().dimse.{a}" for a in ("msg_queue", "get_msg", "message")
                if not hasattr(assoc.dimse, a)]
    missing += [f"Association().dul.state_machine.{a}" for a in ("current_state", "do_action")
                if not hasattr(assoc.dul.state_machine, a)]
    if not hasattr(assoc.requestor, "primitive"):
        missing.append("Association().requestor.primitive")
    assert not missing, (f"pynetdicom {pynetdicom.__version__} lost attributes that "
                         f"service/net/_pynetdicom_fast's FastDUL/FastAssociation/PolicyACSE use: {missing}")


def test_server_attributes_and_hooks_that_the_scp_uses() -> None:
    ae = AE()
    ae.add_supported_context("1.2.840.10008.1.1")
    handler = pynetdicom.transport.RequestHandler
    server = ae.make_server(("127.0.0.1", 0), request_handler=handler)
    try:
        missing = [a for a in SERVER_ATTRIBUTES if not hasattr(server, a)]
        assert not missing, (f"pynetdicom {pynetdicom.__version__}: the association server has no {missing}; "
                             "service/net/_pynetdicom_fast/transport.py SCPRequestHandler/SCPServer and "
                             "service/net/scp.py StorageSCP use them")
        assert hasattr(ae, "_servers"), ("AE()._servers is gone; service/net/_pynetdicom_fast/ae.py "
                                         "register_server appends the SCP's server there")
        assert hasattr(ae, "_create_socket"), (
            "AE._create_socket is gone; service/net/_pynetdicom_fast/ae.py NoDelayAE overrides it")
    finally:
        server.server_close()


def test_the_chunked_send_switch_is_still_read() -> None:
    """service/net/_pynetdicom_fast/config.py sets it so that files go out as stored; a switch nobody reads
    would silently transcode."""
    source = inspect.getsource(importlib.import_module("pynetdicom.association"))
    assert "STORE_SEND_CHUNKED_DATASET" in source, (
        f"pynetdicom {pynetdicom.__version__}.association no longer reads _config.STORE_SEND_CHUNKED_DATASET "
        "(set by service/net/_pynetdicom_fast/config.py send_files_as_stored)")


def test_overridden_signatures() -> None:
    """Our overrides take the parameters pynetdicom calls them with."""
    from service.net._pynetdicom_fast.acse import PolicyACSE
    from service.net._pynetdicom_fast.ae import NoDelayAE
    from service.net._pynetdicom_fast.association import FastAssociation
    from service.net._pynetdicom_fast.dul import FastDUL
    from service.net._pynetdicom_fast.transport import FastSocket, NoDelaySocket, SCPRequestHandler
    pairs = [
        (resolve("ae.ApplicationEntity._create_socket"), NoDelayAE._create_socket),
        (resolve("transport.AssociationSocket._create_socket"), NoDelaySocket._create_socket),
        (resolve("transport.AssociationSocket.recv"), FastSocket.recv),
        (resolve("dul.DULServiceProvider.send_pdu"), FastDUL.send_pdu),
        (resolve("dul.DULServiceProvider._read_pdu_data"), FastDUL._read_pdu_data),
        (resolve("dul.DULServiceProvider.run_reactor"), FastDUL.run_reactor),
        (resolve("association.Association._run_reactor"), FastAssociation._run_reactor),
        (resolve("acse.ACSE._negotiate_as_acceptor"), PolicyACSE._negotiate_as_acceptor),
        (resolve("transport.RequestHandler._create_association"), SCPRequestHandler._create_association),
    ]
    changed = [f"{stock.__qualname__}{inspect.signature(stock)} vs ours {inspect.signature(ours)}"
               for stock, ours in pairs
               if list(inspect.signature(stock).parameters) != list(inspect.signature(ours).parameters)]
    assert not changed, f"pynetdicom {pynetdicom.__version__} changed the parameters of {changed}"
    get_msg = inspect.signature(resolve("dimse.DIMSEServiceProvider.get_msg"))
    assert list(get_msg.parameters) == ["self", "block"], (
        f"DIMSEServiceProvider.get_msg{get_msg}: service/net/_pynetdicom_fast/dimse.py guard_reactor wraps "
        "get_msg(block)")

"""``itvnode serve`` in a subprocess against real peers: dcmtk echoscu/storescu and a pynetdicom SCU."""

from __future__ import annotations

import random
import subprocess
import time
from collections import Counter
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGLSLossless, RLELossless
from scp_ctdata import classic_slice, new_study, write_study
from scp_helpers import ECHOSCU, ENHANCED_CT, STORESCU, RunningSCP, echo_ok

from service.store.spool import Spool


def dataset_bytes(path: Path) -> bytes:
    """The data set as encoded after the file meta group (what went over the wire)."""
    raw = path.read_bytes()
    fp = BytesIO(raw)
    ds = dcmread(fp, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    meta_len = int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[132 + 12 + meta_len:]


def storescu(port: int, files: list[Path], *extra: str, calling: str = "STORESCU",
             called: str = "ITVNODE") -> subprocess.CompletedProcess[str]:
    return subprocess.run([STORESCU, "-aet", calling, "-aec", called, "-to", "10", *extra, "127.0.0.1",
                           str(port), *map(str, files)], capture_output=True, text=True, timeout=120,
                          env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})


def by_series(spool_dir: Path) -> Counter[str]:
    spool = Spool(spool_dir)
    try:
        return Counter(m.series_instance_uid for s in spool.study_uids() for m, _ in spool.instances(s))
    finally:
        spool.close()


def test_echoscu_answers(serve_process) -> None:
    node: RunningSCP = serve_process()
    res = echo_ok(node.port)
    assert res.returncode == 0, res.stderr


def test_three_vendor_styles_shuffled_and_interleaved(serve_process, phantom_dicom_factory) -> None:
    """The product phantom in all three vendor styles (Siemens, Philips, Enhanced CT multi-frame) plus a
    Siemens AVG/MIP: every file shuffled into one storescu run, so studies and phases interleave."""
    node: RunningSCP = serve_process()
    written = [phantom_dicom_factory(v, with_avg=(v == "siemens"), with_mip=(v == "siemens"))
               for v in ("siemens", "philips", "enhanced")]
    files = [f for w in written for f in w.all_files()]
    random.Random(7).shuffle(files)
    res = storescu(node.port, files)
    assert res.returncode == 0, res.stdout + res.stderr

    spool = Spool(node.spool_dir)
    try:
        assert sorted(spool.study_uids()) == sorted(w.study_instance_uid for w in written)
        for w in written:
            items = spool.instances(w.study_instance_uid)
            counts = Counter(m.series_instance_uid for m, _ in items)
            assert counts == {s.series_instance_uid: len(s.files) for s in w.series}, w.vendor
            assert {m.frame_of_reference_uid for m, _ in items} == {w.frame_of_reference_uid}
            assert all(p.is_file() for _, p in items)
        enh = [m for m, _ in spool.instances(written[2].study_instance_uid)]
        assert {m.nominal_phase_percent for m in enh} == {s.percent for s in written[2].phases}
        phil = {m.series_description for m, _ in spool.instances(written[1].study_instance_uid)}
        assert phil == {s.description for s in written[1].series}
    finally:
        spool.close()
    # stored as received: the data set bytes are those of the sent file
    sent = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files[:10]}
    for uid, path in sent.items():
        stored = next(node.spool_dir.glob(f"*/*/{uid}.dcm"))
        assert dataset_bytes(stored) == dataset_bytes(path)


def test_enhanced_ct_multiframe(serve_process, tmp_path: Path) -> None:
    """Enhanced CT Image Storage: geometry from the functional groups, phase from (0020,9245)."""
    node: RunningSCP = serve_process()
    study = new_study([10.0, 60.0], "enhanced-mf")
    files = write_study(study, tmp_path / "mf", vendor="enhanced")
    res = storescu(node.port, files)
    assert res.returncode == 0, res.stdout + res.stderr
    spool = Spool(node.spool_dir)
    try:
        metas = [m for m, _ in spool.instances(study.study_uid)]
    finally:
        spool.close()
    assert sorted(m.nominal_phase_percent or -1.0 for m in metas) == [10.0, 60.0]
    assert all(m.number_of_frames == 12 and m.image_position == (-100.0, -100.0, -18.0) for m in metas)
    assert {m.sop_class_uid for m in metas} == {ENHANCED_CT}


def test_resend_is_idempotent(serve_process, tmp_path: Path) -> None:
    node: RunningSCP = serve_process()
    study = new_study([0.0, 50.0], "resend")
    files = write_study(study, tmp_path / "in", n_slices=6)
    assert storescu(node.port, files).returncode == 0
    first = sorted(node.spool_dir.glob("*/*/*.dcm"))
    assert storescu(node.port, list(reversed(files))).returncode == 0
    assert sorted(node.spool_dir.glob("*/*/*.dcm")) == first
    counts = by_series(node.spool_dir)
    assert sum(counts.values()) == 12 and set(counts.values()) == {6}
    assert not list(node.spool_dir.glob("*/*/.*.part"))


def test_compressed_transfer_syntaxes_stored_as_received(serve_process, tmp_path: Path) -> None:
    node: RunningSCP = serve_process()
    study = new_study([0.0], "compressed")
    tmp_path.joinpath("c").mkdir()
    files = []
    for i, ts in enumerate((RLELossless, JPEGLSLossless, DeflatedExplicitVRLittleEndian)):
        ds = classic_slice(study, 0.0, i)
        if ts == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ts
        else:
            ds.compress(ts)
        path = tmp_path / "c" / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append((path, ts))
    # storescu proposes [file's syntax, uncompressed...]; the SCP takes the sender's first choice
    for (path, _), option in zip(files, ("-xr", "-xt", "-xd"), strict=True):
        res = storescu(node.port, [path], option)
        assert res.returncode == 0, res.stdout + res.stderr
    for path, ts in files:
        stored = next(node.spool_dir.glob(f"*/*/{path.stem}.dcm"))
        assert dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
        assert dataset_bytes(stored) == dataset_bytes(path)


def test_unknown_calling_ae_refused(serve_process, tmp_path: Path) -> None:
    node: RunningSCP = serve_process(ITVNODE_ALLOWED_CALLERS="PACS1,PACS2")
    res = subprocess.run([ECHOSCU, "-aet", "INTRUDER", "-aec", "ITVNODE", "127.0.0.1", str(node.port)],
                         capture_output=True, text=True, timeout=20)
    assert res.returncode != 0
    assert "Calling AE Title Not Recognized" in res.stdout + res.stderr
    assoc = node.associate("INTRUDER")
    assert assoc.is_rejected
    rej = assoc.acceptor.primitive
    assert (rej.result, rej.result_source, rej.diagnostic) == (0x01, 0x01, 0x03)
    # an allowed caller still stores
    files = write_study(new_study([0.0], "allowed"), tmp_path / "in", n_slices=2)
    assert storescu(node.port, files, calling="PACS2").returncode == 0
    assert sum(by_series(node.spool_dir).values()) == 2
    assert node.log is not None
    assert "calling AE title 'INTRUDER' is not in allowed_callers" in node.log.read_text()


def test_caller_bound_to_ip(serve_process) -> None:
    # (the fixture's readiness C-ECHO uses the first allowed caller)
    node: RunningSCP = serve_process(ITVNODE_ALLOWED_CALLERS="PACS2,PACS1",
                                     ITVNODE_CALLER_IPS='{"PACS1": ["10.9.9.9"], "PACS2": ["127.0.0.1"]}')
    assert node.associate("PACS1").is_rejected  # right title, wrong address
    assoc = node.associate("PACS2")
    assert assoc.is_established
    assoc.release()


def test_wrong_called_ae_refused(serve_process) -> None:
    node: RunningSCP = serve_process()
    res = subprocess.run([ECHOSCU, "-aec", "NOTUS", "127.0.0.1", str(node.port)], capture_output=True,
                         text=True, timeout=20)
    assert res.returncode != 0
    assert "Called AE Title Not Recognized" in res.stdout + res.stderr
    assert echo_ok(node.port).returncode == 0


@pytest.mark.parametrize("env", [{"ITVNODE_REQUIRE_CALLED_AE": "false"}])
def test_called_ae_check_can_be_disabled(serve_process, env: dict[str, str]) -> None:
    node: RunningSCP = serve_process(**env)
    assert echo_ok(node.port, called="ANYTHING").returncode == 0


def test_serve_runs_the_assembler(serve_process, phantom_dicom_factory) -> None:
    """`itvnode serve` wires the assembler to its spool: a complete 4DCT becomes a queued manifest."""
    from service.store.manifest import load_manifest, manifest_path, study_key

    node: RunningSCP = serve_process(ITVNODE_EXPECTED_PHASES="4", ITVNODE_QUIET_PERIOD="30",
                                     ITVNODE_ASSEMBLER_INTERVAL="0.2")
    written = phantom_dicom_factory("philips")
    assert storescu(node.port, written.all_files()).returncode == 0
    path = manifest_path(node.data_dir, study_key(written.study_instance_uid, written.frame_of_reference_uid))
    deadline = time.monotonic() + 30
    state = None
    while time.monotonic() < deadline:
        if path.exists():
            state = load_manifest(path).state
            if state == "queued":
                break
        time.sleep(0.2)
    assert state == "queued", f"manifest state {state!r}"
    m = load_manifest(path)
    assert sorted(p.percent for p in m.phases) == sorted(s.percent for s in written.phases)
    assert all(p.slices == len(written.phases[0].files) for p in m.phases)


def test_port_in_use_is_a_message_not_a_traceback(serve_process, tmp_path: Path) -> None:
    """A second node on a port already taken stops at start with a one-line reason (exit 2)."""
    import os
    import sys

    from scp_helpers import ITVNODE, REPO

    node = serve_process()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
    env.update({"ITVNODE_PORT": str(node.port), "ITVNODE_HOST": "127.0.0.1", "ITVNODE_MIN_FREE_BYTES": "0",
                "ITVNODE_DATA_DIR": str(tmp_path / "second")})
    cmd = [str(ITVNODE), "serve"] if ITVNODE.exists() else [sys.executable, "-m", "itvnode.cli", "serve"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert f"127.0.0.1:{node.port}" in res.stderr and "in use" in res.stderr
    assert echo_ok(node.port).returncode == 0  # the first node is untouched

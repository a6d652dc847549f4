"""A Siemens amplitude-binned 4DCT made by ``itvnode phantom --vendor siemens-amplitude`` through real peers:
dcmtk storescu -> itvnode serve -> itvnode worker (embedded broker, tiny SAM 3) -> dcmtk storescp."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from e2e_helpers import (
    REPO,
    Proc,
    StoreSCP,
    dciodvfy_errors,
    describe,
    free_port,
    itvnode_argv,
    manifests,
    node_env,
    port_open,
    storescu,
    study_state,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PHASES = 10  # 0..100 % In in steps of 20, then 80..20 % Ex: ten series, ITVNODE_EXPECTED_PHASES=10 below
LABELS = ["In0", "In20", "In40", "In60", "In80", "In100", "Ex80", "Ex60", "Ex40", "Ex20"]


def test_siemens_amplitude_phantom_goes_to_done_with_in_ex_rois(
    tmp_path: Path, procs: list[Proc], tiny_model_dir: Path
) -> None:
    out = tmp_path / "phantom"
    made = subprocess.run(
        itvnode_argv("phantom", str(out), "--vendor", "siemens-amplitude", "--size", "small",
                     "--phases", str(PHASES), "--slices", "16"),
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    folders = sorted(p.name for p in (out / "dicom").iterdir())
    assert any(f.endswith("_100_In") for f in folders) and any(f.endswith("_80_Ex") for f in folders)

    rx = StoreSCP(tmp_path / "rx", tmp_path)
    procs.append(rx.proc)
    data = tmp_path / "data"
    env = node_env(data, free_port(), broker_url=None, destinations=rx.destination, sam3_dir=tiny_model_dir,
                   extra={"ITVNODE_EXPECTED_PHASES": str(PHASES), "ITVNODE_QUIET_PERIOD": "8"})
    serve = Proc("serve", itvnode_argv("serve"), tmp_path, env=env, cwd=REPO)
    procs.append(serve)
    port = int(env["ITVNODE_PORT"])
    wait_for(lambda: port_open(port), 60, "itvnode serve listening", diagnose=lambda: serve.log())
    worker = Proc("worker", itvnode_argv("worker", "--queues", "inference,export", "--concurrency", "1"),
                  tmp_path, env=env, cwd=REPO)
    procs.append(worker)

    storescu(port, "ITVNODE", [out / "dicom"])
    wait_for(lambda: study_state(data) == "done", 240, "the amplitude-binned study to be done",
             diagnose=lambda: describe(data, serve, worker))

    (m,) = manifests(data)
    assert [p["label"] for p in m["phases"]] == LABELS  # breathing order: inhale 0..100, exhale 80..20
    assert [p["percent"] for p in m["phases"]] == [float(p) for p in range(0, 100, 10)]
    files = rx.files()
    assert len(files) == 1, [f.name for f in files]
    assert dciodvfy_errors(files[0]) == []
    import pydicom

    ds = pydicom.dcmread(files[0])
    names = {r.ROIName for r in ds.StructureSetROISequence}
    assert {f"External^{lab}" for lab in LABELS} <= names and "ITV" in names
    assert not any("^P" in n for n in names)
    assert "In0, In20" in str(ds.StructureSetDescription)

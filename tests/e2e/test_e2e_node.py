"""End to end with real peers on loopback: dcmtk storescu -> itvnode serve -> Celery worker (Redis or the
embedded broker) running the tiny SAM 3 + threshold structures -> RTSTRUCT -> dcmtk storescp.

The tiny model is random-initialised: these tests check the plumbing and the DICOM, never contour quality.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    REPO,
    Proc,
    RedisServer,
    StoreSCP,
    dciodvfy_errors,
    describe,
    free_port,
    itvnode_argv,
    manifests,
    node_env,
    port_open,
    referenced_series,
    storescu,
    study_state,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _start_serve(procs: list[Proc], tmp: Path, env: dict[str, str]) -> Proc:
    serve = Proc("serve", itvnode_argv("serve"), tmp, env=env, cwd=REPO)
    procs.append(serve)
    port = int(env["ITVNODE_PORT"])
    wait_for(lambda: port_open(port), 60, "itvnode serve listening", diagnose=lambda: serve.log())
    return serve


def _start_worker(
    procs: list[Proc],
    tmp: Path,
    env: dict[str, str],
    queues: str = "inference,export",
    name: str = "worker",
    hostname: str | None = None,
) -> Proc:
    argv = itvnode_argv("worker", "--queues", queues, "--concurrency", "1")
    if hostname:
        argv += ["--hostname", hostname]
    w = Proc(name, argv, tmp, env=env, cwd=REPO)
    procs.append(w)
    return w


def _serve_with_receiver(
    procs: list[Proc], tmp: Path, broker_url: str | None, sam3_dir: Path, extra: dict[str, str] | None = None
) -> tuple[StoreSCP, Path, dict[str, str]]:
    """A dcmtk storescp destination and ``itvnode serve`` sending to it; returns (receiver, data dir, env)."""
    rx = StoreSCP(tmp / "rx", tmp)
    procs.append(rx.proc)
    data = tmp / "data"
    env = node_env(data, free_port(), broker_url=broker_url, destinations=rx.destination, sam3_dir=sam3_dir,
                   extra=extra)
    _start_serve(procs, tmp, env)
    return rx, data, env


def _check_result(rx: StoreSCP, phantom: Any, data_dir: Path) -> dict[str, Any]:
    files = rx.files()
    assert len(files) == 1, f"expected one RTSTRUCT, got {[f.name for f in files]}"
    assert dciodvfy_errors(files[0]) == []
    refs = referenced_series(files[0])
    assert {s.series_instance_uid for s in phantom.phases} <= refs
    import pydicom

    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == phantom.study_instance_uid
    assert "UNTRAINED" in str(ds.get("StructureSetDescription", "")) + str(ds.SoftwareVersions)
    names = {r.ROIName for r in ds.StructureSetROISequence}
    assert {"External^P0", "External^P90", "ITV"} <= names
    (m,) = manifests(data_dir)
    assert m["state"] == "done", m
    assert set(m["results"]["timings"]) >= {"load", "inference", "filter", "rtstruct", "export"}
    assert m["results"]["rtstruct_sop_instance_uids"] == [ds.SOPInstanceUID]
    return m


def test_storescu_to_storescp_through_redis(
    tmp_path: Path,
    procs: list[Proc],
    e2e_phantom: Any,
    tiny_model_dir: Path,
    shared_redis: Callable[[int], str],
) -> None:
    url = shared_redis(7)
    report_on = {"ITVNODE_SEND_QA_REPORT": "true"}
    rx, data, env = _serve_with_receiver(procs, tmp_path, url, tiny_model_dir, report_on)
    worker = _start_worker(procs, tmp_path, env)
    storescu(int(env["ITVNODE_PORT"]), "ITVNODE", [e2e_phantom.root])
    wait_for(
        lambda: study_state(data) == "done" and len(rx.files("PDF.")) == 1,
        200,
        "the study to be done and its QA report delivered",
        diagnose=lambda: describe(data, worker),
    )
    m = _check_result(rx, e2e_phantom, data)
    (pdf,) = rx.files("PDF.")  # the QA report beside the RTSTRUCT, as a DICOM Encapsulated PDF
    assert dciodvfy_errors(pdf) == []
    assert rx.store_requests() == 2
    assert [p["percent"] for p in m["phases"]] == [float(p) for p in range(0, 100, 10)]
    status = subprocess.run(
        itvnode_argv("status", "--json"), env=env, capture_output=True, text=True, timeout=60, cwd=REPO
    )
    rows = json.loads(status.stdout)
    assert rows[0]["state"] == "done" and len(rows[0]["phases"]) == 10


def test_itvnode_run_embedded_broker_health_and_shutdown(
    tmp_path: Path, procs: list[Proc], e2e_phantom: Any, tiny_model_dir: Path
) -> None:
    rx = StoreSCP(tmp_path / "rx", tmp_path)
    procs.append(rx.proc)
    data = tmp_path / "data"
    port = free_port()
    env = node_env(data, port, broker_url=None, destinations=rx.destination, sam3_dir=tiny_model_dir)
    http = int(env["ITVNODE_HTTP_PORT"])
    node = Proc("run", itvnode_argv("run", "--grace", "20"), tmp_path, env=env, cwd=REPO)
    procs.append(node)
    wait_for(
        lambda: port_open(port) and port_open(http), 60, "itvnode run listening", diagnose=lambda: node.log()
    )
    storescu(port, "ITVNODE", [e2e_phantom.root])
    wait_for(
        lambda: study_state(data) == "done",
        200,
        "the study to be done",
        diagnose=lambda: describe(data, node),
    )
    _check_result(rx, e2e_phantom, data)
    assert (data / "broker" / "broker.sqlite").exists()  # the embedded broker carried the jobs

    with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=30) as resp:
        health = json.loads(resp.read())
    assert resp.status == 200 and health["status"] == "ok", health
    assert set(health["checks"]) == {"data_dir", "broker", "studies", "dicom", "model"}
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=30) as resp:
        metrics = resp.read().decode()
    assert "itvnode_studies_completed_total 1.0" in metrics
    assert f"itvnode_instances_received_total {len(e2e_phantom.all_files())}.0" in metrics
    assert 'itvnode_stage_duration_seconds_count{stage="inference"} 1.0' in metrics
    assert 'itvnode_queue_depth{queue="inference"} 0.0' in metrics
    check = subprocess.run(
        itvnode_argv("health", "--url", f"http://127.0.0.1:{http}/health"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    import psutil

    # a child that dies is restarted by the supervisor
    (scp_child,) = [c for c in psutil.Process(node.pid).children() if "serve" in c.cmdline()]
    scp_child.kill()
    scp_child.wait(timeout=10)
    wait_for(lambda: not port_open(port), 10, "the killed SCP to stop listening")
    wait_for(lambda: port_open(port), 60, "the SCP restarted by the supervisor", diagnose=lambda: node.log())
    children = psutil.Process(node.pid).children(recursive=True)
    assert len(children) >= 3
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=90) == 0, node.log()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"children left running: {alive}"
    assert not port_open(port)
    # once stopped, the health check fails
    down = subprocess.run(
        itvnode_argv("health", "--url", f"http://127.0.0.1:{http}/health", "--timeout", "2"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert down.returncode == 1


def test_worker_killed_mid_job_completes_after_restart(
    tmp_path: Path,
    procs: list[Proc],
    e2e_phantom: Any,
    tiny_model_dir: Path,
    shared_redis: Callable[[int], str],
) -> None:
    url = shared_redis(8)
    rx, data, env = _serve_with_receiver(procs, tmp_path, url, tiny_model_dir)
    _start_worker(procs, tmp_path, env, queues="export", name="export")
    first = _start_worker(
        procs, tmp_path, env, queues="inference", name="inference-1", hostname="inference@e2e"
    )
    storescu(int(env["ITVNODE_PORT"]), "ITVNODE", [e2e_phantom.root])
    wait_for(
        lambda: study_state(data) == "processing",
        120,
        "the study to be processing",
        interval=0.05,
        diagnose=lambda: describe(data, first),
    )
    first.kill()  # SIGKILL the worker and its pool: no warm shutdown, no re-queue by Celery
    assert study_state(data) == "processing"
    second = _start_worker(
        procs, tmp_path, env, queues="inference", name="inference-2", hostname="inference@e2e"
    )
    wait_for(
        lambda: study_state(data) == "done",
        200,
        "the study to be done after the restart",
        diagnose=lambda: describe(data, second),
    )
    m = _check_result(rx, e2e_phantom, data)
    assert rx.store_requests() == 1
    assert any("re-queued" in (h.get("reason") or "") for h in m["history"])


def test_redis_restart_mid_run_loses_nothing(
    tmp_path: Path, procs: list[Proc], e2e_phantom: Any, tiny_model_dir: Path
) -> None:
    server = RedisServer(tmp_path / "redis", tmp_path)
    try:
        rx, data, env = _serve_with_receiver(procs, tmp_path, server.url, tiny_model_dir)
        storescu(int(env["ITVNODE_PORT"]), "ITVNODE", [e2e_phantom.root])
        # the job is in Redis only: no worker runs yet
        wait_for(
            lambda: study_state(data) == "queued",
            60,
            "the study to be queued",
            diagnose=lambda: describe(data),
        )
        server.stop()
        server.start()  # same port, same append-only file
        worker = _start_worker(procs, tmp_path, env)
        wait_for(
            lambda: study_state(data) == "processing" or study_state(data) == "done",
            120,
            "the worker to take the job",
            interval=0.1,
            diagnose=lambda: describe(data, worker),
        )
        server.stop()  # and again while the study is being processed: the export enqueue meets a dead broker
        server.start()
        wait_for(
            lambda: study_state(data) == "done",
            200,
            "the study to be done",
            diagnose=lambda: describe(data, worker),
        )
        _check_result(rx, e2e_phantom, data)
    finally:
        for p in reversed(procs):
            p.stop(timeout=15)
        procs.clear()
        server.stop()


def test_destination_down_then_back(
    tmp_path: Path,
    procs: list[Proc],
    e2e_phantom: Any,
    tiny_model_dir: Path,
    shared_redis: Callable[[int], str],
) -> None:
    url = shared_redis(9)
    data = tmp_path / "data"
    rx_port = free_port()
    env = node_env(
        data, free_port(), broker_url=url, destinations=f"RX@127.0.0.1:{rx_port}", sam3_dir=tiny_model_dir
    )
    _start_serve(procs, tmp_path, env)
    worker = _start_worker(procs, tmp_path, env)
    storescu(int(env["ITVNODE_PORT"]), "ITVNODE", [e2e_phantom.root])

    def failing() -> bool:
        ms = manifests(data)
        return bool(ms) and ms[0]["state"] == "exporting" and "attempt" in (ms[0].get("reason") or "")

    wait_for(failing, 200, "a failed delivery attempt recorded", diagnose=lambda: describe(data, worker))
    rx = StoreSCP(tmp_path / "rx", tmp_path, port=rx_port)
    procs.append(rx.proc)
    wait_for(
        lambda: study_state(data) == "done",
        90,
        "delivery once the destination is back",
        diagnose=lambda: describe(data, worker),
    )
    _check_result(rx, e2e_phantom, data)


ORTHANC = "/usr/sbin/Orthanc"
ROUTE_LUA = """
function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local ct = {}
  for i, s in pairs(series) do
    local modality = s['MainDicomTags']['Modality']
    if modality == 'RTSTRUCT' then
      return  -- our own result came back: do not route the study again
    end
    if modality == 'CT' then
      table.insert(ct, s['ID'])
    end
  end
  if #ct > 0 then
    print('routing study ' .. studyId .. ' (' .. #ct .. ' CT series) to ITVNODE')
    RestApiPost('/modalities/ITVNODE/store', DumpJson({Resources = ct, Asynchronous = true}, true))
  end
end
"""


@pytest.mark.skipif(
    not Path(ORTHANC).exists(), reason="Orthanc is not installed (tests/peers.sh installs it)"
)
def test_orthanc_routes_study_and_receives_rtstruct(
    tmp_path: Path,
    procs: list[Proc],
    e2e_phantom: Any,
    tiny_model_dir: Path,
    shared_redis: Callable[[int], str],
) -> None:
    url = shared_redis(10)
    data = tmp_path / "data"
    node_port, dicom_port, http_port = free_port(), free_port(), free_port()
    (tmp_path / "route.lua").write_text(ROUTE_LUA)
    config = {
        "Name": "itvnode-e2e-pacs",
        "StorageDirectory": str(tmp_path / "orthanc-db"),
        "IndexDirectory": str(tmp_path / "orthanc-db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "StableAge": 2,
        "LuaScripts": [str(tmp_path / "route.lua")],
        "DicomModalities": {"ITVNODE": ["ITVNODE", "127.0.0.1", node_port]},
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "Plugins": [],
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    orthanc = Proc("orthanc", [ORTHANC, str(tmp_path / "orthanc.json")], tmp_path)
    procs.append(orthanc)
    wait_for(
        lambda: port_open(dicom_port) and port_open(http_port),
        30,
        "Orthanc listening",
        diagnose=lambda: orthanc.log(),
    )
    env = node_env(
        data,
        node_port,
        broker_url=url,
        destinations=f"ORTHANC@127.0.0.1:{dicom_port}",
        sam3_dir=tiny_model_dir,
    )
    _start_serve(procs, tmp_path, env)
    worker = _start_worker(procs, tmp_path, env)
    storescu(dicom_port, "ORTHANC", [e2e_phantom.root])  # the scanner stores into the PACS

    def rtstructs() -> list[str]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/tools/find",
            method="POST",
            data=json.dumps({"Level": "Instance", "Query": {"Modality": "RTSTRUCT"}}).encode(),
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return list(json.loads(resp.read()))

    found = wait_for(
        rtstructs,
        240,
        "the RTSTRUCT back in Orthanc",
        diagnose=lambda: describe(data, worker, orthanc),
        interval=1.0,
    )
    assert len(found) == 1
    with urllib.request.urlopen(
        f"http://127.0.0.1:{http_port}/instances/{found[0]}/file", timeout=10
    ) as resp:
        (tmp_path / "rs.dcm").write_bytes(resp.read())
    assert dciodvfy_errors(tmp_path / "rs.dcm") == []
    assert {s.series_instance_uid for s in e2e_phantom.phases} <= referenced_series(tmp_path / "rs.dcm")
    wait_for(lambda: study_state(data) == "done", 30, "the study to be done", diagnose=lambda: describe(data))


def test_segment_command_on_a_folder(tmp_path: Path, e2e_phantom: Any) -> None:
    """``itvnode segment`` without SAM 3 weights: threshold structures only, SAM 3 ones skipped loudly."""
    env = node_env(tmp_path / "unused", free_port(), broker_url=None, destinations="", sam3_dir=None)
    res = subprocess.run(
        itvnode_argv("segment", str(e2e_phantom.root), "--out", str(tmp_path / "out")),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    (rs,) = sorted((tmp_path / "out").glob("RS.*.dcm"))
    assert dciodvfy_errors(rs) == []
    qa = json.loads((tmp_path / "out" / "qa.json").read_text())
    assert set(qa["skipped"]) >= {"Lung_L", "Lung_R", "Heart", "GTVp"}
    assert all("SAM 3 unavailable" in v for v in qa["skipped"].values())
    assert len(qa["phases"]) == 10
    assert "WARNING" in res.stderr and "not contoured" in res.stderr
    import pydicom

    ds = pydicom.dcmread(rs)
    assert "Not contoured" in ds.StructureSetDescription
    assert {r.ROIName for r in ds.StructureSetROISequence} == {f"External^P{p}" for p in range(0, 100, 10)}
    assert sys.executable  # the same interpreter ran the command


def test_segment_command_rerun_with_kept_work_dir(tmp_path: Path, e2e_phantom: Any) -> None:
    """A second ``itvnode segment --work-dir W`` on the same folder hands out the result again (it used to
    stop with 'study ...: done' and exit 1, writing nothing to --out)."""
    env = node_env(tmp_path / "unused", free_port(), broker_url=None, destinations="", sam3_dir=None)
    outs = []
    for run in ("a", "b"):
        res = subprocess.run(
            itvnode_argv("segment", str(e2e_phantom.root), "--out", str(tmp_path / run),
                         "--work-dir", str(tmp_path / "work")),
            env=env, capture_output=True, text=True, timeout=240, cwd=REPO,
        )
        assert res.returncode == 0, res.stdout + res.stderr[-3000:]
        outs.append(sorted(p.name for p in (tmp_path / run).iterdir()))
    assert outs[0] == outs[1] and "qa.json" in outs[1] and any(n.startswith("RS.") for n in outs[1])


def test_three_of_ten_phases_held_then_released_and_delivered(
    tmp_path: Path,
    procs: list[Proc],
    e2e_phantom: Any,
    tiny_model_dir: Path,
    shared_redis: Callable[[int], str],
) -> None:
    """An incomplete 4DCT is held and nothing is sent; `itvnode release` has it processed, and the RTSTRUCT
    says what the ITV was built from."""
    url = shared_redis(11)
    rx, data, env = _serve_with_receiver(procs, tmp_path, url, tiny_model_dir)
    worker = _start_worker(procs, tmp_path, env)
    sent = [e2e_phantom.by_percent(p).folder for p in (0.0, 30.0, 60.0)]
    storescu(int(env["ITVNODE_PORT"]), "ITVNODE", sent)
    wait_for(lambda: study_state(data) == "held", 90, "the study to be held", diagnose=lambda: describe(data))
    (m,) = manifests(data)
    assert m["reason"].startswith("3 of 10 phases: 10 %, 20 %, 40 %, 50 %, 70 %, 80 %, 90 % missing"), m
    time.sleep(3)  # a worker that was going to run would have started by now
    assert rx.files() == [] and rx.store_requests() == 0
    assert study_state(data) == "held"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(itvnode_argv(*args), env=env, capture_output=True, text=True, timeout=60,
                              cwd=REPO)

    released = cli("release", m["study_key"])
    assert released.returncode == 0, released.stdout + released.stderr
    wait_for(lambda: study_state(data) == "done", 200, "the released study to be done",
             diagnose=lambda: describe(data, worker))
    files = rx.files()
    assert len(files) == 1 and rx.store_requests() == 1
    assert dciodvfy_errors(files[0]) == []
    import pydicom

    ds = pydicom.dcmread(files[0])
    description = str(ds.StructureSetDescription)
    assert "ITV from 3 of 10 phases: 10 %, 20 %, 40 %" in description and "released by admin" in description
    assert len(description) <= 1024
    assert referenced_series(files[0]) >= {e2e_phantom.by_percent(p).series_instance_uid for p in (0, 30, 60)}
    (row,) = json.loads(cli("status", "--json").stdout)
    assert (row["state"], row["phases_used"], row["phases_expected"]) == ("done", 3, 10)
    assert row["warnings"][0].startswith("ITV from 3 of 10 phases (missing 10%, 20%, 40%")
    qa = json.loads((data / "studies" / m["study_key"] / "results" / "qa.json").read_text())
    missing = [10.0, 20.0, 40.0, 50.0, 70.0, 80.0, 90.0]
    assert qa["qa"]["phases"] == {"used": 3, "expected": 10, "missing_percents": missing, "complete": False,
                                  "released": True}
    again = cli("release", e2e_phantom.study_instance_uid)
    assert again.returncode == 0 and "already released; now done" in again.stdout
    assert rx.store_requests() == 1

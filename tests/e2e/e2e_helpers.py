"""Real peers for the end-to-end tests: itvnode subprocesses, dcmtk storescu/storescp, redis-server, Orthanc.

Every wait is bounded in time; every process is started in its own session and stopped (then killed) by its
process group at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[2]
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
T = TypeVar("T")


def wait_for(
    pred: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.25,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Poll ``pred`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{diagnose()}" if diagnose else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Proc:
    """A subprocess in its own session with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv), stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, not a shutdown)."""
        self.signal_group(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)  # the main process stops its own children (Celery pool)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        # pool processes of a Celery worker live in the same group: make sure none is left behind
        self.signal_group(signal.SIGKILL)
        self._log.close()
        return self.proc.returncode


def itvnode_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "itvnode.cli", *args]


def node_env(
    data_dir: Path,
    port: int,
    *,
    broker_url: str | None,
    destinations: str,
    sam3_dir: Path | None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
    env.update(
        {
            "ITVNODE_DATA_DIR": str(data_dir),
            "ITVNODE_PORT": str(port),
            "ITVNODE_HOST": "127.0.0.1",
            "ITVNODE_AE_TITLE": "ITVNODE",
            "ITVNODE_QUIET_PERIOD": "8",
            "ITVNODE_DESTINATIONS": destinations,
            "ITVNODE_EXPORT_RETRY_BASE": "1",
            "ITVNODE_EXPORT_RETRY_MAX_DELAY": "2",
            "ITVNODE_EXPORT_SWEEP_INTERVAL": "2",
            "ITVNODE_EXPORT_CONNECT_TIMEOUT": "3",
            "ITVNODE_MIN_FREE_BYTES": "0",
            "ITVNODE_DEVICE": "cpu",
            "ITVNODE_HTTP_HOST": "127.0.0.1",
            "ITVNODE_HTTP_PORT": str(free_port()),
            # one object per study keeps delivery counts simple; test_storescu_to_storescp_through_redis
            # switches the QA report PDF on and checks it arrives beside the RTSTRUCT
            "ITVNODE_SEND_QA_REPORT": "false",
            # 2 shared cores: one thread per process is several times faster than oversubscription
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TCP_NODELAY": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if broker_url:
        env["ITVNODE_BROKER_URL"] = broker_url
    if sam3_dir is not None:
        env["ITVNODE_SAM3_DIR"] = str(sam3_dir)
    env.update(extra or {})
    return env


def storescu(port: int, called_ae: str, paths: Sequence[Path], timeout: float = 120.0) -> None:
    env = dict(os.environ, TCP_NODELAY="1")
    cmd = [
        STORESCU,
        "-aet",
        "PACS",
        "-aec",
        called_ae,
        "+sd",
        "+r",
        "127.0.0.1",
        str(port),
        *[str(p) for p in paths],
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (
        f"storescu failed ({res.returncode}): {res.stdout[-2000:]}{res.stderr[-2000:]}"
    )


class StoreSCP:
    """dcmtk storescp: the TPS / PACS that receives our RTSTRUCT."""

    def __init__(self, out_dir: Path, log_dir: Path, port: int | None = None, ae: str = "RX") -> None:
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ae = ae
        self.port = port or free_port()
        self.proc = Proc(
            f"storescp-{self.port}",
            [STORESCP, "-v", "-aet", ae, "-od", str(out_dir), str(self.port)],
            log_dir,
            env=dict(os.environ, TCP_NODELAY="1"),
        )
        wait_for(lambda: port_open(self.port), 10, f"storescp on {self.port}")

    @property
    def destination(self) -> str:
        return f"{self.ae}@127.0.0.1:{self.port}"

    def files(self, prefix: str = "RS.") -> list[Path]:
        """Received files whose name starts with ``prefix`` (storescp names them by modality: RS., PDF.);
        ``""``: all."""
        return sorted(p for p in self.out_dir.iterdir() if p.is_file() and p.name.startswith(prefix))

    def store_requests(self) -> int:
        return self.proc.log(tail=1_000_000).count("Received Store Request")

    def stop(self) -> None:
        self.proc.stop()


class RedisServer:
    """A private redis-server with an append-only file, so its queues survive a restart."""

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.port = free_port()
        self.proc: Proc | None = None
        self.starts = 0
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        self.proc = Proc(
            f"redis-{self.port}-{self.starts}",
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
            ],
            self.log_dir,
        )
        wait_for(lambda: port_open(self.port), 10, f"redis-server on {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


def manifests(data_dir: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted((data_dir / "studies").glob("*/manifest.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue  # being replaced right now
    return out


def study_state(data_dir: Path) -> str | None:
    ms = manifests(data_dir)
    return ms[0]["state"] if ms else None


def describe(data_dir: Path, *procs: Proc) -> str:
    parts = [
        json.dumps(
            [{k: m.get(k) for k in ("study_key", "state", "reason", "history")} for m in manifests(data_dir)],
            indent=1,
        )[-3000:]
    ]
    for p in procs:
        parts.append(f"--- {p.name} ---\n{p.log(3000)}")
    return "\n".join(parts)


def dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def referenced_series(path: Path) -> set[str]:
    import pydicom

    ds = pydicom.dcmread(path)
    out = set()
    for fr in ds.ReferencedFrameOfReferenceSequence:
        for st in fr.get("RTReferencedStudySequence", []):
            for se in st.get("RTReferencedSeriesSequence", []):
                out.add(str(se.SeriesInstanceUID))
    return out

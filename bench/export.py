"""Export throughput: itvnode's C-STORE SCU against dcmtk storescu, both into dcmtk storescp, same run.

    .venv/bin/python -m bench.export [--files 300] [--size 256] [--repeat 3]

Prints the best-of-``repeat`` wall time for each sender and the ratio to dcmtk storescu (the peer baseline):

* ``itvnode``         service.net.scu.send_files (TCP_NODELAY on our socket) -> storescp (TCP_NODELAY=1)
* ``storescu``        /usr/bin/storescu (TCP_NODELAY=1)                      -> storescp (TCP_NODELAY=1)
* ``pynetdicom+nagle`` a plain pynetdicom AE (Nagle on)                       -> storescp (Nagle on)
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from service.net.scu import send_files
from service.setting_values import Destination
from tests.support.net import free_port

STORESCP = "/usr/bin/storescp"
STORESCU = "/usr/bin/storescu"


def write_series(folder: Path, n: int, size: int) -> list[Path]:
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^Export", "BENCH", "CT"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = rng.integers(-1000, 1000, (size, size), dtype=np.int16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


class Receiver:
    def __init__(self, out: Path, nodelay: bool) -> None:
        self.port = free_port()
        out.mkdir(parents=True)
        env = dict(os.environ)
        env.pop("TCP_NODELAY", None)
        if nodelay:
            env["TCP_NODELAY"] = "1"
        self.proc = subprocess.Popen([STORESCP, "-od", str(out), "-aet", "BENCH", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError("storescp did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def run_itvnode(files: list[Path], port: int) -> None:
    out = send_files(files, Destination(ae_title="BENCH", host="127.0.0.1", port=port), "ITVNODE")
    assert out.ok, out.summary()


def run_storescu(files: list[Path], port: int) -> None:
    env = dict(os.environ, TCP_NODELAY="1")
    subprocess.run([STORESCU, "-aec", "BENCH", "127.0.0.1", str(port), *map(str, files)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)


def run_pynetdicom_nagle(files: list[Path], port: int) -> None:
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="PLAIN")
    ae.maximum_pdu_size = 0
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="BENCH", max_pdu=0)
    assert assoc.is_established
    for f in files:
        assert assoc.send_c_store(f).Status == 0
    assoc.release()
    ae.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for tool in (STORESCP, STORESCU):
        if not Path(tool).exists():
            print(f"{tool} missing (tests/peers.sh installs dcmtk)", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="itvnode-bench-export-"))
    try:
        files = write_series(tmp / "src", args.files, args.size)
        mb = sum(f.stat().st_size for f in files) / 1e6
        senders = [("storescu", run_storescu, True), ("itvnode", run_itvnode, True),
                   ("pynetdicom+nagle", run_pynetdicom_nagle, False)]
        best: dict[str, float] = {}
        for rep in range(args.repeat):
            for name, fn, nodelay in senders:
                rx = Receiver(tmp / f"rx-{name}-{rep}", nodelay)
                try:
                    t0 = time.perf_counter()
                    fn(files, rx.port)
                    dt = time.perf_counter() - t0
                finally:
                    rx.close()
                got = len(list((tmp / f"rx-{name}-{rep}").iterdir()))
                assert got == len(files), f"{name}: storescp got {got} of {len(files)}"
                best[name] = min(best.get(name, dt), dt)
        print(f"{args.files} CT files {args.size}x{args.size} ({mb:.1f} MB) into dcmtk storescp, best of "
              f"{args.repeat}:")
        base = best["storescu"]
        for name, _, _ in senders:
            print(f"  {name:18s} {best[name]:7.3f} s  {args.files / best[name]:8.1f} files/s  "
                  f"ratio vs storescu {best[name] / base:5.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

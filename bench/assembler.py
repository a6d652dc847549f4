"""Assembler cost per poll on a clinical-size index, against a header scan of the same files (same run).

    .venv/bin/python -m bench.assembler [--phases 10] [--slices 150] [--rows 64] [--repeat 5]

The spool index carries every header field the assembler needs, so a poll should cost a fraction of what
re-reading the headers would (the peer: ``pydicom.dcmread(stop_before_pixels=True)`` of every instance, which
an assembler without an index would have to do). Pixel size does not change the index cost, so small images
keep the set-up short. Printed (best of ``repeat``):

* ``poll collecting``  one poll_once while the study is still inside the quiet period (manifest rewritten)
* ``poll completing``  the poll that completes the study: assessment, manifest, enqueue (embedded broker)
* ``poll settled``     one poll_once once the study is queued (nothing to do: index count query only)
* ``header scan``      dcmread of every file, the peer
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phases", type=int, default=10)
    ap.add_argument("--slices", type=int, default=150)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from pydicom import dcmread

    from models.phantom import make_phantom
    from models.phantom_spec import PhantomSpec
    from service.dicomio.phantom_dicom import write_phantom_dicom
    from service.intake.assembler import Assembler
    from service.intake.queue import Enqueuer
    from service.store.header_scan import meta_from_bytes
    from service.store.manifest import load_manifest, manifest_path, study_key
    from service.store.spool import Spool

    with tempfile.TemporaryDirectory(prefix="itvnode-bench-asm-") as tmp:
        root = Path(tmp)
        spec = PhantomSpec.sized(args.rows, args.slices, n_phases=args.phases, slice_thickness=2.0)
        t = time.perf_counter()
        ph = write_phantom_dicom(make_phantom(spec), root / "dicom", vendor="siemens", with_avg=True)
        files = [f for s in ph.series for f in s.files]
        print(f"phantom: {len(files)} files ({args.phases} phases x {args.slices} slices + AVG, "
              f"{args.rows}x{args.rows}) written in {time.perf_counter() - t:.1f} s")
        data_dir = root / "data"
        spool = Spool(data_dir / "spool", fsync=False)
        for f in files:
            raw = f.read_bytes()
            spool.store(meta_from_bytes(raw), raw)
        enqueuer = Enqueuer(None, data_dir)
        last = spool.last_received(ph.study_instance_uid) or 0.0
        key = study_key(ph.study_instance_uid, ph.frame_of_reference_uid)

        def best(fn: object) -> float:
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn()  # type: ignore[operator]
                times.append(time.perf_counter() - t0)
            return min(times)

        def poll_collecting() -> None:
            # a fresh assembler each time: no settled cache, full assessment and manifest write
            Assembler(spool, data_dir, enqueuer.segment_study, quiet_period=1e9, expected_phases=None,
                      settle=1e9).poll_once(last + 1.0)

        collecting = best(poll_collecting)
        asm = Assembler(spool, data_dir, enqueuer.segment_study, quiet_period=60.0,
                        expected_phases=args.phases)
        t0 = time.perf_counter()
        asm.poll_once(last + 3.0)
        completing = time.perf_counter() - t0
        state = load_manifest(manifest_path(data_dir, key)).state
        settled = best(lambda: asm.poll_once(last + 4.0))
        scan = best(lambda: [dcmread(f, stop_before_pixels=True) for f in files])
        enqueuer.close()
        spool.close()

    n = len(files)
    print(f"{'step':<18}{'seconds':>10}{'per instance':>16}{'x header scan':>16}")
    for name, sec in (("poll collecting", collecting), ("poll completing", completing),
                      ("poll settled", settled), ("header scan", scan)):
        print(f"{name:<18}{sec:>10.4f}{sec / n * 1e6:>13.1f} us{sec / scan:>16.3f}")
    print(f"final state: {state}")
    return 0 if state == "queued" else 1


if __name__ == "__main__":
    sys.exit(main())

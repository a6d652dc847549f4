"""One study over two GPU workers (issue 14): with ``phase_groups: 2`` the study is a Celery chord over two
phase groups, run by two real ``itvnode worker`` processes on Redis; the RTSTRUCT the receiver gets is the
one a single worker with ``phase_groups: 1`` sends (same SOP Instance UID, Dice 1.0 per ROI and identical
contour points), and each worker ran one group.

The tiny SAM 3 is random; every score is kept (``score_threshold: 0``) so that it paints masks and the
comparison means something.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from e2e_helpers import (
    REPO,
    Proc,
    StoreSCP,
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _config_file(tmp: Path) -> Path:
    """The default structures with every SAM 3 score kept."""
    from tests.support.tiny_runs import every_score_structures

    path = tmp / "itvnode.yaml"
    path.write_text(json.dumps({"structures": every_score_structures()}))  # JSON is YAML
    return path


def _run(tmp: Path, procs: list[Proc], phantom: Any, model: Path, redis_url: str | None, workers: int,
         groups: int) -> tuple[Path, dict[str, Any]]:
    """serve + ``workers`` inference workers + a receiver; the study sent and done; (RTSTRUCT, manifest)."""
    tmp.mkdir()
    rx = StoreSCP(tmp / "rx", tmp)
    procs.append(rx.proc)
    data = tmp / "data"
    env = node_env(data, free_port(), broker_url=redis_url, destinations=rx.destination, sam3_dir=model,
                   extra={"ITVNODE_CONFIG": str(_config_file(tmp)), "ITVNODE_PHASE_GROUPS": str(groups),
                          "ITVNODE_QUIET_PERIOD": "4"})
    serve = Proc("serve", itvnode_argv("serve"), tmp, env=env, cwd=REPO)
    procs.append(serve)
    wait_for(lambda: port_open(int(env["ITVNODE_PORT"])), 60, "itvnode serve listening",
             diagnose=serve.log)
    started = []
    for i in range(workers):
        queues = "inference,export" if i == 0 else "inference"
        w = Proc(f"worker{i}", itvnode_argv("worker", "--queues", queues, "--concurrency", "1",
                                            "--hostname", f"gpu{i}@%h"), tmp, env=env, cwd=REPO)
        procs.append(w)
        started.append(w)
    for w in started:  # both consuming before the study arrives, so that each takes a group
        wait_for(lambda w=w: " ready." in w.log(), 90, f"{w.name} ready", diagnose=w.log)
    storescu(int(env["ITVNODE_PORT"]), "ITVNODE", [phantom.root])
    wait_for(lambda: study_state(data) == "done" and len(rx.files()) == 1, 300, "the study delivered",
             diagnose=lambda: describe(data, started[-1]) + "\n".join(w.log()[-3000:] for w in started))
    (rs,) = rx.files()
    (m,) = manifests(data)
    for p in procs:
        p.stop(timeout=15)
    return rs, m


def _geometry(phantom: Any, p: int) -> Any:
    from service.dicomio.geometry import plan_series

    files = [str(f) for f in phantom.phases[p].files]
    geom, _ = plan_series([pydicom.dcmread(f, stop_before_pixels=True) for f in files], files)
    return geom


def test_two_workers_split_a_study_into_the_same_rtstruct(
        tmp_path: Path, procs: list[Proc], e2e_phantom: Any, tiny_model_dir: Path,
        shared_redis: Callable[[int], str]) -> None:
    """On Redis the chord counts its groups in Redis; on the embedded SQLite broker in Celery's database
    result backend next to it, the finishing task released by ``celery.chord_unlock``."""
    one, m1 = _run(tmp_path / "one", procs, e2e_phantom, tiny_model_dir, shared_redis(8), 1, 1)
    assert "split" not in m1["results"]
    for broker, url in (("redis", shared_redis(9)), ("embedded", None)):
        two, m2 = _run(tmp_path / broker, procs, e2e_phantom, tiny_model_dir, url, 2, 2)
        split = m2["results"]["split"]
        assert split["groups"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], broker
        assert sorted(g["phases"] == g["computed"] for g in split["done"]) == [True, True], split
        assert len({g["worker"] for g in split["done"]}) == 2, split  # one group on each worker
        assert split["computed_here"] == []
        _same_rtstruct(e2e_phantom, one, two)


def _same_rtstruct(phantom: Any, one: Path, two: Path) -> None:
    from service.dicomio.rtstruct_read import rtstruct_masks

    ds1, ds2 = pydicom.dcmread(one), pydicom.dcmread(two)
    assert ds1.SOPInstanceUID == ds2.SOPInstanceUID  # same content key: the same object for the receiver
    names = [r.ROIName for r in ds1.StructureSetROISequence]
    assert names == [r.ROIName for r in ds2.StructureSetROISequence]
    assert {"GTVp^P0", "Lung_L^P50", "ITV"} <= set(names)
    for r1, r2 in zip(ds1.ROIContourSequence, ds2.ROIContourSequence, strict=True):
        c1 = [list(c.ContourData) for c in getattr(r1, "ContourSequence", [])]
        c2 = [list(c.ContourData) for c in getattr(r2, "ContourSequence", [])]
        assert c1 == c2
    painted = 0
    for p in (0, 5, 9):
        g = _geometry(phantom, p)
        a, b = rtstruct_masks(one, g), rtstruct_masks(two, g)
        assert sorted(a) == sorted(b)
        for name in a:
            inter, total = np.logical_and(a[name], b[name]).sum(), a[name].sum() + b[name].sum()
            dice = 1.0 if total == 0 else 2.0 * inter / total
            assert dice == 1.0, (p, name, dice)
            painted += int(a[name].any())
    assert painted >= 3  # the comparison covers real contours, not empty ROIs

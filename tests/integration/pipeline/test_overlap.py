"""The overlapped run (phase k+1 read while the segmenter works on phase k and phase k-1 is settled) gives
the same masks and a byte-identical RTSTRUCT as reading everything and then segmenting phase after phase, on
the phantom with the tiny random SAM 3 and with threshold-only structures; and records its busy times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.dicomio import rtstruct
from service.store.manifest import load_manifest, manifest_path
from tests.support.tiny_runs import FixedNow, tiny_config
from worker.engine_settings import EngineConfig, LoadedSegmenter
from worker.result_files import write_results
from worker.segmentation import rtstruct_algorithm, segment_overlapped, segment_sequential
from worker.stages import Stages

NO_SAM3 = LoadedSegmenter(None, "SAM 3 unavailable: no SAM 3 model directory configured")
BUSY = {"load", "phase_cpu", "segmenter", "inference", "filter", "overlap_wall", "segmenter_idle"}








def _rtstruct_bytes(data_dir: Path, key: str, m: Any, config: EngineConfig, seg: LoadedSegmenter,
                    run: Any) -> list[bytes]:
    result, _, geoms, references, _ = run
    files, _ = write_results(key, data_dir, m, geoms, references, result, dict(result.skipped), config,
                             rtstruct_algorithm(seg), {}, Stages(key), None)
    return [f.read_bytes() for f in files]


@pytest.mark.parametrize("which", ["tiny", "threshold"])
def test_overlapped_equals_sequential(assembled: tuple[Path, str, Any], which: str,
                                      request: pytest.FixtureRequest,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, key, _ = assembled
    seg = request.getfixturevalue("tiny") if which == "tiny" else NO_SAM3
    m = load_manifest(manifest_path(data_dir, key))
    config = tiny_config()
    stages = Stages(key)
    over = segment_overlapped(key, data_dir, m, config, seg, stages)
    seq = segment_sequential(key, data_dir, m, config, seg, Stages(key))
    assert np.array_equal(over[1], seq[1])  # the 4D volume
    res_o, res_s = over[0], seq[0]
    assert list(res_o.masks) == list(res_s.masks)
    if which == "tiny":
        assert {"Lung_L", "Lung_R", "Heart", "GTVp"} <= set(res_o.masks)
        assert any(res_o.masks[k].any() for k in ("Lung_L", "Heart", "GTVp"))
    else:
        assert set(res_o.masks) == {"External"} and res_o.skipped == res_s.skipped
    for name in res_o.masks:
        assert np.array_equal(res_o.masks[name], res_s.masks[name]), name
    assert list(res_o.envelopes) == list(res_s.envelopes)
    for name in res_o.envelopes:
        assert np.array_equal(res_o.envelopes[name], res_s.envelopes[name]), name
    assert over[3] == seq[3] and (over[4] is None) == (seq[4] is None)  # references, the AVG volume
    if over[4] is not None:
        assert np.array_equal(over[4][1], seq[4][1])

    monkeypatch.setattr(rtstruct, "datetime", FixedNow)  # creation date and time: the only clock read
    files_o = _rtstruct_bytes(data_dir, key, m, config, seg, over)
    files_s = _rtstruct_bytes(data_dir, key, m, config, seg, seq)
    assert files_o and files_o == files_s  # byte-identical RTSTRUCT

    timings = stages.timings
    assert BUSY <= set(timings)
    idle = timings["overlap_wall"] - timings["segmenter"]
    assert timings["segmenter_idle"] == pytest.approx(idle, abs=1e-3)
    assert timings["inference"] == pytest.approx(timings["segmenter"] + timings["phase_cpu"], abs=1e-3)
    assert (timings["segmenter"] > 0) == (which == "tiny")

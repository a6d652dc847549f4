"""Optional DICOM SEG (service/dicomio/seg.py): built by highdicom, read back voxel for voxel, dciodvfy
clean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from rtstruct_study import Study

from models.structures import default_structures
from service.dicomio.output import Algorithm
from tests.support.rtstruct_peers import dciodvfy
from worker.engine_settings import EngineConfig, roi_styles

hd = pytest.importorskip("highdicom")


def test_seg_of_one_phase_round_trips(study10: Study, tmp_path: Path) -> None:
    from service.dicomio.seg import build_seg, write_seg

    p = 4
    phase = study10.series.phases[p]
    g = study10.geometries[p]
    segments = {f"{n}^P40": study10.gt.masks[n][p] for n in study10.gt.masks}
    segments["ITV"] = study10.gt.itv
    segments["Empty^P40"] = np.zeros(g.shape, bool)
    alg = Algorithm("SAM 3", "test-random-init", "lora-test-1")
    seg = build_seg(
        study_key="0123456789abcdef",
        source_files=phase.files,
        geometry=g,
        segments=segments,
        styles=roi_styles(EngineConfig(structures=tuple(default_structures()))),
        algorithm=alg,
    )
    path = write_seg(seg, tmp_path)
    assert dciodvfy(path) == ([], [])

    back = hd.seg.segread(path)
    labels = [s.SegmentLabel for s in back.SegmentSequence]
    assert labels == [f"{n}^P40" for n in study10.gt.masks] + ["ITV"]  # the empty one is left out
    assert {s.SegmentAlgorithmType for s in back.SegmentSequence} == {"AUTOMATIC"}
    pixels = back.get_pixels_by_source_instance(source_sop_instance_uids=list(g.sop_instance_uids))
    for i, name in enumerate(labels):
        assert np.array_equal(pixels[..., i].astype(bool), segments[name]), name
    assert back.FrameOfReferenceUID == g.frame_of_reference_uid
    assert back.Manufacturer == "itvnode" and "review" in back.SeriesDescription

    again = build_seg(
        study_key="0123456789abcdef", source_files=phase.files, geometry=g, segments=segments, algorithm=alg
    )
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (seg.SOPInstanceUID, seg.SeriesInstanceUID)


def test_seg_rejects_wrong_shapes_and_all_empty(study10: Study) -> None:
    from service.dicomio.seg import build_seg

    g = study10.geometries[0]
    files = study10.series.phases[0].files
    with pytest.raises(ValueError, match="shape"):
        build_seg(study_key="k", source_files=files, geometry=g, segments={"A": np.ones((2, 3, 4), bool)})
    with pytest.raises(ValueError, match="empty"):
        build_seg(study_key="k", source_files=files, geometry=g, segments={"A": np.zeros(g.shape, bool)})
    assert pydicom.dcmread(files[0]).SOPInstanceUID in g.sop_instance_uids

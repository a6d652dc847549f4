"""Output UIDs (service.dicomio.uids): identical inputs give identical UIDs; a change in the inputs used, new
ones."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from pydicom.uid import CTImageStorage

from models.structures import StructureSpec
from service.dicomio.geometry import Geometry
from service.dicomio.output import Algorithm
from service.dicomio.rtstruct import build_rtstructs
from service.dicomio.uids import content_key, settings_digest
from service.settings import load_settings
from service.store.manifest import Manifest
from worker.engine_settings import EngineConfig, engine_config
from worker.result_files import result_version

STUDY = "1.2.826.0.1.3680043.8.498.1"
FOR = "1.2.826.0.1.3680043.8.498.2"


def _geom(series: str, n: int = 2, tag: str = "") -> Geometry:
    return Geometry(
        rows=4, columns=4, pixel_spacing=(1.0, 1.0),
        positions=tuple((0.0, 0.0, float(k)) for k in range(n)),
        sop_instance_uids=tuple(f"{series}.{k}{tag}" for k in range(n)),
        sop_class_uids=(CTImageStorage,) * n, frame_numbers=(None,) * n,
        series_instance_uid=series, frame_of_reference_uid=FOR, study_instance_uid=STUDY,
    )


def _build(n_phases: int, layout: str = "combined", **kw: Any) -> list[Any]:
    geoms = kw.pop("geometries", None) or [_geom(f"{STUDY}.{10 + p}") for p in range(n_phases)]
    mask = np.zeros((len(geoms), 2, 4, 4), dtype=bool)
    mask[:, :, 1:3, 1:3] = True
    args: dict[str, Any] = dict(
        study_key="0123456789abcdef", identifiers={"PatientID": "X"}, geometries=geoms,
        phase_percents=[10.0 * p for p in range(len(geoms))], masks={"GTVp": mask},
        envelopes={"ITV": mask.any(axis=0)}, algorithm=Algorithm("SAM 3", "v1", "lora-1"), layout=layout,
    )
    args.update(kw)
    return build_rtstructs(**args)


def _uids(datasets: list[Any]) -> list[tuple[str, str]]:
    return [(str(d.SeriesInstanceUID), str(d.SOPInstanceUID)) for d in datasets]


@pytest.mark.parametrize("layout", ["combined", "per-series"])
def test_identical_inputs_give_identical_uids(layout: str) -> None:
    a = _build(3, layout, now=datetime(2026, 1, 1, tzinfo=UTC))
    b = _build(3, layout, now=datetime(2026, 6, 1, tzinfo=UTC))
    assert _uids(a) == _uids(b)
    assert len({u for pair in _uids(a) for u in pair}) == 2 * len(a)


@pytest.mark.parametrize("layout", ["combined", "per-series"])
def test_one_more_phase_gives_new_uids_for_every_object(layout: str) -> None:
    before = {u for pair in _uids(_build(3, layout)) for u in pair}
    after = {u for pair in _uids(_build(4, layout)) for u in pair}
    assert not before & after  # per-series too: the ITV in every file changed with the new phase


def test_one_more_instance_or_a_late_avg_gives_new_uids() -> None:
    geoms = [_geom(f"{STUDY}.{10 + p}") for p in range(3)]
    base = _uids(_build(3, geometries=geoms))
    # one instance replaced by another (same count, different SOP Instance UID)
    changed = [*geoms[:2], replace(geoms[2], sop_instance_uids=(geoms[2].sop_instance_uids[0], "9.9.9"))]
    assert _uids(_build(3, geometries=changed)) != base
    # a reference series arriving late is referenced, so it is an input used
    avg = _geom(f"{STUDY}.99")
    assert _uids(_build(3, geometries=geoms, references={"AVG": avg})) != base
    # ... unless it is on another grid and therefore not used
    off_grid = replace(avg, positions=((5.0, 0.0, 0.0), (5.0, 0.0, 1.0)))
    assert _uids(_build(3, geometries=geoms, references={"AVG": off_grid})) == base


def test_algorithm_settings_and_layout_are_part_of_the_key() -> None:
    base = _uids(_build(3))
    assert _uids(_build(3, algorithm=Algorithm("SAM 3", "v1", "lora-2"))) != base
    assert _uids(_build(3, settings_digest="other")) != base
    assert _uids(_build(3, uid_prefix="1.2.3.4"))[0][1].startswith("1.2.3.4.")


def test_settings_digest_ignores_what_cannot_change_content() -> None:
    cfg = EngineConfig(structures=(StructureSpec(name="GTVp", prompt="tumor"),))
    assert settings_digest(cfg) == settings_digest(replace(cfg, device="cuda", batch_size=16, write_seg=True))
    assert settings_digest(cfg) != settings_digest(replace(cfg, temporal=replace(cfg.temporal, min_phases=4)))
    assert settings_digest(cfg) != settings_digest(replace(cfg, rtstruct_holes="xor"))


def test_settings_digest_of_an_unchanged_config_survives_the_temporal_regrouping(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinned before EngineConfig grouped its temporal_* fields and the three new temporal settings existed:
    identical content must keep its UIDs across an upgrade; a new setting changes them once it is moved."""
    for key in [k for k in os.environ if k.startswith("ITVNODE_")]:
        monkeypatch.delenv(key)
    default = engine_config(load_settings(sam3_dir=None, adapter_dir=None))
    assert settings_digest(default) == "40dfe13f500eed48638fba5ea9805158"
    cfg = EngineConfig(structures=(StructureSpec(name="GTVp", prompt="tumor"),))
    assert settings_digest(cfg) == "b947ac31f01ba4099e316254f43a3b9f"
    assert settings_digest(replace(cfg, temporal=replace(cfg.temporal, min_phases=4))) == (
        "c491cbbbf2d92f5d7d4ab7b83fe238dd")
    for changed in ({"circular": False}, {"connectivity": 1}, {"centroid_volume_ratio": 0.25}):
        other = replace(cfg, temporal=replace(cfg.temporal, **changed))
        assert settings_digest(other) != settings_digest(cfg)
    moved = engine_config(load_settings(sam3_dir=None, adapter_dir=None, temporal_connectivity=2))
    assert moved.temporal.connectivity == 2 and settings_digest(moved) != settings_digest(default)


def test_content_key_is_order_and_duplicate_independent() -> None:
    k = content_key(study_key="s", input_sop_instance_uids=["1.2", "1.3"], algorithm=("a",),
                    layout="combined")
    assert k == content_key(study_key="s", input_sop_instance_uids=["1.3", "1.2", "1.2"], algorithm=("a",),
                            layout="combined")
    assert k != content_key(study_key="s", input_sop_instance_uids=["1.2", "1.3", "1.4"], algorithm=("a",),
                            layout="combined")
    with pytest.raises(ValueError):
        content_key(study_key="s", input_sop_instance_uids=[], algorithm=("a",), layout="combined")


def test_a_corrected_resend_under_the_same_uid_is_new_content() -> None:
    """The spool keeps a changed re-send under its SOP Instance UID with a revision (hardening item 9):
    the result built from it must not reuse the UIDs of the result built from the first copy."""
    args = {"study_key": "s", "input_sop_instance_uids": ["1.2", "1.3"], "algorithm": ("a",),
            "layout": "combined"}
    first = content_key(**args)  # type: ignore[arg-type]
    assert first == content_key(**args, revisions={})  # type: ignore[arg-type]
    assert first == content_key(**args, revisions={"9.9": 1})  # type: ignore[arg-type]  # not an input
    corrected = content_key(**args, revisions={"1.3": 1})  # type: ignore[arg-type]
    assert corrected != first
    assert corrected != content_key(**args, revisions={"1.3": 2})  # type: ignore[arg-type]


def test_version_is_described_and_numbered_but_not_in_the_uids() -> None:
    v1, v2 = _build(3, version=1)[0], _build(3, version=2)[0]
    assert (v1.SOPInstanceUID, v1.SeriesInstanceUID) == (v2.SOPInstanceUID, v2.SeriesInstanceUID)
    assert " v2 3ph " in str(v2.SeriesDescription)
    assert "review before clinical use" in str(v2.SeriesDescription)
    assert "Version 2, from 3 phases (0, 10, 20%)" in str(v2.StructureSetDescription)
    assert (int(v1.SeriesNumber), int(v2.SeriesNumber)) == (901, 1001)


def test_result_version_counter() -> None:
    m = Manifest(study_key="k", study_instance_uid=STUDY, frame_of_reference_uid=FOR)
    assert result_version(m, "a") == 1
    m.results["versions"] = [{"version": 1, "content_key": "a"}, {"version": 2, "content_key": "b"}]
    assert result_version(m, "a") == 1  # the same content again: same version (and the same UIDs)
    assert result_version(m, "c") == 3

"""RTSTRUCT output on a 10-phase phantom: dciodvfy, plastimatch round trip, layouts, UIDs, DS lengths."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from rtstruct_study import Study, build

from service.dicomio.output import Algorithm, RoiStyle
from service.dicomio.rtstruct import roi_name, write_rtstruct
from tests.support.rtstruct_peers import DS_RE, dciodvfy, dice, ds_values, plastimatch_masks

STRUCTURES = ("External", "Lung_L", "Lung_R", "Heart", "GTVp")


@pytest.mark.parametrize("layout", ["combined", "per-series"])
def test_dciodvfy_zero_errors_and_no_warnings(written: dict[str, list[Path]], layout: str) -> None:
    for path in written[layout]:
        errors, warnings = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
        assert warnings == [], f"{path.name}: {warnings}"  # docs/rtstruct.md lists the ones that can remain


def test_layout_counts_and_references(study10: Study, written: dict[str, list[Path]]) -> None:
    phase_uids = [g.series_instance_uid for g in study10.geometries]
    ref_uids = [g.series_instance_uid for g in study10.references.values()]
    (combined,) = [pydicom.dcmread(p) for p in written["combined"]]
    study = combined.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    refd = study.RTReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in refd] == phase_uids + ref_uids
    assert all(len(s.ContourImageSequence) == 24 for s in refd)
    names = [r.ROIName for r in combined.StructureSetROISequence]
    assert len(names) == 10 * 5 + 1 and names[-1] == "ITV"
    assert "GTVp^P40" in names and "External^P90" in names
    assert all(len(n) <= 16 for n in names)

    per = [pydicom.dcmread(p) for p in written["per-series"]]
    assert len(per) == 10 + len(ref_uids)  # one per phase + one per reference series (AVG, MIP)
    referenced = [
        d.ReferencedFrameOfReferenceSequence[0]
        .RTReferencedStudySequence[0]
        .RTReferencedSeriesSequence[0]
        .SeriesInstanceUID
        for d in per
    ]
    assert referenced == phase_uids + ref_uids
    assert [r.ROIName for r in per[4].StructureSetROISequence] == [f"{s}^P40" for s in STRUCTURES] + ["ITV"]
    assert [r.ROIName for r in per[-1].StructureSetROISequence] == ["ITV"]


def test_every_contour_references_its_slice(study10: Study, written: dict[str, list[Path]]) -> None:
    geoms = {g.series_instance_uid: g for g in [*study10.geometries, *study10.references.values()]}
    z_of = {
        uid: z for g in geoms.values() for uid, z in zip(g.sop_instance_uids, g.slice_positions, strict=True)
    }
    for path in written["combined"] + written["per-series"][:1]:
        ds = pydicom.dcmread(path)
        n = 0
        for roi in ds.ROIContourSequence:
            for c in roi.get("ContourSequence", []):
                assert c.ContourGeometricType == "CLOSED_PLANAR"
                (img,) = c.ContourImageSequence
                pts = np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
                assert len(pts) == c.NumberOfContourPoints
                assert np.allclose(pts[:, 2], z_of[img.ReferencedSOPInstanceUID], atol=1e-3)
                n += 1
        assert n > 0


def test_contour_data_values_are_valid_ds_of_at_most_16_chars(written: dict[str, list[Path]]) -> None:
    for path in written["combined"] + written["per-series"]:
        values = ds_values(pydicom.dcmread(path))
        assert len(values) > 100
        bad = [v for v in values if len(v) > 16 or not DS_RE.match(v)]
        assert bad == [], bad[:5]


def _dice_table(title: str, rows: list[tuple[str, int, int, float]]) -> None:
    print(f"\n{title}\n{'ROI':<16} {'mask vox':>9} {'plastimatch':>11} {'Dice':>7}")
    for name, a, b, d in rows:
        print(f"{name:<16} {a:>9} {b:>11} {d:>7.4f}")


def test_plastimatch_round_trip_combined(
    study10: Study, written: dict[str, list[Path]], tmp_path: Path
) -> None:
    """The documented peer command (no --xor-contours): every phantom structure, every phase, the ITV."""
    gt = study10.gt
    got = plastimatch_masks(written["combined"][0], study10.series.phases[0].folder, tmp_path)
    rows = []
    for name in STRUCTURES:
        for p, pct in enumerate(gt.phase_percents):
            roi = roi_name(name, pct)
            want = gt.masks[name][p]
            rows.append((roi, int(want.sum()), int(got[roi].sum()), dice(want, got[roi])))
    rows.append(("ITV", int(gt.itv.sum()), int(got["ITV"].sum()), dice(gt.itv, got["ITV"])))
    _dice_table("plastimatch round trip, combined layout", rows)
    assert min(r[3] for r in rows) >= 0.98
    # The 8 mm tumour on 2 mm pixels (rt-utils 1.2.7: Dice 0.848) comes back voxel for voxel.
    assert all(r[1] == r[2] for r in rows if r[0].startswith("GTVp") or r[0] == "ITV")


def test_plastimatch_round_trip_per_series(
    study10: Study, written: dict[str, list[Path]], tmp_path: Path
) -> None:
    gt = study10.gt
    rows = []
    for p in (0, 5):
        got = plastimatch_masks(written["per-series"][p], study10.series.phases[p].folder, tmp_path / str(p))
        for name in STRUCTURES:
            roi = roi_name(name, gt.phase_percents[p])
            want = gt.masks[name][p]
            rows.append((roi, int(want.sum()), int(got[roi].sum()), dice(want, got[roi])))
    avg = next(s for s in study10.series.references if s.kind == "AVG")
    got = plastimatch_masks(written["per-series"][10], avg.folder, tmp_path / "avg")
    rows.append(("ITV (AVG)", int(gt.itv.sum()), int(got["ITV"].sum()), dice(gt.itv, got["ITV"])))
    _dice_table("plastimatch round trip, per-series layout", rows)
    assert min(r[3] for r in rows) >= 0.98


@pytest.mark.parametrize("holes", ["keyhole", "xor"])
def test_holes_islands_and_tiny_structures(study10: Study, tmp_path: Path, holes: str) -> None:
    """keyhole: right with plastimatch's default (contours OR'd); xor: right with --xor-contours."""
    shape = study10.geometries[0].shape
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    r2 = (yy - 64) ** 2 + (xx - 64) ** 2
    ring = (r2 < 30**2) & (r2 >= 12**2) & (zz >= 4) & (zz < 20)
    ring[10, 63:66, 63:66] = True  # an island inside the hole
    ring[12, 40:90, 62:66] = False  # a slot cut through the ring: one slice has two separate arcs
    islands = np.zeros(shape, bool)
    islands[8, 10:14, 10:14] = islands[8, 100:103, 20:30] = islands[9, 50, 110] = True
    islands[8, 20:30, 40:50] = True
    islands[8, 23:25, 43:47] = False  # an island with its own hole
    one = np.zeros(shape, bool)
    one[12, 70, 33] = True  # a 1-voxel structure
    diag = np.zeros(shape, bool)
    diag[5, 20, 20] = diag[5, 21, 21] = diag[5, 22, 20] = True  # touching at corners only
    extra = {"Ring": ring, "Islands": islands, "One": one, "Diag": diag}
    p4 = {k: np.broadcast_to(v, (10, *shape)) for k, v in extra.items()}
    (ds,) = build(study10, "combined", masks=p4, envelopes={}, holes=holes)
    path = write_rtstruct(ds, tmp_path)
    assert dciodvfy(path) == ([], [])
    got = plastimatch_masks(path, study10.series.phases[3].folder, tmp_path / "out", xor=holes == "xor")
    rows = [(k, int(v.sum()), int(got[f"{k}^P30"].sum()), dice(v, got[f"{k}^P30"])) for k, v in extra.items()]
    _dice_table(f"holes / islands / tiny, {holes}", rows)
    for name, mask in extra.items():
        assert np.array_equal(got[f"{name}^P30"], mask), name
    ring_roi = next(r for r in ds.ROIContourSequence if r.ReferencedROINumber == 1)
    z10 = study10.geometries[0].slice_positions[10]
    on_slice_10 = [c for c in ring_roi.ContourSequence if abs(float(c.ContourData[2]) - z10) < 1e-3]
    # keyhole: the ring with its hole cut in, and the island; xor: outer, hole and island
    assert len(on_slice_10) == (2 if holes == "keyhole" else 3)


def test_empty_structure_keeps_its_roi_and_skipped_ones_are_described(study10: Study, tmp_path: Path) -> None:
    shape = (10, *study10.geometries[0].shape)
    masks = {"GTVp": study10.gt.masks["GTVp"], "Heart": np.zeros(shape, bool)}
    (ds,) = build(
        study10,
        "combined",
        masks=masks,
        envelopes={"ITV": np.zeros(shape[1:], bool)},
        skipped={"Lung": "SAM 3 weights not configured"},
    )
    path = write_rtstruct(ds, tmp_path)
    errors, warnings = dciodvfy(path)
    assert errors == [] and warnings == []
    back = pydicom.dcmread(path)
    by_number = {r.ROINumber: r.ROIName for r in back.StructureSetROISequence}
    empty = [by_number[c.ReferencedROINumber] for c in back.ROIContourSequence if "ContourSequence" not in c]
    assert empty == [f"Heart^P{p:g}" for p in study10.gt.phase_percents] + ["ITV"]
    assert "Lung (SAM 3 weights not configured)" in back.StructureSetDescription


def test_uids_are_deterministic(study10: Study) -> None:
    small = {"GTVp": study10.gt.masks["GTVp"]}  # UIDs do not depend on the contours: keep the builds quick

    def uids(layout: str, **kw: object) -> list[tuple[str, str]]:
        return [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in build(study10, layout, masks=small, **kw)]

    a = uids("per-series", now=datetime(2026, 1, 1, tzinfo=UTC))
    b = uids("per-series", now=datetime(2026, 6, 1, tzinfo=UTC))
    assert a == b
    assert len({u for pair in a for u in pair}) == 2 * len(a)
    assert uids("combined")[0] not in a
    other_adapter = Algorithm("SAM 3", "test-random-init", "lora-test-2")
    assert uids("combined", algorithm=other_adapter) != uids("combined")
    assert uids("combined", uid_prefix="1.2.3.4.")[0][1].startswith("1.2.3.4.")
    assert uids("combined", uid_prefix="1.2.3.4") == uids("combined", uid_prefix="1.2.3.4.")
    with pytest.raises(ValueError, match="UID root"):
        uids("combined", uid_prefix="1.2.03.x")


def test_marked_as_machine_output(study10: Study, written: dict[str, list[Path]]) -> None:
    ds = pydicom.dcmread(written["combined"][0])
    assert ds.Manufacturer == "itvnode" and ds.ManufacturerModelName and ds.SoftwareVersions
    assert "review before clinical use" in ds.SeriesDescription
    assert "review before clinical use" in ds.StructureSetDescription
    assert ds.ApprovalStatus == "UNAPPROVED"
    assert {r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence} == {"AUTOMATIC"}
    assert all("lora-test-1" in r.ROIGenerationDescription for r in ds.StructureSetROISequence)
    types = {o.ROIObservationLabel: o.RTROIInterpretedType for o in ds.RTROIObservationsSequence}
    assert types["GTVp^P0"] == "GTV" and types["External^P50"] == "EXTERNAL" and types["ITV"] == ""
    assert ds.PatientID == study10.identifiers["PatientID"]
    assert ds.StudyInstanceUID == study10.series.study_instance_uid
    assert ds.FrameOfReferenceUID == study10.series.frame_of_reference_uid


def test_very_long_contour_switches_to_implicit_vr(study10: Study, tmp_path: Path) -> None:
    shape = study10.geometries[0].shape
    comb = np.zeros(shape, bool)
    comb[6, 2:126:2, 2:126] = True  # a ladder: full rows joined by rungs every 4th column ...
    comb[6, 3:125:2, 2:126:4] = True  # ... ~1,900 holes keyholed into one contour of > 65,534 bytes
    per_phase = np.zeros((10, *shape), bool)
    per_phase[0] = comb
    (ds,) = build(study10, "combined", masks={"Comb": per_phase}, envelopes={})
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    path = write_rtstruct(ds, tmp_path)
    assert dciodvfy(path)[0] == []
    got = plastimatch_masks(path, study10.series.phases[0].folder, tmp_path / "out")
    assert np.array_equal(got["Comb^P0"], comb)


def test_styles_and_input_checks(study10: Study) -> None:
    (ds,) = build(
        study10,
        "combined",
        styles={"GTVp": RoiStyle((1, 2, 3), "GTV")},
        masks={"GTVp": study10.gt.masks["GTVp"]},
    )
    assert [int(v) for v in ds.ROIContourSequence[0].ROIDisplayColor] == [1, 2, 3]
    with pytest.raises(ValueError, match="shape"):
        build(study10, "combined", masks={"GTVp": study10.gt.masks["GTVp"][:5]})
    with pytest.raises(ValueError, match="layout"):
        build(study10, "sideways")
    with pytest.raises(ValueError, match="phase percents"):
        build(study10, "combined", phase_percents=[0.0])
    with pytest.raises(ValueError, match="at least one ROI"):
        build(study10, "combined", masks={}, envelopes={})
    # per-series without envelopes: one file per phase, none on AVG/MIP (nothing to put there)
    assert len(build(study10, "per-series", masks={"GTVp": study10.gt.masks["GTVp"]}, envelopes={})) == 10
    assert roi_name("VeryLongStructure", 12.5) == "VeryLongSt^P12.5"


def test_multiframe_source_is_referenced_by_frame(tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom")
    from service.dicomio.rtstruct import build_rtstructs
    from service.dicomio.volume import read_series
    from tests.support.ctdata import write_ct_series

    hu = np.full((6, 32, 32), -1000, np.int16)
    files = write_ct_series(
        tmp_path / "ct",
        hu,
        spacing=(3.0, 1.5, 1.5),
        origin=(-24.0, -24.0, 0.0),
        study_uid="1.2.826.0.1.3680043.8.498.11",
        for_uid="1.2.826.0.1.3680043.8.498.12",
    )
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=[pydicom.dcmread(f) for f in files],
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=5,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    mf.save_as(tmp_path / "mf.dcm")
    _, g = read_series([tmp_path / "mf.dcm"])
    mask = np.zeros((1, *g.shape), bool)
    mask[0, 2:4, 10:20, 12:18] = True
    (ds,) = build_rtstructs(
        study_key="mf",
        identifiers={"PatientID": "X", "StudyDate": "20260101", "StudyTime": "120000", "StudyID": "1"},
        geometries=[g],
        phase_percents=[0.0],
        masks={"GTVp": mask},
        envelopes={},
    )
    path = write_rtstruct(ds, tmp_path / "rs")
    assert dciodvfy(path) == ([], [])
    frames = {
        int(c.ContourImageSequence[0].ReferencedFrameNumber) for c in ds.ROIContourSequence[0].ContourSequence
    }
    z = {g.frame_numbers[k] for k in (2, 3)}
    assert frames == z


@pytest.mark.parametrize("implicit", [True, False])
def test_in_memory_dataset_encodes_for_c_store(study10: Study, tmp_path: Path, implicit: bool) -> None:
    """The outbox may hand our Dataset to pynetdicom, which re-encodes it in the negotiated syntax."""
    from io import BytesIO

    from pynetdicom.dsutils import decode, encode

    masks = {k: study10.gt.masks[k] for k in ("Heart", "GTVp")}
    (ds,) = build(study10, "combined", masks=masks)
    encoded = encode(ds, implicit, True)
    assert encoded is not None
    back = decode(BytesIO(encoded), implicit, True)
    ref = pydicom.dcmread(write_rtstruct(ds, tmp_path))

    def contours(d: pydicom.Dataset) -> list[tuple[str, int, list[float]]]:
        return [
            (
                c.ContourImageSequence[0].ReferencedSOPInstanceUID,
                int(c.NumberOfContourPoints),
                [float(v) for v in c.ContourData],
            )
            for r in d.ROIContourSequence
            for c in r.get("ContourSequence", [])
        ]

    got, want = contours(back), contours(ref)
    assert len(want) > 100 and got == want

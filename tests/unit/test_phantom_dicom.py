"""The phantom as DICOM: pixels, geometry, vendor styles, UIDs, IOD validity, and the CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from itvnode.cli import main as itvnode_main
from models.phantom import Phantom, make_phantom
from models.phantom_truth import load_ground_truth
from service.dicomio.phantom_dicom import PATIENT_NAME, PhantomSeries, phase_description, write_phantom_dicom

Factory = Callable[..., PhantomSeries]


def _read(files: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in files]


def _volume(files: list[Path]) -> np.ndarray:
    dss = sorted(_read(files), key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                     for d in dss])


def test_pixels_read_back_as_the_same_hu(small_phantom: Phantom, small_phantom_dicom: PhantomSeries) -> None:
    assert len(small_phantom_dicom.phases) == small_phantom.spec.n_phases
    for i, s in enumerate(small_phantom_dicom.phases):
        assert s.percent == small_phantom.phase_percents[i]
        assert np.array_equal(_volume(s.files), small_phantom.hu[i])


def test_avg_and_mip_series(small_phantom: Phantom, small_phantom_dicom: PhantomSeries) -> None:
    refs = {s.kind: s for s in small_phantom_dicom.references}
    assert set(refs) == {"AVG", "MIP"}
    for kind, expect in (("AVG", np.rint(small_phantom.hu.astype(np.float32).mean(axis=0))),
                         ("MIP", small_phantom.hu.max(axis=0))):
        ds = pydicom.dcmread(refs[kind].files[0])
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AVERAGE" if kind == "AVG" else "MIP"]
        assert ds.SeriesDescription == kind
        assert "NominalPercentageOfRespiratoryPhase" not in ds
        assert np.abs(_volume(refs[kind].files) - expect).max() <= 1


def test_ct_image_module_and_file_meta(small_phantom: Phantom, small_phantom_dicom: PhantomSeries) -> None:
    ds = pydicom.dcmread(small_phantom_dicom.phases[0].files[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx(small_phantom.spacing[1:], abs=1e-9)
    assert float(ds.SliceThickness) == small_phantom.spacing[0]
    assert (ds.Rows, ds.Columns) == small_phantom.shape[2:]
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    assert ds.PatientPosition == "HFS" and ds.Modality == "CT"
    assert ds["PixelData"].VR == "OW"
    assert str(ds.PatientName) == PATIENT_NAME == "PHANTOM^4DCT"
    assert ds.PatientID.startswith("PHANTOM-")
    assert "PositionReferenceIndicator" in ds and ds.StudyDate and ds.Manufacturer == "SIEMENS"
    # first slice sits at the phantom origin
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(small_phantom.origin, abs=1e-6)


def test_phases_share_frame_of_reference_and_positions(small_phantom_dicom: PhantomSeries) -> None:
    seen_pos = None
    fors, series_uids = set(), set()
    for s in small_phantom_dicom.phases + small_phantom_dicom.references:
        dss = _read(s.files)
        fors |= {d.FrameOfReferenceUID for d in dss}
        series_uids |= {d.SeriesInstanceUID for d in dss}
        pos = [tuple(float(v) for v in d.ImagePositionPatient) for d in dss]
        assert pos == sorted(pos, key=lambda p: p[2]), "files are listed in slice order"
        if seen_pos is None:
            seen_pos = pos
        assert pos == seen_pos
        assert {d.StudyInstanceUID for d in dss} == {small_phantom_dicom.study_instance_uid}
    assert fors == {small_phantom_dicom.frame_of_reference_uid}
    assert len(series_uids) == len(small_phantom_dicom.phases) + 2
    assert seen_pos == [pytest.approx(p) for p in small_phantom_dicom.positions]


SIEMENS_RX = re.compile(r"^RespCT\s+3\.0\s+B30f\s+(?P<pct>\d+(?:\.\d+)?)%\s+(?:In|Ex)$")
PHILIPS_RX = re.compile(r",\s*Gated,\s*(?P<pct>\d+(?:\.\d+)?)%A")


def test_siemens_style(small_phantom_dicom: PhantomSeries) -> None:
    numbers = set()
    for s in small_phantom_dicom.phases:
        ds = pydicom.dcmread(s.files[0])
        m = SIEMENS_RX.match(ds.SeriesDescription)
        assert m and float(m["pct"]) == s.percent, ds.SeriesDescription
        numbers.add(ds.SeriesNumber)
    assert len(numbers) == len(small_phantom_dicom.phases)
    assert phase_description("siemens", 50.0) == "RespCT  3.0  B30f  50% Ex"
    assert phase_description("siemens", 0.0) == "RespCT  3.0  B30f  0% In"


def test_philips_style_all_series_number_one(phantom_dicom_factory: Factory) -> None:
    ser = phantom_dicom_factory("philips")
    for s in ser.phases:
        ds = pydicom.dcmread(s.files[0])
        assert ds.SeriesNumber == 1 and ds.Manufacturer == "Philips"
        assert ds.SeriesDescription.startswith("P4^P100^S300^I00008, Gated, ")
        m = PHILIPS_RX.search(ds.SeriesDescription)
        assert m and float(m["pct"]) == s.percent
    assert phase_description("philips", 50.0) == "P4^P100^S300^I00008, Gated, 50.0%A"


def test_enhanced_style_carries_nominal_percentage(phantom_dicom_factory: Factory) -> None:
    ser = phantom_dicom_factory("enhanced")
    for s in ser.phases:
        for ds in _read(s.files[:2]):
            assert ds.SeriesDescription == "4DCT phase"
            elem = ds[0x0020, 0x9245]
            assert elem.VR == "FL" and float(elem.value) == s.percent
            assert (0x0020, 0x9241) not in ds  # cardiac, never for breathing


def test_extra_ct_series(phantom_dicom_factory: Factory) -> None:
    other = phantom_dicom_factory("siemens", with_extra_ct=True)
    same = phantom_dicom_factory("siemens", with_extra_ct="same-for")
    for ser, shares in ((other, False), (same, True)):
        (ct,) = ser.extra
        ds = pydicom.dcmread(ct.files[0])
        assert ds.SeriesDescription == "Thorax 3.0 B31f" and ct.percent is None
        assert (ds.FrameOfReferenceUID == ser.frame_of_reference_uid) is shares
        assert ds.StudyInstanceUID == ser.study_instance_uid
        assert "NominalPercentageOfRespiratoryPhase" not in ds


def test_uids_are_deterministic(small_phantom: Phantom, tmp_path: Path) -> None:
    a = write_phantom_dicom(small_phantom, tmp_path / "a", vendor="philips", uid_seed="s1")
    b = write_phantom_dicom(small_phantom, tmp_path / "b", vendor="philips", uid_seed="s1")
    c = write_phantom_dicom(small_phantom, tmp_path / "c", vendor="philips", uid_seed="s2")
    uids = [[(d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID, d.FrameOfReferenceUID)
             for d in _read(x.phases[1].files)] for x in (a, b, c)]
    assert uids[0] == uids[1]
    assert not {u for t in uids[0] for u in t} & {u for t in uids[2] for u in t}
    sops = [u[2] for u in uids[0]]
    assert len(set(sops)) == len(sops)
    for uid in uids[0][0]:
        assert len(uid) <= 64 and re.fullmatch(r"[0-9.]+", uid)
    # default seed comes from the spec: another spec never reuses UIDs
    other = make_phantom(small_phantom.spec.__class__.small(n_phases=2, tumour_amplitude_mm=10.0))
    d1 = write_phantom_dicom(small_phantom, tmp_path / "d1")
    d2 = write_phantom_dicom(other, tmp_path / "d2")
    assert d1.study_instance_uid != d2.study_instance_uid


def test_unknown_vendor_rejected(small_phantom: Phantom, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vendor"):
        write_phantom_dicom(small_phantom, tmp_path, vendor="toshiba")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed (tests/peers.sh)")
@pytest.mark.parametrize("vendor", ["siemens", "philips", "enhanced"])
def test_dciodvfy_reports_no_errors(phantom_dicom_factory: Factory, vendor: str) -> None:
    ser = phantom_dicom_factory(vendor, with_avg=True, with_mip=True, with_extra_ct=True)
    for s in (ser.phases[0], ser.references[0], ser.extra[0]):
        res = subprocess.run(["dciodvfy", str(s.files[len(s.files) // 2])], capture_output=True, text=True,
                             timeout=60)
        out = res.stdout + res.stderr
        assert "CTImage" in out
        errors = [ln for ln in out.splitlines() if ln.startswith("Error")]
        assert not errors, errors


def test_cli_writes_dicom_and_ground_truth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ph"
    rc = itvnode_main(["phantom", str(out), "--size", "small", "--phases", "6", "--vendor", "philips",
                       "--tumour-amplitude", "12", "--avg", "--mip", "--extra-ct", "--seed", "3"])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "6 phases" in summary and str(out / "ground_truth") in summary
    folders = sorted(p.name for p in (out / "dicom").iterdir())
    assert len(folders) == 9 and folders[0].startswith("00_P4_P100")
    assert all(len(list((out / "dicom" / f).glob("*.dcm"))) == 24 for f in folders)
    gt = load_ground_truth(out / "ground_truth")
    assert gt.shape == (6, 24, 96, 96)
    assert gt.meta["tumour"]["amplitude_mm"]["SI"] == 12.0 and gt.meta["seed"] == 3
    # pixels in the files match a phantom rebuilt from the recorded spec
    ds = pydicom.dcmread(sorted((out / "dicom" / folders[3]).glob("*.dcm"))[0])
    assert ds.SeriesDescription.endswith("50.0%A")


def test_cli_refuses_to_mix_studies_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ph"
    args = ["phantom", str(out), "--rows", "32", "--slices", "4", "--phases", "2"]
    assert itvnode_main(args) == 0
    stale = out / "dicom" / "99_stale"
    stale.mkdir()
    assert itvnode_main([*args, "--vendor", "philips"]) == 2
    assert "--force" in capsys.readouterr().err
    assert itvnode_main([*args, "--vendor", "philips", "--force"]) == 0
    assert not stale.exists()
    assert sorted(p.name for p in (out / "dicom").iterdir())[0].startswith("00_P4")


def test_cli_rejects_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert itvnode_main(["phantom", str(tmp_path / "x"), "--size", "small", "--tumour-amplitude", "-3"]) == 2
    assert "tumour_amplitude_mm" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_console_script(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "itvnode.cli", "phantom", str(tmp_path / "o"), "--rows", "32",
                          "--slices", "8", "--phases", "2", "--vendor", "enhanced", "--tumour-radius", "20"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "2 phases" in res.stdout
    files = sorted((tmp_path / "o" / "dicom").rglob("*.dcm"))
    assert len(files) == 16
    assert pydicom.dcmread(files[0]).Rows == 32


@pytest.mark.slow
def test_full_size_phase_by_phase_within_memory(tmp_path: Path) -> None:
    """Clinical geometry (512 x 512 x 120, 0.98 mm, 2.5 mm): written phase by phase, well under 1.5 GB."""
    import tracemalloc

    from itvnode.commands.phantom import write_phantom
    from models.phantom_spec import PhantomSpec

    spec = PhantomSpec.full(n_phases=2)
    tracemalloc.start()
    try:
        ser = write_phantom(tmp_path / "full", spec, vendor="siemens", with_mip=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * 1024**3, f"peak {peak / 2**20:.0f} MB"
    assert [s.slices for s in ser.series] == [120, 120, 120]
    mid = ser.phases[1].files[60]
    ds = pydicom.dcmread(mid)
    assert (ds.Rows, ds.Columns) == (512, 512)
    assert float(ds.ImagePositionPatient[0]) == pytest.approx(-249.81, abs=0.01)
    expect = make_phantom(spec).phase_hu(1)[60]
    assert np.array_equal(ds.pixel_array.astype(np.int32) - 1024, expect)
    gt = load_ground_truth(ser.ground_truth_dir or tmp_path)
    assert gt.masks["GTVp"].shape == (2, 120, 512, 512)
    assert gt.meta["tumour"]["sampled_range_mm"]["SI"] == pytest.approx(15.0)

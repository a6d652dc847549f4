"""The analytic phantom: exact masks, anatomy, breathing, ground-truth file format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from models.phantom import HU, Phantom, make_phantom
from models.phantom_spec import HU_MAX, HU_MIN, STRUCTURES, PhantomSpec, lujan
from models.phantom_truth import load_ground_truth, save_ground_truth


def _grid(ph: Phantom) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates (z, y, x) in mm, recomputed here from origin and spacing."""
    _, nz, ny, nx = ph.shape
    dz, dy, dx = ph.spacing
    ox, oy, oz = ph.origin
    return (oz + dz * np.arange(nz))[:, None, None], (oy + dy * np.arange(ny))[None, :, None], \
        (ox + dx * np.arange(nx))[None, None, :]


def test_shapes_dtypes_and_geometry(small_phantom: Phantom) -> None:
    p, z, y, x = small_phantom.shape
    assert small_phantom.hu.shape == (p, z, y, x) and small_phantom.hu.dtype == np.int16
    assert set(small_phantom.masks) == set(STRUCTURES)
    for m in small_phantom.masks.values():
        assert m.shape == (p, z, y, x) and m.dtype == bool
    assert small_phantom.itv.shape == (z, y, x)
    assert small_phantom.phase_percents == (0.0, 25.0, 50.0, 75.0)
    # off-grid origin, centred in x and y
    ox, oy, _ = small_phantom.origin
    assert ox == pytest.approx(-(x - 1) * small_phantom.spacing[2] / 2 - 0.3)
    assert oy == pytest.approx(-(y - 1) * small_phantom.spacing[1] / 2 - 0.3)


def test_full_default_geometry_is_clinical() -> None:
    ph = make_phantom()  # lazy: nothing generated
    assert ph.shape == (10, 120, 512, 512)
    assert ph.spacing == pytest.approx((2.5, 0.9765625, 0.9765625))
    assert ph.origin[0] == pytest.approx(-249.81, abs=0.01)
    assert len(ph.slice_positions()) == 120


def test_gtv_mask_is_exact_voxel_centre_sphere(small_phantom: Phantom) -> None:
    zz, yy, xx = _grid(small_phantom)
    r = small_phantom.spec.tumour_radius_mm
    for i in range(small_phantom.spec.n_phases):
        cx, cy, cz = small_phantom.tumour_centre(i)
        expect = (xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2 <= r * r
        assert np.array_equal(small_phantom.masks["GTVp"][i], expect)
        assert expect.sum() > 0


def test_structures_disjoint_and_inside_body(small_phantom: Phantom) -> None:
    m = small_phantom.masks
    organs = ["Lung_L", "Lung_R", "Heart", "GTVp"]
    for a in organs:
        assert not np.any(m[a] & ~m["External"]), f"{a} leaves the body"
        for b in organs:
            if a < b:
                assert not np.any(m[a] & m[b]), f"{a} overlaps {b}"
    for k in STRUCTURES:
        assert m[k].any(axis=(1, 2, 3)).all(), f"{k} missing in some phase"


def test_laterality_left_is_plus_x(small_phantom: Phantom) -> None:
    x_mid = (small_phantom.shape[3] - 1) / 2
    for name, sign in (("Lung_L", 1), ("Lung_R", -1), ("GTVp", -1)):
        cx = ndimage.center_of_mass(small_phantom.masks[name][0])[2]
        assert sign * (cx - x_mid) > 5, name
    # the heart sits left of the midline
    assert ndimage.center_of_mass(small_phantom.masks["Heart"][0])[2] > x_mid


def test_tumour_surrounded_by_right_lung(small_phantom: Phantom) -> None:
    for i in range(small_phantom.spec.n_phases):
        gtv = small_phantom.masks["GTVp"][i]
        shell = ndimage.binary_dilation(gtv) & ~gtv
        assert shell.any()
        assert np.all(small_phantom.masks["Lung_R"][i][shell]), f"phase {i}: tumour touches non-lung"


@pytest.mark.parametrize("amplitude", [10.0, 15.0, 20.0])
def test_tumour_moves_by_configured_si_amplitude(amplitude: float) -> None:
    spec = PhantomSpec.small(shape=(40, 64, 64), pixel_spacing=(500 / 64, 500 / 64), slice_thickness=2.5,
                             tumour_amplitude_mm=amplitude, n_phases=10, noise_hu=0.0)
    ph = make_phantom(spec)
    inhale = ph.phase_percents.index(0.0)
    exhale = ph.phase_percents.index(50.0)
    dz = ph.spacing[0]
    z_in = ndimage.center_of_mass(ph.phase(inhale).masks["GTVp"])[0] * dz
    z_ex = ndimage.center_of_mass(ph.phase(exhale).masks["GTVp"])[0] * dz
    assert z_ex - z_in == pytest.approx(amplitude, abs=0.5)  # exhale is superior (+z)
    # the sampled centres follow Lujan's curve exactly
    cz = ph.tumour_centres[:, 2]
    assert cz.max() - cz.min() == pytest.approx(amplitude)
    assert np.argmin(cz) == inhale and np.argmax(cz) == exhale


def test_lujan_curve() -> None:
    assert lujan(0.0) == pytest.approx(1.0)
    assert lujan(50.0) == pytest.approx(0.0)
    assert lujan(25.0, n=1) == pytest.approx(0.5)
    assert lujan(25.0, n=3) == pytest.approx(0.125)  # more time near exhale for larger n


def test_diaphragm_and_lungs_breathe(small_phantom: Phantom) -> None:
    lung = small_phantom.masks["Lung_L"] | small_phantom.masks["Lung_R"]
    vol = lung.sum(axis=(1, 2, 3))
    assert vol[0] > vol[2] * 1.05  # end-inhale lungs larger than end-exhale
    ext = small_phantom.masks["External"].sum(axis=(1, 2, 3))
    assert ext[0] > ext[2]  # anterior chest wall moves out at inhale


def test_itv_is_union_of_gtv(small_phantom: Phantom) -> None:
    union = np.logical_or.reduce(small_phantom.masks["GTVp"], axis=0)
    assert np.array_equal(small_phantom.itv, union)
    assert small_phantom.itv.sum() > small_phantom.masks["GTVp"].sum(axis=(1, 2, 3)).max()


def test_hu_like_ct(small_phantom: Phantom) -> None:
    hu = small_phantom.hu.astype(np.float64)
    m = small_phantom.masks
    assert HU_MIN <= hu.min() and hu.max() <= HU_MAX
    outside = ndimage.binary_erosion(~m["External"][0], iterations=2)
    assert hu[0][outside].mean() == pytest.approx(-1000, abs=15)
    lungs = ndimage.binary_erosion(m["Lung_L"][2] | m["Lung_R"][2], iterations=1)
    assert -900 < hu[2][lungs].mean() < -780
    heart = ndimage.binary_erosion(m["Heart"][2], iterations=1)
    assert hu[2][heart].mean() == pytest.approx(48, abs=10)
    gtv = m["GTVp"][2]
    assert hu[2][gtv].mean() == pytest.approx(30, abs=25)  # small sphere: PSF mixes in some lung
    assert (hu > 300).any()  # spine / ribs
    body = m["External"][2] & ~(m["Lung_L"][2] | m["Lung_R"][2])
    assert (hu[2][body] < -50).mean() > 0.05  # subcutaneous fat


def test_noise_is_gaussian_with_spec_sigma() -> None:
    spec = PhantomSpec.small(n_phases=2, psf_sigma_mm=0.0, noise_hu=20.0)
    noisy = make_phantom(spec).phase(0)
    clean = make_phantom(PhantomSpec.small(n_phases=2, psf_sigma_mm=0.0, noise_hu=0.0)).phase(0)
    inside = ndimage.binary_erosion(clean.masks["Heart"], iterations=1)
    diff = noisy.hu[inside].astype(float) - clean.hu[inside]
    assert diff.std() == pytest.approx(20.0, rel=0.15)
    assert abs(diff.mean()) < 3


def test_deterministic_from_seed() -> None:
    a = make_phantom(PhantomSpec.small(n_phases=2)).phase(1)
    b = make_phantom(PhantomSpec.small(n_phases=2)).phase(1)
    c = make_phantom(PhantomSpec.small(n_phases=2, seed=7)).phase(1)
    assert np.array_equal(a.hu, b.hu)
    assert not np.array_equal(a.hu, c.hu)
    for k in STRUCTURES:
        assert np.array_equal(a.masks[k], c.masks[k])  # the seed only changes the noise


def test_phase_on_demand_matches_materialised(small_phantom: Phantom,
                                              small_phantom_spec: PhantomSpec) -> None:
    fresh = make_phantom(small_phantom_spec)
    ph = fresh.phase(3)
    assert np.array_equal(ph.hu, small_phantom.hu[3])
    assert np.array_equal(fresh.itv, small_phantom.itv)


def test_arms_are_separate_external_components() -> None:
    ph = make_phantom(PhantomSpec.small(n_phases=1, arms=True))
    ext = ph.phase(0).masks["External"][ph.spec.shape[0] // 2]
    _, n = ndimage.label(ext)
    assert n == 3
    without = make_phantom(PhantomSpec.small(n_phases=1)).phase(0).masks["External"][ph.spec.shape[0] // 2]
    assert ndimage.label(without)[1] == 1


@pytest.mark.parametrize("bad", [dict(tumour_amplitude_mm=-1.0), dict(tumour_radius_mm=0.5),
                                 dict(n_phases=0), dict(shape=(0, 96, 96)), dict(noise_hu=-1.0)])
def test_spec_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PhantomSpec.small(**bad)


def test_ground_truth_round_trip(small_phantom: Phantom, tmp_path: Path) -> None:
    npz = save_ground_truth(small_phantom, tmp_path / "gt")
    assert npz == tmp_path / "gt" / "ground_truth.npz"
    gt = load_ground_truth(tmp_path / "gt")
    assert gt.shape == small_phantom.shape
    for k in STRUCTURES:
        assert np.array_equal(gt.masks[k], small_phantom.masks[k])
    assert np.array_equal(gt.itv, small_phantom.itv)
    assert gt.spacing == pytest.approx(small_phantom.spacing)
    assert gt.origin == pytest.approx(small_phantom.origin)
    assert gt.phase_percents == small_phantom.phase_percents
    assert np.allclose(gt.tumour_centres, small_phantom.tumour_centres)
    meta = json.loads((tmp_path / "gt" / "ground_truth.json").read_text())
    assert meta["structures"] == list(STRUCTURES)
    assert meta["tumour"]["amplitude_mm"]["SI"] == small_phantom.spec.tumour_amplitude_mm
    assert meta["end_inhale_phase_percent"] == 0.0 and meta["end_exhale_phase_percent"] == 50.0
    assert meta["seed"] == small_phantom.spec.seed
    assert meta["itv_cc"] > max(meta["volumes_cc"]["GTVp"])
    # the npz is plain arrays: readable without pickle by any numpy
    with np.load(npz, allow_pickle=False) as data:
        assert data["mask_GTVp"].dtype == np.uint8
        assert data["mask_GTVp"].shape[-1] == (small_phantom.shape[3] + 7) // 8


def test_lung_vessels_are_texture_only() -> None:
    kw = dict(n_phases=2, shape=(40, 128, 128), pixel_spacing=(500 / 128, 500 / 128), slice_thickness=2.5,
              noise_hu=0.0, psf_sigma_mm=0.0)
    with_v = make_phantom(PhantomSpec.small(**kw)).phase(0)
    without = make_phantom(PhantomSpec.small(vessels=0, **kw)).phase(0)
    lung = with_v.masks["Lung_L"] | with_v.masks["Lung_R"]
    assert (with_v.hu[lung] > -200).sum() > 50  # blood-density tubes inside the lungs
    assert (without.hu[lung] > -200).sum() == 0
    for k in STRUCTURES:
        assert np.array_equal(with_v.masks[k], without.masks[k])
    outside = ~lung
    assert np.array_equal(with_v.hu[outside], without.hu[outside])


@pytest.mark.parametrize("arms", [False, True])
def test_hu_is_painted_from_the_masks(arms: bool) -> None:
    """Without noise, PSF and vessels every structure has exactly its nominal HU: masks and pixels agree."""
    ph = make_phantom(PhantomSpec.small(n_phases=2, noise_hu=0.0, psf_sigma_mm=0.0, vessels=0, arms=arms))
    for i in range(2):
        p = ph.phase(i)
        assert np.all(p.hu[p.masks["GTVp"]] == HU["tumour"])
        assert np.all(p.hu[p.masks["Heart"]] == HU["heart"])
        lung = p.masks["Lung_L"] | p.masks["Lung_R"]
        assert np.all((p.hu[lung] < -700) & (p.hu[lung] > -1000))
        assert np.all(p.hu[~p.masks["External"]] == HU["air"])
        assert np.all(p.hu[p.masks["External"] & ~lung] > -1000 + 1)

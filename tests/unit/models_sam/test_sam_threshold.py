"""Threshold body (External) and lungs on the product's phantom."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from models.phantom import make_phantom
from models.phantom_spec import PhantomSpec
from models.threshold import threshold_body, threshold_lungs


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(PhantomSpec.sized(rows=128, slices=16, n_phases=2, slice_thickness=5.0, arms=True))


def test_body_keeps_the_arms(phantom) -> None:
    hu = phantom.hu[0]
    body = threshold_body(hu, phantom.spacing)
    truth = phantom.masks["External"][0]
    assert _dice(body, truth) > 0.99
    _, n = ndimage.label(body[8])
    assert n == 3  # torso and both arms: separate components, all body
    x_mid = hu.shape[2] // 2
    cols = np.flatnonzero(body[8].any(axis=0))
    assert cols[0] < x_mid - 40 and cols[-1] > x_mid + 40  # arms reach far beyond the torso on both sides


def test_body_fills_lungs_and_drops_a_couch(phantom) -> None:
    hu = phantom.hu[0].copy()
    truth = phantom.masks["External"][0]
    ys = phantom.origin[1] + phantom.spacing[1] * np.arange(hu.shape[1])
    couch = (ys > 110) & (ys < 122)  # a 12 mm carbon couch top under a foam mattress (air on CT)
    hu[:, couch, 5:-5] = 300
    body = threshold_body(hu, phantom.spacing)
    assert _dice(body, truth) > 0.99 and not (body & ~truth)[:, couch].any()
    kept = threshold_body(hu, phantom.spacing, couch_thickness_mm=0)  # removal off: the couch stays
    assert kept[:, couch].any()
    # lungs (air inside the torso) are inside the body outline
    lungs = phantom.masks["Lung_L"][0] | phantom.masks["Lung_R"][0]
    assert body[lungs].all()


def test_body_per_phase_and_validation(phantom) -> None:
    hu4 = phantom.hu
    out = threshold_body(hu4, phantom.spacing)
    assert out.shape == hu4.shape and out.dtype == bool
    for p in range(hu4.shape[0]):
        assert _dice(out[p], phantom.masks["External"][p]) > 0.99
    with pytest.raises(ValueError, match="spacing"):
        threshold_body(hu4[0], (1.0, 1.0))
    with pytest.raises(ValueError, match="hu_range"):
        threshold_body(hu4[0], phantom.spacing, hu_range=(100.0, -100.0))
    assert not threshold_body(np.full((2, 8, 8), -1000, np.int16), (1.0, 1.0, 1.0)).any()


def test_lungs_left_and_right(phantom) -> None:
    lungs = threshold_lungs(phantom.hu, phantom.spacing)
    for side in ("Lung_L", "Lung_R"):
        assert lungs[side].shape == phantom.hu.shape
        assert _dice(lungs[side], phantom.masks[side]) > 0.97, side
    # patient Left is at larger x index
    assert np.argwhere(lungs["Lung_L"])[:, -1].mean() > np.argwhere(lungs["Lung_R"])[:, -1].mean()


def test_touching_lungs_are_split(phantom) -> None:
    hu = phantom.hu[0].copy()
    bridge = np.zeros(hu.shape, bool)
    x_mid = hu.shape[2] // 2
    bridge[4:12, 50:56, x_mid - 8 : x_mid + 8] = True  # an anterior junction of air joining both lungs
    hu[bridge] = -900
    lungs = threshold_lungs(hu, phantom.spacing)
    assert _dice(lungs["Lung_L"], phantom.masks["Lung_L"][0]) > 0.9
    assert _dice(lungs["Lung_R"], phantom.masks["Lung_R"][0]) > 0.9
    assert not (lungs["Lung_L"] & lungs["Lung_R"]).any()


def test_thin_bridge_to_the_couch_is_cut_when_asked(phantom) -> None:
    hu = phantom.hu[0].copy()
    truth = phantom.masks["External"][0]
    ys = phantom.origin[1] + phantom.spacing[1] * np.arange(hu.shape[1])
    couch = (ys > 125) & (ys < 137)  # 12 mm couch top, 25 mm below the back
    hu[:, couch, 5:-5] = 300
    rows = np.flatnonzero((ys > 95) & (ys <= 125))
    strut_x = hu.shape[2] // 2
    hu[:, rows[0] : rows[-1] + 1, strut_x] = 300  # a 1-pixel strap joining the couch to the back
    attached = threshold_body(hu, phantom.spacing)
    assert attached[:, couch].any()  # joined: one component, not a slab, so it stays without the opening
    cut = threshold_body(hu, phantom.spacing, bridge_mm=phantom.spacing[1] * 1.2)
    assert not cut[:, couch].any()
    assert _dice(cut, truth) > 0.99

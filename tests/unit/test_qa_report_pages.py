"""The QA report (worker/qa_report.py) on the phantom's exact masks: four pages in PDF and PNG, orientation
(patient left on the image right, head up, anterior up), and contours that lie on the true tumour boundary
(a pixel check against the phantom's analytic sphere)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from models.phantom import Phantom  # noqa: E402
from models.phantom_spec import PhantomSpec  # noqa: E402
from models.post.qa import cycle_qa, study_qa  # noqa: E402
from worker.qa_render import draw_plane, render  # noqa: E402
from worker.qa_report import ReportData, extract  # noqa: E402

MAGENTA = "#ff00ff"


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    # 2 mm voxels, 10 mm tumour, 4 phases: fine enough for a pixel check, small enough to be fast
    return Phantom(PhantomSpec.small(n_phases=4, shape=(40, 128, 128), pixel_spacing=(2.0, 2.0),
                                     slice_thickness=2.0, tumour_radius_mm=10.0, vessels=0))


@pytest.fixture(scope="module")
def data(phantom: Phantom) -> ReportData:
    masks = phantom.masks
    itv = masks["GTVp"].any(axis=0)
    qa = study_qa(masks, phantom.spacing, {"ITV": itv}, phase_percents=phantom.phase_percents,
                  envelope_sources={"ITV": "GTVp"})
    cycle_qa(qa, 4, 4)
    return extract("0123456789abcdef", phantom.hu, phantom.spacing, phantom.origin, phantom.phase_percents,
                   masks, {"ITV": itv}, qa, algorithm={"model": "test", "model_version": "1"})


def _axes(plane: Any, colors: dict[str, str]) -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(4, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    draw_plane(ax, plane, colors)
    fig.canvas.draw()
    return fig, ax


def _contour_display_points(ax: Any) -> np.ndarray:
    """Display coordinates of every drawn contour vertex (matplotlib >= 3.8: one ContourSet per call)."""
    from matplotlib.contour import ContourSet

    pts = [path.vertices for cs in ax.collections if isinstance(cs, ContourSet) for path in cs.get_paths()
           if len(path.vertices)]
    return ax.transData.transform(np.concatenate(pts))


def test_four_pages_pdf_and_png(data: ReportData, tmp_path: Path) -> None:
    files = render(data, tmp_path / "report", dpi=40)
    assert [p.name for p in files.pages] == [f"page-{i}.png" for i in range(1, 5)]
    for p in files.pages:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pdf = files.pdf.read_bytes()
    assert pdf.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page\b", pdf)) == 4
    # deterministic bytes (the Encapsulated PDF's UID is reused for the same result)
    again = render(data, tmp_path / "again", dpi=40)
    assert again.pdf.read_bytes() == pdf
    # no patient data anywhere in the names (only the fixed names above)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(
        ["report.pdf", *(f"page-{i}.png" for i in range(1, 5))])


def test_axial_patient_left_on_image_right(data: ReportData) -> None:
    """The tumour and the right lung lie in the patient's right (x < 0): image left; Lung_L: image right."""
    axial = data.phase_views[data.exhale][0]
    assert axial.plane == "axial"
    fig, ax = _axes(axial, {"GTVp": MAGENTA})
    centre_x = ax.transAxes.transform((0.5, 0.5))[0]
    for name, side in (("GTVp", -1), ("Lung_R", -1), ("Lung_L", 1)):
        one = type(axial)(axial.plane, axial.image, axial.u, axial.v, {name: axial.contours[name]})
        _, ax1 = _axes(one, {name: MAGENTA})
        xs = _contour_display_points(ax1)[:, 0]
        assert np.sign(np.mean(xs) - centre_x) == side, name
    # the letters say so too
    letters = {t.get_text(): t.get_position() for t in ax.texts if t.get_text() in "RLAP"}
    assert letters["R"][0] < 0.5 < letters["L"][0] and letters["A"][1] > 0.5 > letters["P"][1]
    # anterior up: the heart (anterior, y < 0) lies in the upper half of the image
    heart = type(axial)(axial.plane, axial.image, axial.u, axial.v, {"Heart": axial.contours["Heart"]})
    _, axh = _axes(heart, {"Heart": MAGENTA})
    assert np.mean(_contour_display_points(axh)[:, 1]) > ax.transAxes.transform((0.5, 0.5))[1]


def test_coronal_head_up(phantom: Phantom, data: ReportData) -> None:
    """The tumour is higher on the image at end-exhale than at end-inhale (it moves up as the patient
    exhales), and a larger z is higher on the image."""
    ys = []
    for p in (data.inhale, data.exhale):
        plane = data.strip[p]
        _, ax = _axes(type(plane)(plane.plane, plane.image, plane.u, plane.v,
                                  {"GTVp": plane.contours["GTVp"]}), {"GTVp": MAGENTA})
        ys.append(float(np.mean(_contour_display_points(ax)[:, 1])))
        lo, hi = ax.transData.transform([(plane.u[0], plane.v[0]), (plane.u[0], plane.v[-1])])
        assert hi[1] > lo[1]  # head up
    assert phantom.tumour_centre(data.exhale)[2] > phantom.tumour_centre(data.inhale)[2]
    assert ys[1] > ys[0]


@pytest.mark.parametrize("which", ["inhale", "exhale"])
def test_coronal_contour_on_true_boundary(phantom: Phantom, data: ReportData, which: str) -> None:
    """Pixel check: the magenta pixels of the drawn coronal contour lie on the phantom's analytic tumour
    boundary (a circle in the coronal plane), within one voxel and the line width."""
    p = getattr(data, which)
    plane = data.strip[p]
    only = type(plane)(plane.plane, plane.image, plane.u, plane.v, {"GTVp": plane.contours["GTVp"]})
    fig, ax = _axes(only, {"GTVp": MAGENTA})
    rgba = np.asarray(fig.canvas.buffer_rgba())  # type: ignore[attr-defined]  # (H, W, 4), row 0 at the top
    hit = (rgba[..., 0] > 200) & (rgba[..., 1] < 80) & (rgba[..., 2] > 200)
    rows, cols = np.nonzero(hit)
    assert rows.size > 50
    h = rgba.shape[0]
    mm = ax.transData.inverted().transform(np.column_stack([cols + 0.5, h - rows - 0.5]))  # (x, z) mm
    cx, cy, cz = phantom.tumour_centre(p)
    y_plane = float(re.search(r"y = (-?[\d.]+)", plane.where).group(1))  # type: ignore[union-attr]
    radius = np.sqrt(phantom.spec.tumour_radius_mm ** 2 - (y_plane - cy) ** 2)
    dist = np.abs(np.hypot(mm[:, 0] - cx, mm[:, 1] - cz) - radius)
    px_mm = abs(ax.transData.inverted().transform([(0, 0), (1, 0)])[1, 0]
                - ax.transData.inverted().transform([(0, 0), (1, 0)])[0, 0])
    tolerance = 2.0 + 2 * px_mm  # one voxel (2 mm) + the drawn line's half width and antialiasing
    assert np.percentile(dist, 95) <= tolerance, (np.percentile(dist, 95), tolerance)
    # and the whole circle is drawn: every 10 degrees has contour pixels nearby
    ang = np.degrees(np.arctan2(mm[:, 1] - cz, mm[:, 0] - cx)) % 360
    assert len(np.unique((ang // 10).astype(int))) == 36


def test_missing_target_still_renders(phantom: Phantom, tmp_path: Path) -> None:
    """A study without a GTV (SAM 3 not configured): the report says so instead of failing."""
    masks = {"External": phantom.masks["External"]}
    qa = study_qa(masks, phantom.spacing, phase_percents=phantom.phase_percents,
                  skipped={"GTVp": "SAM 3 unavailable"})
    d = extract("0123456789abcdef", phantom.hu, phantom.spacing, phantom.origin, phantom.phase_percents,
                masks, {}, qa, skipped={"GTVp": "SAM 3 unavailable"})
    files = render(d, tmp_path, dpi=30)
    assert len(files.pages) == 4

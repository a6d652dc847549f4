"""Time the QA report of a full-size study: 10 phases x 150 slices x 512 x 512 (issue 11: <= 10 s, 2 cores).

Synthetic volume: a body ellipse with lungs, and a 12 mm GTV moving 15 mm SI; External and the lungs are the
same in every phase (broadcast views, so the bench needs ~0.5 GB, not several). Times ``extract`` (taken while
the CT is in memory, on the pipeline's critical path) and ``render`` (after the RTSTRUCT is sent) separately.

    .venv/bin/python -m bench.qa_report [--out DIR] [--dpi 110]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dpi", type=int, default=110)
    args = ap.parse_args()
    from models.post.qa import cycle_qa, study_qa
    from worker.qa_render import render
    from worker.qa_report import extract

    n_ph, nz, ny, nx = 10, 150, 512, 512
    spacing = (2.5, 0.98, 0.98)
    origin = (-250.0, -250.0, -187.5)
    z = origin[2] + spacing[0] * np.arange(nz)
    y = origin[1] + spacing[1] * np.arange(ny)
    x = origin[0] + spacing[2] * np.arange(nx)
    body2d = (x[None, :] / 170) ** 2 + (y[:, None] / 120) ** 2 <= 1
    lung_r2d = ((x[None, :] + 80) / 60) ** 2 + ((y[:, None]) / 80) ** 2 <= 1
    lung_l2d = ((x[None, :] - 80) / 60) ** 2 + ((y[:, None]) / 80) ** 2 <= 1
    ct = np.where(body2d, 40, -1000).astype(np.int16)
    ct[lung_r2d | lung_l2d] = -800
    one = np.broadcast_to(ct, (nz, ny, nx))
    hu = np.broadcast_to(one, (n_ph, nz, ny, nx))
    body = np.broadcast_to(body2d, (n_ph, nz, ny, nx))
    lung_l = np.broadcast_to(lung_l2d, (n_ph, nz, ny, nx))
    lung_r = np.broadcast_to(lung_r2d, (n_ph, nz, ny, nx))
    gtv = np.zeros((n_ph, nz, ny, nx), dtype=bool)
    pct = [10.0 * i for i in range(n_ph)]
    for p, c in enumerate(pct):
        zc = -15.0 * np.cos(np.pi * c / 100) ** 4  # end-inhale (0 %) 15 mm inferior
        sl = slice(np.searchsorted(z, zc - 13), np.searchsorted(z, zc + 13))
        d = (z[sl, None, None] - zc) ** 2 + (y[None, :, None] - 30) ** 2 + (x[None, None, :] + 80) ** 2
        gtv[p, sl] = d <= 144
    masks = {"External": body, "Lung_L": lung_l, "Lung_R": lung_r, "GTVp": gtv}
    itv = gtv.any(axis=0)
    t0 = time.perf_counter()
    qa = study_qa(masks, spacing, {"ITV": itv}, phase_percents=pct, envelope_sources={"ITV": "GTVp"})
    cycle_qa(qa, 10, 10)
    t_qa = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = extract("benchbenchbench0", hu, spacing, origin, pct, masks, {"ITV": itv}, qa,
                   reference=("AVG", one))
    t_extract = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        t0 = time.perf_counter()
        files = render(data, out, dpi=args.dpi)
        t_render = time.perf_counter() - t0
    print(f"10 x 150 x 512 x 512: qa numbers {t_qa:.2f} s (the engine's, not the report's), "
          f"extract {t_extract:.2f} s, render {t_render:.2f} s "
          f"({len(files.pages)} pages + PDF, {args.dpi} dpi)")


if __name__ == "__main__":
    main()

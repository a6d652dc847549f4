"""Shared fixtures: the synthetic 4DCT phantom (models/phantom.py, service/dicomio/phantom_dicom.py).

- ``small_phantom_spec``: ``PhantomSpec.small()`` (4 phases x 24 slices x 96 x 96, 5.2 mm pixels,
  5 mm slices).
- ``small_phantom``: that phantom, every phase materialised (``.hu``, ``.masks``, ``.itv``). Read-only
  (arrays are flagged non-writeable).
- ``phantom_dicom_factory(vendor="siemens", with_avg=False, with_mip=False, with_extra_ct=False,
  uid_seed=None, **spec_overrides) -> PhantomSeries``: writes ``<tmp>/dicom`` + ``<tmp>/ground_truth``
  once per option set (session cache) from ``PhantomSpec.small(**spec_overrides)``;
  ``.ground_truth_dir`` points at the truth. The files are shared: copy them before changing anything.
- ``small_phantom_dicom``: the siemens-style small phantom with AVG and MIP.

Imports are lazy so that collecting tests never loads numpy/pydicom for modules that do not use
these fixtures.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from models.phantom import Phantom
    from models.phantom_spec import PhantomSpec
    from service.dicomio.phantom_dicom import PhantomSeries


@pytest.fixture(scope="session")
def small_phantom_spec() -> PhantomSpec:
    from models.phantom_spec import PhantomSpec

    return PhantomSpec.small()


@pytest.fixture(scope="session")
def small_phantom(small_phantom_spec: PhantomSpec) -> Phantom:
    from models.phantom import make_phantom

    phantom = make_phantom(small_phantom_spec)
    phantom.hu  # noqa: B018 - materialise every phase once for the session
    for arr in [phantom.hu, *phantom.masks.values()]:
        arr.flags.writeable = False
    return phantom


@pytest.fixture(scope="session")
def phantom_dicom_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., PhantomSeries]:
    cache: dict[str, PhantomSeries] = {}

    def factory(vendor: str = "siemens", with_avg: bool = False, with_mip: bool = False,
                with_extra_ct: bool | str = False, uid_seed: str | None = None,
                **spec_overrides: Any) -> PhantomSeries:
        from itvnode.commands.phantom import write_phantom
        from models.phantom_spec import PhantomSpec

        spec = PhantomSpec.small(**spec_overrides)
        key = json.dumps([vendor, with_avg, with_mip, with_extra_ct, uid_seed, spec.digest()])
        if key not in cache:
            out: Path = tmp_path_factory.mktemp(f"phantom_{vendor}")
            cache[key] = write_phantom(out, spec, vendor=vendor, with_avg=with_avg, with_mip=with_mip,
                                       with_extra_ct=with_extra_ct, uid_seed=uid_seed)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def small_phantom_dicom(phantom_dicom_factory: Callable[..., PhantomSeries]) -> PhantomSeries:
    return phantom_dicom_factory("siemens", with_avg=True, with_mip=True)

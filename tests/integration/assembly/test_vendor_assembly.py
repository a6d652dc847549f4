"""Vendor naming through the real spool and assembler: amplitude-binned Siemens, GE and Canon phantoms are
complete in breathing order; a 4D set whose naming no rule knows is held with the descriptions seen."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from service.intake.assembler import Assembler
from service.intake.phases import compile_rules
from service.setting_values import PhaseRule
from service.store.header_scan import meta_from_bytes
from service.store.manifest import iter_manifests
from service.store.spool import Spool


def _assemble(data_dir: Path, files: list[Path], expected: int, rules: list[PhaseRule] | None = None) -> Any:
    spool = Spool(data_dir / "spool", fsync=False)
    try:
        for f in files:
            encoded = f.read_bytes()
            spool.store(meta_from_bytes(encoded), encoded)
        Assembler(spool, data_dir, None, quiet_period=0.0, expected_phases=expected, settle=0.0,
                  site_rules=compile_rules(rules or [])).poll_once(time.time() + 1.0)
    finally:
        spool.close()
    ((_, m),) = list(iter_manifests(data_dir))
    return m


def test_siemens_amplitude_phantom_is_complete_in_breathing_order(
        tmp_path: Path, phantom_dicom_factory: Callable[..., Any]) -> None:
    series = phantom_dicom_factory("siemens-amplitude", n_phases=4, sampling="amplitude", with_avg=True)
    assert [" ".join(s.description.split()[-2:]) for s in series.phases] == ["0% In", "50% In", "100% In",
                                                                             "50% Ex"]
    m = _assemble(tmp_path / "data", series.all_files(), expected=4)
    assert m.state == "complete", m.reason
    assert [p.label for p in m.phases] == ["In0", "In50", "In100", "Ex50"]
    assert [p.percent for p in m.phases] == [0.0, 25.0, 50.0, 75.0]
    assert [p.series_instance_uid for p in m.phases] == [s.series_instance_uid for s in series.phases]


@pytest.mark.parametrize("vendor", ["ge", "canon"])
def test_ge_and_canon_phantoms_are_complete(tmp_path: Path, phantom_dicom_factory: Callable[..., Any],
                                            vendor: str) -> None:
    series = phantom_dicom_factory(vendor)
    m = _assemble(tmp_path / "data", series.all_files(), expected=4)
    assert m.state == "complete", m.reason
    assert [p.percent for p in m.phases] == [0.0, 25.0, 50.0, 75.0]
    assert [p.label for p in m.phases] == ["P0", "P25", "P50", "P75"]


def _relabel(series: Any, out: Path, describe: Callable[[int], str]) -> list[Path]:
    files = []
    for i, s in enumerate(series.phases):
        for f in s.files:
            ds = pydicom.dcmread(f)
            ds.SeriesDescription = describe(i)
            ds.ImageComments = ""
            target = out / f"{i}_{f.name}"
            ds.save_as(target, enforce_file_format=True)
            files.append(target)
    return files


def test_unknown_naming_is_held_with_the_descriptions_then_a_site_rule_completes_it(
        tmp_path: Path, phantom_dicom_factory: Callable[..., Any]) -> None:
    series = phantom_dicom_factory("siemens")
    (tmp_path / "in").mkdir()
    files = _relabel(series, tmp_path / "in", lambda i: f"Thorax 4D bin {chr(65 + i)}  Br40")
    m = _assemble(tmp_path / "data", files, expected=4)
    assert m.state == "held"
    assert "no respiratory phase recognised" in m.reason and "phase_rules" in m.reason
    assert "'Thorax 4D bin A Br40'" in m.reason and "'Thorax 4D bin D Br40'" in m.reason
    assert "PHANTOM" not in m.reason and series.patient_id not in m.reason

    rule = PhaseRule(pattern=r"bin (?P<pct>[A-D])")  # letters are not numbers: still no phase
    m = _assemble(tmp_path / "data2", files, expected=4, rules=[rule])
    assert m.state == "held"
    files2 = _relabel(series, tmp_path / "in", lambda i: f"Thorax 4D bin {25 * i}  Br40")
    m = _assemble(tmp_path / "data3", files2, expected=4,
                  rules=[PhaseRule(pattern=r"bin (?P<pct>\d+)")])
    assert m.state == "complete", m.reason
    assert [p.percent for p in m.phases] == [0.0, 25.0, 50.0, 75.0]

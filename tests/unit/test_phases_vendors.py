"""Every vendor's 4DCT naming through the rule table and the set-level ordering
(service.intake.phases.order_phases):
Siemens phase and amplitude binning, Philips, GE, Canon/Toshiba, ``Phase N`` indices, site rules, and the
ambiguous sets that must be held with a reason."""

from __future__ import annotations

import pytest

from service.intake.phases import (
    SeriesClass,
    SeriesKind,
    classify_series,
    compile_rules,
    descriptions_seen,
    order_phases,
)
from service.setting_values import PhaseRule
from service.store.instance_meta import InstanceMeta


def header(description: str) -> InstanceMeta:
    return InstanceMeta(
        sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid="1.2.3", series_instance_uid="1.2.3.1",
        frame_of_reference_uid="1.2.3.9", modality="CT", series_description=description,
        protocol_name="", image_comments="", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        series_number=1, instance_number=1, image_position=(0.0, 0.0, 0.0),
        image_orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), nominal_phase_percent=None, rows=64, columns=64,
        number_of_frames=None,
    )


def classes(*descriptions: str, rules: object = ()) -> list[SeriesClass]:
    return [classify_series(header(d), rules) for d in descriptions]  # type: ignore[arg-type]


def ordered(descriptions: list[str], expected: int | None = None) -> tuple[list[tuple[str, float, str]], str,
                                                                            list[str]]:
    order = order_phases(classes(*descriptions), expected)
    return ([(descriptions[i], c.percent or 0.0, c.roi_label) for i, c in order.ordered], order.binning,
            order.problems)


SIEMENS_AMPLITUDE = [f"RespCT 3.0 B30f {a}% In" for a in (0, 25, 50, 75, 100)] + [
    f"RespCT 3.0 B30f {a}% Ex" for a in (75, 50, 25)]


def test_siemens_amplitude_binning_in_breathing_order() -> None:
    shuffled = SIEMENS_AMPLITUDE[3:] + SIEMENS_AMPLITUDE[:3]
    got, binning, problems = ordered(shuffled)
    assert binning == "amplitude" and problems == []
    assert [lab for _, _, lab in got] == ["In0", "In25", "In50", "In75", "In100", "Ex75", "Ex50", "Ex25"]
    # cycle positions on a regular grid: inhale NN/2, exhale 100 - NN/2
    assert [p for _, p, _ in got] == [0, 12.5, 25, 37.5, 50, 62.5, 75, 87.5]


def test_siemens_amplitude_with_both_endpoints_keeps_both_labels() -> None:
    got, binning, problems = ordered([*SIEMENS_AMPLITUDE, "RespCT 3.0 B30f 0% Ex"])
    assert binning == "amplitude" and problems == []
    assert got[0][2] == "In0" and got[-1][2] == "Ex0"  # inhale 0..100, exhale 100..0
    assert got[-1][1] == 0.0  # the same breathing state as 0% In (counted once toward expected_phases)


@pytest.mark.parametrize("labels", [
    ["0% In", "25% In"],  # 25 % inhaling contradicts phase binning
    ["50% In", "50% Ex"],  # one percentage twice
    ["0% In", "100% In"],  # 100 % is an amplitude
])
def test_amplitude_is_recognised_from_few_labels(labels: list[str]) -> None:
    _, binning, problems = ordered([f"RespCT 3.0 B30f {lab}" for lab in labels])
    assert binning == "amplitude" and problems == []


def test_siemens_phase_binning_with_half_cycle_marks_stays_phase() -> None:
    descs = ["RespCT  3.0  B30f  0% In"] + [f"RespCT  3.0  B30f  {p}% Ex" for p in (10, 20, 30, 40, 50)] + [
        f"RespCT  3.0  B30f  {p}% In" for p in (60, 70, 80, 90)]
    got, binning, problems = ordered(descs)
    assert binning == "phase" and problems == []
    assert [p for _, p, _ in got] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert got[3][2] == "P30"


@pytest.mark.parametrize(("descs", "percents"), [
    (["P4^P100^S300^I00008, Gated, 50.0%A", "P4^P100^S300^I00008, Gated, 0.0%A"], [0, 50]),  # Philips / TCIA
    (["Phase 10%", "Phase 0%", "Phase 20%"], [0, 10, 20]),  # GE Advantage 4D
    (["4D  50%  FC13", "4D  0%  FC13"], [0, 50]),  # Canon / Toshiba (assumed)
    (["RESP 30%", "Resp 60%"], [30, 60]),
    (["20% Phase", "70% Phase"], [20, 70]),
    (["Phase 0", "Phase 10", "Phase 20", "Phase 90"], [0, 10, 20, 90]),  # GE 'Phase NN': percents
])
def test_vendor_percent_styles(descs: list[str], percents: list[float]) -> None:
    got, binning, problems = ordered(descs)
    assert problems == [] and binning == "phase"
    assert [p for _, p, _ in got] == percents
    assert all(lab == f"P{p:g}" for _, p, lab in got)


def test_phase_index_naming_from_one_and_from_zero() -> None:
    got, _, problems = ordered([f"Phase {i}" for i in range(1, 11)], expected=10)
    assert problems == [] and [p for _, p, _ in got] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    got, _, problems = ordered([f"4D Phase {i}" for i in range(0, 8)], expected=None)
    assert problems == [] and [p for _, p, _ in got] == [0, 12.5, 25, 37.5, 50, 62.5, 75, 87.5]


def test_phase_index_beyond_the_cycle_is_held() -> None:
    _, _, problems = ordered(["Phase 1", "Phase 2", "Phase 17"], expected=10)
    assert problems and "neither percents nor indices" in problems[0]


def test_mixed_naming_is_held_with_the_labels() -> None:
    _, binning, problems = ordered(["RespCT 3.0 B30f 25% In", "Phase 50%", "RespCT 3.0 B30f 75% Ex"])
    assert binning == "mixed" and "mix" in problems[0] and "Phase 50%" in problems[0]


def test_duplicate_label_is_held() -> None:
    _, _, problems = ordered(["RespCT 3.0 B30f 50% Ex", "RespCT 3.0 B30f 50% Ex", "RespCT 3.0 B30f 0% In"])
    assert any("2 series claim phase" in p for p in problems)
    _, _, problems = ordered(["T=50%", "Phase 50%"])
    assert any("2 series claim phase 50%: 'T=50%', 'Phase 50%'" in p for p in problems)


def test_site_rule_with_direction_for_a_local_amplitude_naming() -> None:
    rules = compile_rules([PhaseRule(pattern=r"AMP(?P<pct>\d+)(?P<dir>IN|EX)")])
    cls = classes("4D AMP0IN", "4D AMP50IN", "4D AMP100IN", "4D AMP50EX", rules=rules)
    assert all(c.kind is SeriesKind.PHASE and c.rule == "site[0]" for c in cls)
    order = order_phases(cls)
    assert order.binning == "amplitude" and [c.roi_label for _, c in order.ordered] == [
        "In0", "In50", "In100", "Ex50"]


def test_site_rule_overrides_a_built_in() -> None:
    rules = compile_rules([PhaseRule(pattern=r"Bin (?P<pct>\d+)")])
    (c,) = classes("Phase 5% Bin 40", rules=rules)  # the site says the bin is the phase
    assert c.percent == 40 and c.rule == "site[0]"


def test_descriptions_seen_is_short_and_without_long_numbers() -> None:
    text = descriptions_seen(["Thorax 4D bin A", "Thorax 4D bin A", "Patient 1234567 scan",
                              "x" * 80] + [f"s{i}" for i in range(10)])
    assert "'Thorax 4D bin A'" in text and text.count("Thorax 4D bin A") == 1
    assert "1234567" not in text and "#" in text
    assert "x" * 40 not in text and "…" in text and "more" in text

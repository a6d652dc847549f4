"""The phase rule table on real-world description strings (positive and negative)."""

from __future__ import annotations

import pytest

from service.intake.phases import SeriesKind, SiteRule, classify_series, compile_rules, reference_kind
from service.setting_values import PhaseRule
from service.store.instance_meta import InstanceMeta


def header(description: str = "", *, image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
           nominal: float | None = None, protocol: str = "", comments: str = "",
           series_number: int | None = 1) -> InstanceMeta:
    return InstanceMeta(
        sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid="1.2.3", series_instance_uid="1.2.3.1",
        frame_of_reference_uid="1.2.3.9", modality="CT", series_description=description,
        protocol_name=protocol, image_comments=comments, image_type=image_type,
        series_number=series_number, instance_number=1, image_position=(0.0, 0.0, 0.0),
        image_orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), nominal_phase_percent=nominal, rows=64, columns=64,
        number_of_frames=None,
    )


PHASES = [
    ("RespCT  3.0  B30f  50% Ex", 50.0, "siemens"),
    ("RespCT 3.0 B30f 0% In", 0.0, "siemens"),
    ("RespCT  3.0  B30f  90% Ex", 90.0, "siemens"),
    ("P4^P100^S300^I00008, Gated, 50.0%A", 50.0, "philips"),
    ("P4^P100^S300^I00008, Gated, 0.0%A", 0.0, "philips"),
    ("4DFBCT, Gated, 0.0%A", 0.0, "philips"),
    ("4DFBCT, Gated, 70.0%A  Lung recon", 70.0, "philips"),
    ("Gated,30.0%", 30.0, "philips"),
    ("T=50%", 50.0, "t-equals"),
    ("T = 30 %", 30.0, "t-equals"),
    ("Phase 40%", 40.0, "t-equals"),
    ("CT 4D 70%", 70.0, "canon"),
    ("4DCT 90%", 90.0, "generic"),
    ("Exhale 50%", 50.0, "generic"),
    ("4D 10,0%", 10.0, "canon"),
    ("0%", 0.0, "generic"),
    ("99.5%", 99.5, "generic"),
]


@pytest.mark.parametrize("description,percent,rule", PHASES)
def test_phase_descriptions(description: str, percent: float, rule: str) -> None:
    c = classify_series(header(description))
    assert c.kind is SeriesKind.PHASE, c
    assert c.percent == percent
    assert c.rule == rule


REFERENCES = [
    ("AVG", "AVG"), ("Ave-IP 0-90%", "AVG"), ("AveIP", "AVG"), ("AIP", "AVG"), ("Average CT", "AVG"),
    ("Avg 4DCT 0%-90%", "AVG"), ("MIP", "MIP"), ("mip 0%-90%", "MIP"), ("MaxIP", "MIP"), ("Max-IP", "MIP"),
    ("MinIP", "MinIP"), ("Min-IP lung", "MinIP"), ("RespCT 3.0 B30f MIP", "MIP"),
    ("4DFBCT, Gated, AVG", "AVG"),
]


@pytest.mark.parametrize("description,kind", REFERENCES)
def test_reference_descriptions(description: str, kind: str) -> None:
    c = classify_series(header(description))
    assert c.kind is SeriesKind.REFERENCE, c
    assert c.reference == kind


@pytest.mark.parametrize("value,kind", [("AVERAGE", "AVG"), ("MIP", "MIP"), ("MINIP", "MinIP")])
def test_reference_from_image_type(value: str, kind: str) -> None:
    c = classify_series(header("Thorax 4D", image_type=("DERIVED", "SECONDARY", value)))
    assert c.kind is SeriesKind.REFERENCE and c.reference == kind


def test_derived_alone_is_not_a_reference() -> None:
    c = classify_series(header("RespCT 3.0 B30f 20% In", image_type=("DERIVED", "PRIMARY", "AXIAL")))
    assert c.kind is SeriesKind.PHASE and c.percent == 20.0


NOT_PHASES = [
    "Thorax 3.0 B31f",  # plain CT of the same study
    "4D 0%-90%",  # a range
    "0-90%",
    "50% 75%",  # two percentages
    "100%",  # 100 % is 0 % of the next cycle: not a phase percent
    "Gated, 100.0%A",
    "Lung 40% ASiR",  # GE iterative reconstruction strength
    "ASIR-V 50%",
    "Chest iDose4 30%",
    "Low Dose 50%",
    "Abdomen",
    "",
]


@pytest.mark.parametrize("description", NOT_PHASES)
def test_not_phases(description: str) -> None:
    c = classify_series(header(description))
    assert c.kind is SeriesKind.OTHER, c
    assert c.percent is None


def test_series_number_is_never_used() -> None:
    # TCIA 4D-Lung: every phase is SeriesNumber 1; a plain CT numbered 50 is still no phase
    assert classify_series(header("Thorax", series_number=50)).kind is SeriesKind.OTHER
    a = classify_series(header("4DFBCT, Gated, 10.0%A", series_number=1))
    b = classify_series(header("4DFBCT, Gated, 60.0%A", series_number=1))
    assert (a.percent, b.percent) == (10.0, 60.0)


def test_nominal_percentage_tag_wins() -> None:
    c = classify_series(header("RespCT 3.0 B30f 50% Ex", nominal=20.0))
    assert c.kind is SeriesKind.PHASE and c.percent == 20.0 and c.rule == "(0020,9245)"
    c = classify_series(header("AVG", nominal=30.0))
    assert c.percent == 30.0
    assert classify_series(header("x", nominal=100.0)).kind is SeriesKind.OTHER


def test_site_rules_override_builtins() -> None:
    rules = compile_rules([PhaseRule(pattern=r"BIN(?P<pct>\d+)", field="SeriesDescription"),
                           PhaseRule(pattern=r"resp=(?P<pct>\d+)", field="ImageComments")])
    assert all(isinstance(r, SiteRule) for r in rules)
    c = classify_series(header("Lung BIN30 50%"), rules)  # the built-in generic rule would say 50
    assert c.percent == 30.0 and c.rule == "site[0]"
    c = classify_series(header("MIP", comments="resp=60"), rules)  # the site rule beats the reference rule
    assert c.kind is SeriesKind.PHASE and c.percent == 60.0 and c.rule == "site[1]"
    assert classify_series(header("BIN100"), rules).kind is SeriesKind.OTHER
    # no site match: built-ins apply
    assert classify_series(header("RespCT 3.0 B30f 40% Ex"), rules).percent == 40.0


def test_site_rule_needs_pct_group() -> None:
    class Raw:
        pattern = r"BIN(\d+)"
        field = "SeriesDescription"

    with pytest.raises(ValueError, match="pct"):
        compile_rules([Raw()])


def test_reference_kind_function() -> None:
    assert reference_kind("MIP", ()) == "MIP"
    assert reference_kind("Thorax", ("ORIGINAL", "PRIMARY", "AXIAL")) is None
    assert reference_kind("Thorax", ("DERIVED", "SECONDARY", "MINIP")) == "MinIP"

"""Cycle coverage (service.intake.phases.cycle_coverage): which phase sets cover the breathing cycle."""

from __future__ import annotations

import pytest

from service.intake.phases import cycle_coverage


def test_three_of_ten_names_the_missing_percents() -> None:
    c = cycle_coverage([0.0, 30.0, 60.0], 10)
    assert not c.complete
    assert (c.used, c.expected) == (3, 10)
    assert c.missing == [10.0, 20.0, 40.0, 50.0, 70.0, 80.0, 90.0]
    assert c.describe() == "3 of 10 phases: 10 %, 20 %, 40 %, 50 %, 70 %, 80 %, 90 % missing"


def test_gap_in_the_percent_sequence() -> None:
    c = cycle_coverage([p for p in range(0, 100, 10) if p != 40], 10)
    assert c.missing == [40.0] and c.describe() == "9 of 10 phases: 40 % missing"
    assert not c.complete


def test_end_of_cycle_missing_is_a_gap_too() -> None:
    c = cycle_coverage(range(0, 90, 10), 10)
    assert c.missing == [90.0] and not c.complete


@pytest.mark.parametrize("labels", [[i * 12.5 for i in range(8)], [0, 12, 25, 37, 50, 62, 75, 87]])
def test_eight_phase_studies_with_expected_eight(labels: list[float]) -> None:
    c = cycle_coverage(labels, 8)
    assert c.complete and c.summary() == "8 of 8 phases"


def test_eight_phases_where_ten_are_expected_is_held() -> None:
    c = cycle_coverage([i * 12.5 for i in range(8)], 10)
    assert not c.complete
    assert c.describe().startswith("8 of 10 phases: the labels lie on a 12.5 % grid (8-phase cycle)")


def test_fewer_than_expected_on_a_coarse_grid() -> None:
    c = cycle_coverage([0, 25, 50, 75], 10)
    assert not c.complete and c.summary() == "4 of 10 phases"
    assert cycle_coverage([0, 25, 50, 75], 4).complete


def test_finer_sampling_than_expected_is_its_own_cycle() -> None:
    assert cycle_coverage(range(0, 100, 5), 10).summary() == "20 of 20 phases"
    assert cycle_coverage(range(0, 100, 5), 10).complete


def test_grid_anchored_at_the_first_label() -> None:
    assert cycle_coverage(range(5, 100, 10), 10).complete
    c = cycle_coverage([5, 15, 25], 10)
    assert c.missing[0] == 35.0 and len(c.missing) == 7


def test_without_expected_phases_the_labels_decide() -> None:
    assert cycle_coverage([0, 25, 50, 75], None).complete
    c = cycle_coverage([0, 30, 60], None)
    assert c.summary() == "3 of 10 phases" and not c.complete
    assert cycle_coverage(range(0, 100, 10), None).complete

"""The README's state table is the code's (service.store.manifest.TRANSITIONS): one table, printed once."""

from __future__ import annotations

from pathlib import Path

from service.store.state import STATES, TRANSITIONS, state_table_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_state_table_is_the_code_table() -> None:
    assert state_table_markdown() in README.read_text()


def test_every_state_has_an_owner_and_a_way_out() -> None:
    assert set(TRANSITIONS) == set(STATES)
    for state, rule in TRANSITIONS.items():
        assert rule.owner and rule.exits, state
        assert set(rule.exits) <= set(STATES), state
        assert set(rule.exits) - {state}, f"{state} has no way out"

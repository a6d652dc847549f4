"""The state table in the README and in docs/architecture.md is the code's (service.store.state)."""

from __future__ import annotations

from pathlib import Path

from service.store.state import STATES, TRANSITIONS, state_table_markdown

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def test_readme_state_table_is_the_code_table() -> None:
    assert state_table_markdown() in README.read_text()


def test_architecture_state_table_is_the_code_table() -> None:
    assert state_table_markdown() in ARCHITECTURE.read_text()


def test_every_state_has_an_owner_and_a_way_out() -> None:
    assert set(TRANSITIONS) == set(STATES)
    for state, rule in TRANSITIONS.items():
        assert rule.owner and rule.exits, state
        assert set(rule.exits) <= set(STATES), state
        assert set(rule.exits) - {state}, f"{state} has no way out"

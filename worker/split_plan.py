"""Whether and how a study is split over several inference workers (worker.study_split runs the split).

A split study's phases are cut into contiguous groups of near-equal size, one Celery task each; with fewer
phases than groups every phase is its own group, and one group (or one phase) is no split at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.store.state import StudyState


def plan_groups(n_phases: int, n_groups: int) -> list[list[int]]:
    """Phase indices ``0 .. n_phases-1`` in ``min(n_groups, n_phases)`` contiguous groups whose sizes differ
    by at most one (the larger ones first)."""
    if n_phases < 1 or n_groups < 1:
        raise ValueError(f"need at least one phase and one group, got {n_phases} and {n_groups}")
    n = min(n_groups, n_phases)
    base, extra = divmod(n_phases, n)
    groups, start = [], 0
    for g in range(n):
        size = base + (1 if g < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


#: ``dispatch(study_key, run id, groups)`` sends the chord (worker.tasks); raises when the broker refuses
Dispatch = Callable[[str, str, list[list[int]]], None]


@dataclass(frozen=True)
class Split:
    """The ``phase_groups`` setting and the function that sends a split study's chord."""

    n_groups: int
    dispatch: Dispatch

    def groups(self, n_phases: int) -> list[list[int]] | None:
        """The phase groups of a study with ``n_phases`` phases, or None when it is not split."""
        if self.n_groups < 2 or n_phases < 2:
            return None
        return plan_groups(n_phases, self.n_groups)


def current_run(m: Any) -> str | None:
    """The run id of the split computation manifest ``m``'s study is in (``results.split.run``, the task id
    of the ``itvnode.segment_study`` that split it), or None: not split, or no longer ``processing``."""
    split = m.results.get("split") or {}
    return str(split.get("run")) if m.state == StudyState.PROCESSING and split.get("run") else None

"""The study state machine: the states (:class:`StudyState`) and the one table of legal transitions.

Only :func:`service.store.manifest.set_state` changes a study's state, and it asks :func:`check_transition`
first. The README's state table is generated from :data:`TRANSITIONS` (tests/unit/test_state_table.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class StudyState(StrEnum):
    """A study's state. A ``str``: manifests store the value, and ``StudyState.DONE == "done"``."""

    COLLECTING = "collecting"
    HELD = "held"
    COMPLETE = "complete"
    QUEUED = "queued"
    PROCESSING = "processing"
    EXPORTING = "exporting"
    DONE = "done"
    FAILED = "failed"


STATES: tuple[StudyState, ...] = tuple(StudyState)
#: states in which a job exists or existed for the current content
IN_FLIGHT: frozenset[StudyState] = frozenset({StudyState.QUEUED, StudyState.PROCESSING, StudyState.EXPORTING})
FINISHED: frozenset[StudyState] = frozenset({StudyState.DONE, StudyState.FAILED})
#: the only states retention and ``itvnode purge`` may remove (``service.ops.retention``)
PURGEABLE: frozenset[StudyState] = FINISHED


@dataclass(frozen=True)
class StateRule:
    """One row of the state machine: what the state means, who owns a study in it, and the ways out."""

    meaning: str
    owner: str
    exits: dict[StudyState, str]  # next state -> who moves it there, and when


_S = StudyState

#: THE study state machine (README "Study states" prints it; tests/unit/test_state_table.py checks the README
#: against it). :func:`check_transition` refuses any transition that is not listed here.
TRANSITIONS: dict[StudyState, StateRule] = {
    _S.COLLECTING: StateRule(
        "instances arriving; quiet period not over", "assembler (itvnode serve)",
        {_S.COMPLETE: "assembler: all phases, or quiet period over with a valid 4D set",
         _S.HELD: "assembler: quiet period over and the result would be unsafe (reason)",
         _S.COLLECTING: "assembler: more instances"}),
    _S.HELD: StateRule(
        "unsafe to process (missing phases, mixed frames, ambiguous labels); waits for a person", "admin",
        {_S.COMPLETE: "itvnode release", _S.COLLECTING: "assembler: new instances",
         _S.HELD: "assembler: re-assessed, still unsafe"}),
    _S.COMPLETE: StateRule(
        "assembled, about to be queued", "assembler",
        {_S.QUEUED: "assembler: message sent (broker down: stays, retried with backoff)",
         _S.COLLECTING: "assembler: content changed", _S.HELD: "assembler: content changed, now unsafe",
         _S.COMPLETE: "assembler: enqueue failed, reason updated",
         _S.PROCESSING: "inference worker (took the message before `queued` was written)"}),
    _S.QUEUED: StateRule(
        "a message is in the broker, or a retry is scheduled (results.retry_at)", "broker + reconciler",
        {_S.PROCESSING: "inference worker takes it",
         _S.QUEUED: "reconciler: message lost, or the scheduled retry is sent",
         _S.FAILED: "reconciler: retries used up (reason)",
         _S.EXPORTING: "inference worker: finished a job the reconciler had re-queued (heartbeat late)",
         _S.DONE: "inference worker: the same, no destinations"}),
    _S.PROCESSING: StateRule(
        "an inference worker runs it (heartbeat every heartbeat_interval)", "inference worker",
        {_S.EXPORTING: "worker: RTSTRUCT in the outbox", _S.DONE: "worker: no destinations",
         _S.FAILED: "worker: bad input (reason), or retries used up",
         _S.QUEUED: "transient failure (time limit, worker lost, model/broker/disk error): retry with "
                    "backoff by the worker, the reconciler (no heartbeat, past the hard time limit) or a "
                    "restarted worker",
         _S.PROCESSING: "inference worker: the message was delivered again"}),
    _S.EXPORTING: StateRule(
        "RTSTRUCT in the outbox, C-STORE to each destination with retries", "export worker",
        {_S.DONE: "every destination has it",
         _S.FAILED: "a destination gave up (dead letter, reason)",
         _S.EXPORTING: "an attempt failed, retrying (reason)",
         _S.PROCESSING: "inference worker: asked again and the kept result is gone: computed again"}),
    _S.DONE: StateRule(
        "every destination has the RTSTRUCT (or none configured)", "nobody: finished; retention purges it",
        {_S.EXPORTING: "itvnode resend", _S.COLLECTING: "assembler: changed content arrives",
         _S.COMPLETE: "itvnode retry", _S.DONE: "export worker: note updated",
         _S.FAILED: "export worker: a destination of a later delivery gave up (dead letter, reason)",
         _S.HELD: "assembler: changed content arrives and its assembly fails (reason)",
         _S.PROCESSING: "inference worker: asked again and the kept result is gone: computed again"}),
    _S.FAILED: StateRule(
        "gave up, the reason says why", "admin; retention purges it",
        {_S.COMPLETE: "itvnode retry", _S.EXPORTING: "itvnode resend (result kept)",
         _S.COLLECTING: "assembler: changed content arrives", _S.FAILED: "export worker: reason updated",
         _S.PROCESSING: "inference worker: a late duplicate message",
         _S.DONE: "inference worker (no destinations) or export worker: finished after the study had "
                 "failed meanwhile",
         _S.HELD: "assembler: changed content arrives and its assembly fails (reason)"}),
}


class IllegalTransition(ValueError):
    """A state change that the table does not list: a defect in the caller, never a user error."""


def check_transition(study_key: str, old: StudyState | str | None, new: StudyState | str) -> StudyState:
    """``new`` as a :class:`StudyState` when ``old -> new`` is in the table (``old`` None: a new study);
    :class:`IllegalTransition` otherwise."""
    try:
        to = StudyState(new)
    except ValueError:
        raise IllegalTransition(f"unknown study state {new!r}") from None
    if old is not None and to not in TRANSITIONS[StudyState(old)].exits:
        raise IllegalTransition(f"study key {study_key}: {old} -> {to} is not in the state table")
    return to


def state_table_markdown() -> str:
    """The state machine as the Markdown table the README shows (one row per state)."""
    lines = ["| state | meaning | owner | ways out |", "|---|---|---|---|"]
    for state, rule in TRANSITIONS.items():
        exits = "; ".join(f"→ `{to}`: {why}" for to, why in rule.exits.items())
        lines.append(f"| `{state}` | {rule.meaning} | {rule.owner} | {exits} |")
    return "\n".join(lines)

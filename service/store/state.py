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
    exits: dict[str, str]  # next state -> who moves it there, and when


#: THE study state machine (README "Operating the node" prints it; tests/unit/test_state_table.py checks the
#: README against it). :func:`check_transition` refuses any transition that is not listed here.
TRANSITIONS: dict[StudyState, StateRule] = {
    StudyState.COLLECTING: StateRule(
        "instances arriving; quiet period not over", "assembler (itvnode serve)",
        {"complete": "assembler: all phases, or quiet period over with a valid 4D set",
         "held": "assembler: quiet period over and the result would be unsafe (reason)",
         "collecting": "assembler: more instances"}),
    StudyState.HELD: StateRule(
        "unsafe to process (missing phases, mixed frames, ambiguous labels); waits for a person", "admin",
        {"complete": "itvnode release", "collecting": "assembler: new instances",
         "held": "assembler: re-assessed, still unsafe"}),
    StudyState.COMPLETE: StateRule(
        "assembled, about to be queued", "assembler",
        {"queued": "assembler: message sent (broker down: stays, retried with backoff)",
         "collecting": "assembler: content changed", "held": "assembler: content changed, now unsafe",
         "complete": "assembler: enqueue failed, reason updated",
         "processing": "inference worker (took the message before `queued` was written)"}),
    StudyState.QUEUED: StateRule(
        "a message is in the broker, or a retry is scheduled (results.retry_at)", "broker + reconciler",
        {"processing": "inference worker takes it",
         "queued": "reconciler: message lost, or the scheduled retry is sent",
         "failed": "reconciler: retries used up (reason)"}),
    StudyState.PROCESSING: StateRule(
        "an inference worker runs it (heartbeat every heartbeat_interval)", "inference worker",
        {"exporting": "worker: RTSTRUCT in the outbox", "done": "worker: no destinations",
         "failed": "worker: bad input (reason), or retries used up",
         "queued": "transient failure (time limit, worker lost, model/broker/disk error): retry with backoff "
                   "by the worker, the reconciler (no heartbeat, past the hard time limit) or a restarted "
                   "worker",
         "processing": "inference worker: the message was delivered again"}),
    StudyState.EXPORTING: StateRule(
        "RTSTRUCT in the outbox, C-STORE to each destination with retries", "export worker",
        {"done": "every destination has it", "failed": "a destination gave up (dead letter, reason)",
         "exporting": "an attempt failed, retrying (reason)"}),
    StudyState.DONE: StateRule(
        "every destination has the RTSTRUCT (or none configured)", "nobody: finished; retention purges it",
        {"exporting": "itvnode resend", "collecting": "assembler: changed content arrives",
         "complete": "itvnode retry", "done": "export worker: note updated"}),
    StudyState.FAILED: StateRule(
        "gave up, the reason says why", "admin; retention purges it",
        {"complete": "itvnode retry", "exporting": "itvnode resend (result kept)",
         "collecting": "assembler: changed content arrives", "failed": "export worker: reason updated",
         "processing": "inference worker: a late duplicate message"}),
}


class IllegalTransition(ValueError):
    """A state change that the table does not list: a defect in the caller, never a user error."""


def check_transition(study_key: str, old: StudyState | str | None, new: StudyState | str) -> StudyState:
    """``new`` as a :class:`StudyState` when ``old -> new`` is in the table (``old`` None: a new study)."""
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

"""Handing result files to the outbox (service.store.outbox), queueing their export, and mirroring the
outbox's delivery state into the study's manifest (``exporting`` -> ``done`` | ``failed``)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from service.setting_values import Destination
from service.store.layout import DataLayout
from service.store.manifest import Manifest, load_manifest, manifest_path, set_state
from service.store.outbox import Outbox
from service.store.state import StudyState
from worker.study_inputs import change_manifest

log = logging.getLogger(__name__)

EnqueueExport = Callable[[str], Any]
#: states in which a study's result has been handed to the outbox: the outbox's delivery state decides
DELIVERY_STATES: frozenset[StudyState] = frozenset({StudyState.EXPORTING, StudyState.DONE, StudyState.FAILED})


def to_outbox(
    outbox: Outbox, files: Sequence[Path], destinations: Sequence[Destination], study_key: str
) -> list[str]:
    if not destinations or not files:
        return []
    item = outbox.put(list(files), list(destinations), study_key=study_key)
    if item.finished:
        # This exact result was already delivered (e.g. a crash after export, then a re-run): send it again
        # as a new item; the receiver replaces the objects (same SOP Instance UIDs).
        item = outbox.put(
            list(files),
            list(destinations),
            study_key=study_key,
            item_id=f"{item.item_id[:15]}-{uuid.uuid4().hex[:8]}",
        )
    return [item.item_id]


def enqueue_exports(study_key: str, item_ids: Sequence[str], enqueue_export: EnqueueExport | None) -> None:
    if enqueue_export is None:
        return
    for item_id in item_ids:
        try:
            enqueue_export(item_id)
            log.info("study %s: export of outbox item %s enqueued", study_key, item_id)
        except Exception as exc:  # the outbox sweep re-enqueues due items
            log.error(
                "study %s: could not enqueue export of %s (%s); the outbox sweep will retry",
                study_key,
                item_id,
                exc,
            )


def sync_export_state(data_dir: Path, study_key: str, outbox: Outbox | None = None) -> StudyState | None:
    """Mirror the outbox state of a study's items into its manifest: ``done`` once every destination has the
    result, ``failed`` (with the dead-letter reason) when one gave up, else ``exporting`` with the last error.

    Called after each export attempt. Returns the new state (None when the study has no manifest or items).
    """
    path = manifest_path(Path(data_dir), study_key)
    if not path.is_file():
        return None
    outbox = outbox or Outbox(DataLayout(data_dir).outbox)
    m = load_manifest(path)
    item_ids = list(m.results.get("items") or [])
    if not item_ids or m.state not in DELIVERY_STATES:
        return None
    states: list[tuple[str, Any]] = []
    for item_id in item_ids:
        item = outbox.find(item_id)
        if item is not None:
            states.extend(item.destinations.items())
    if not states:
        return None
    dead = [(k, st) for k, st in states if st.status == "dead"]
    pending = [(k, st) for k, st in states if st.status == "pending"]
    reason: str | None
    if dead:
        state = StudyState.FAILED
        reason = "export failed: " + "; ".join(
            f"{k}: {st.dead_reason} (dead letter {st.dead_letter})" for k, st in dead
        )
    elif pending:
        state = StudyState.EXPORTING
        errs = [
            f"{k}: attempt {st.attempts} failed ({st.last_error}); retrying"
            for k, st in pending
            if st.last_error
        ]
        reason = "; ".join(errs) or skipped_note(m.results.get("skipped"))
    else:
        state = StudyState.DONE
        reason = skipped_note(m.results.get("skipped"))
    if state == m.state and reason == m.reason:
        return state

    def apply(mm: Manifest) -> None:
        if mm.state in DELIVERY_STATES and (mm.state, mm.reason) != (state, reason):
            set_state(mm, state, reason[:2000] if reason else None)
            if state == StudyState.DONE:
                now = time.time()
                mm.results["delivered_at"] = now
                started = mm.results.get("finished_at")
                if isinstance(started, int | float):
                    mm.results.setdefault("timings", {})["export"] = round(now - started, 4)

    change_manifest(path, apply)
    log.log(
        logging.ERROR if state == StudyState.FAILED else logging.INFO,
        "study %s: %s%s",
        study_key,
        state,
        f" ({reason})" if reason else "",
    )
    return state


def skipped_note(skipped: dict[str, str] | None) -> str | None:
    """The reason text that keeps skipped structures visible in ``itvnode status``."""
    if not skipped:
        return None
    return "skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())

"""Giving up on one destination of an outbox item: the dead letter, ``dead/<item>/<destination>/`` with
``reason.json`` (why, and the command that resends it) and hard links of the files that destination lacks."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from service.store.durable import fsync_dir, private_dir, write_json_atomic
from service.store.outbox_item import ACTIVE, DEAD, DEAD_REASON, OutboxItem, destination_slug, iso

log = logging.getLogger(__name__)


def dead_letter(root: Path, item: OutboxItem, key: str, reason: str, now: float) -> None:
    """Dead-letter one destination: hard links of the files it lacks + reason.json."""
    st = item.destinations[key]
    st.status, st.dead_reason = "dead", reason
    folder = root / DEAD / item.item_id / destination_slug(key)
    private_dir(folder / "files")
    src = root / ACTIVE / item.item_id / "files"
    undelivered = [f for f in item.files if f.sop_instance_uid not in set(st.delivered)]
    for f in undelivered:
        target = folder / "files" / f.name
        if target.exists():
            continue
        try:
            os.link(src / f.name, target)
        except OSError:
            if (src / f.name).exists():
                shutil.copyfile(src / f.name, target)
    fsync_dir(folder / "files")
    write_json_atomic(folder / DEAD_REASON, {
        "item_id": item.item_id,
        "study_key": item.study_key,
        "destination": key,
        "reason": reason,
        "last_error": st.last_error,
        "attempts": st.attempts,
        "created_at": iso(item.created_at),
        "last_attempt_at": iso(st.last_attempt_at),
        "dead_at": iso(now),
        "files_not_delivered": [f.name for f in undelivered],
        "files_delivered": [f.name for f in item.files if f.sop_instance_uid in set(st.delivered)],
        "resend": f"itvnode send {folder / 'files'} --to {key}",
    })
    st.dead_letter = str(folder.relative_to(root))
    log.error("outbox item %s to %s is dead: %s (dead letter %s)", item.item_id, key, reason, folder)

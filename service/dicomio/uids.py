"""Output UIDs: the one rule for every UID the node emits (RTSTRUCT and SEG instances, their series, SEG
tracking UIDs).

A *content key* is a hash over everything that decides what an output contains:

* the study key (StudyInstanceUID + FrameOfReferenceUID),
* the sorted, distinct SOP Instance UIDs of every input instance actually used (phase series and the
  reference series the output references: a late phase or a late AVG changes it), each with its spool
  revision when it was re-sent with changed content under the same UID (a corrected instance changes it),
* the algorithm identity (model, model version, LoRA adapter, itvnode version),
* the layout (``combined`` / ``per-series``),
* a digest of the settings that shape the masks and contours (structures, temporal filter, hole encoding...).

Every output UID is then ``deterministic_uid(uid_root, content_key, <object>, "series"|"instance")``: the same
content gives the same UIDs (a re-send replaces the object at the receiver), different content gives new
UIDs (receivers keep the first copy of a UID, so reusing one for new content would leave the stale copy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import Any

from pydicom.uid import UID, generate_uid

#: EngineConfig fields that cannot change what an output contains (where or how fast it is computed, or
#: what the UIDs are rooted on); every other field is part of the settings digest, so a new setting counts
#: by default (the safe direction: new UIDs rather than a stale copy at the receiver).
NOT_CONTENT: frozenset[str] = frozenset(
    {"sam3_dir", "adapter_dir", "device", "batch_size", "uid_root", "write_seg", "send_qa_report"}
)


#: Nested parameters hashed under the flat names they had before they were grouped (``temporal.min_phases``
#: as ``temporal_min_phases``), so that identical content keeps its UIDs across the regrouping.
FLATTENED: Mapping[str, str] = {"temporal": "temporal_"}

#: Content fields added after outputs were first issued -> the value they had (fixed, unsettable) before.
#: At that value a field is left out of the digest, so a config an older release could express hashes as it
#: did then; any other value changes the UIDs. Pinned here, not read from today's defaults: a changed default
#: is changed content.
ADDED: Mapping[str, Any] = {
    "temporal_centroid_volume_ratio": 0.5,
    "temporal_circular": True,
    "temporal_connectivity": 3,
}


def deterministic_uid(prefix: str | None, *parts: str) -> UID:
    """A UID derived from ``parts`` under ``prefix`` (pydicom's root when None; never a random 2.25 UUID).

    A site's UID root gets its trailing dot added; <= 40 characters leave >= 23 digits of hash.
    """
    if not prefix:
        return generate_uid(entropy_srcs=list(parts))
    if not prefix.endswith("."):
        prefix += "."
    if not re.fullmatch(r"([1-9][0-9]*|0)(\.([1-9][0-9]*|0))*\.", prefix) or len(prefix) > 40:
        raise ValueError(f"UID root {prefix!r}: digits and dots, no leading zeros, at most 40 characters")
    return generate_uid(prefix=prefix, entropy_srcs=list(parts))


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def _content_fields(plain: dict[str, Any], exclude: Iterable[str]) -> dict[str, Any]:
    """The hashed fields of a plain config: ``exclude`` left out, :data:`FLATTENED` groups flattened,
    :data:`ADDED` fields left out at their earlier value."""
    skip = set(exclude)
    out = {k: v for k, v in plain.items() if k not in skip and k not in FLATTENED}
    for group, prefix in FLATTENED.items():
        if isinstance(plain.get(group), dict) and group not in skip:
            out.update({prefix + k: v for k, v in plain[group].items()})
    return {k: v for k, v in out.items() if not (k in ADDED and v == ADDED[k])}


def settings_digest(config: Any, exclude: Iterable[str] = NOT_CONTENT) -> str:
    """sha256 (32 hex digits) of the content-relevant fields of a config (dataclass or mapping)."""
    plain = _plain(config)
    if isinstance(plain, dict):
        plain = _content_fields(plain, exclude)
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def content_key(
    *,
    study_key: str,
    input_sop_instance_uids: Iterable[str],
    algorithm: Sequence[str],
    layout: str,
    settings: str = "",
    revisions: Mapping[str, int] | None = None,
) -> str:
    """The content key (32 hex digits) of one result; see the module docstring for what goes in.

    ``revisions``: SOP Instance UID -> revision of inputs re-sent with changed content under the same UID
    (service.store.spool): a corrected instance is new content, so it must give new UIDs too.
    """
    uids = sorted(set(input_sop_instance_uids))
    if not uids:
        raise ValueError("an output needs at least one input instance")
    revisions = revisions or {}
    h = hashlib.sha256()
    for part in ("itvnode-output/1", study_key, *algorithm, layout, settings):
        h.update(part.encode())
        h.update(b"\x00")
    for uid in uids:
        h.update(uid.encode())
        if revisions.get(uid):
            h.update(f"#{revisions[uid]}".encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def output_uid(prefix: str | None, key: str, *parts: str) -> UID:
    """The UID of one emitted object (``parts``: which object, e.g. ``("combined", "instance")``)."""
    return deterministic_uid(prefix, key, *parts)

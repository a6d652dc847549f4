"""What ``itvnode status`` reports: one row per study, from ``data_dir`` only (manifests + spool index).

It reads files the running node writes atomically (manifests) or through SQLite WAL (spool index), so it
works while ``serve`` and the workers run. Studies in the spool without a manifest have no respiratory phase
series (yet): they show as ``receiving`` within ``quiet_period`` of their last instance, else ``ignored``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.store.layout import DataLayout
from service.store.manifest import Manifest, iter_manifests

NO_MANIFEST_REASON = "no respiratory phase series: not a 4DCT, no job"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def collect_status(data_dir: Path, quiet_period: float = 60.0,
                   now: float | None = None) -> list[dict[str, Any]]:
    """Rows sorted by last update, newest first."""
    data_dir = Path(data_dir)
    now = time.time() if now is None else now
    rows: list[dict[str, Any]] = []
    with_manifest: set[str] = set()
    for _path, m in iter_manifests(data_dir):
        with_manifest.add(m.study_instance_uid)
        updated = m.updated_at or (m.history[-1].at if m.history else None)
        row: dict[str, Any] = {
            "study_key": m.study_key,
            "study_instance_uid": m.study_instance_uid,
            "frame_of_reference_uid": m.frame_of_reference_uid,
            "state": m.state,
            "reason": m.reason,
            "phases": [
                {"percent": p.percent, "series_instance_uid": p.series_instance_uid, "slices": p.slices}
                for p in m.phases],
            "references": [
                {"kind": r.kind, "series_instance_uid": r.series_instance_uid, "slices": len(r.files)}
                for r in m.references],
            "ignored_series": [s.model_dump() for s in m.ignored_series],
            "task_id": m.task_id,
            "updated": updated,
            "notes": [n.model_dump() for n in m.notes],
            # structures the worker could not contour (e.g. no SAM 3 weights), with the reason
            "skipped": dict(m.results.get("skipped") or {}),
            # result versions (a late phase makes a new one, with new UIDs): the newest is "version"
            "version": m.results.get("version"),
            "versions": [
                {k: v.get(k) for k in ("version", "phases", "references", "sop_instance_uids", "at")}
                for v in m.results.get("versions") or [] if isinstance(v, dict)],
            **_cycle_and_qa(m),
        }
        rows.append(row)
    layout = DataLayout(data_dir)
    if layout.spool_index.exists():
        from service.store.spool import Spool

        spool = Spool(layout.spool)
        try:
            for uid in spool.study_uids():
                if uid in with_manifest:
                    continue
                last = spool.last_received(uid) or now
                receiving = now - last < quiet_period
                series = {meta.series_instance_uid for meta, _ in spool.instances(uid)}
                rows.append({
                    "study_key": None,
                    "study_instance_uid": uid,
                    "frame_of_reference_uid": None,
                    "state": "receiving" if receiving else "ignored",
                    "reason": None if receiving else NO_MANIFEST_REASON,
                    "phases": [],
                    "references": [],
                    "series": len(series),
                    "task_id": None,
                    "updated": _iso(last),
                    "notes": [],
                    "skipped": {},
                    "version": None,
                    "versions": [],
                    "phases_used": 0,
                    "phases_expected": None,
                    "cycle": None,
                    "released": None,
                    "warnings": [],
                })
        finally:
            spool.close()
    rows.sort(key=lambda r: r["updated"] or "", reverse=True)
    return rows


def _cycle_and_qa(m: Manifest) -> dict[str, Any]:
    """Phases used vs expected, the release, and the QA warnings (short, no patient data) of one study."""
    qa = m.results.get("qa") or {}
    warnings = list(qa.get("warnings") or [])
    if not qa and m.cycle is not None and not m.cycle.complete:
        warnings = [m.cycle.describe()]  # not processed (yet): the incomplete cycle is the warning
    return {
        "phases_used": m.cycle.used if m.cycle else len(m.phases),
        "phases_expected": m.cycle.expected if m.cycle else None,
        "cycle": None if m.cycle is None else {
            "complete": m.cycle.complete, "summary": m.cycle.summary(), "missing_percents": m.cycle.missing},
        "released": m.released.model_dump() if m.released else None,
        "warnings": warnings,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table for people; reasons are printed in full under their row."""
    if not rows:
        return "no studies"
    head = ("STUDY KEY", "STATE", "VER", "PHASES", "SLICES", "REFS", "UPDATED", "STUDY INSTANCE UID")
    lines = []
    body = []
    for r in rows:
        pcts = ",".join(f"{p['percent']:g}" for p in r["phases"]) or "-"
        slices = sorted({p["slices"] for p in r["phases"]})
        body.append((
            r["study_key"] or "-", r["state"], str(r.get("version") or "-"), pcts,
            "/".join(str(s) for s in slices) or "-",
            ",".join(x["kind"] for x in r["references"]) or "-",
            (r["updated"] or "-")[:19],
            r["study_instance_uid"],
        ))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines.append(fmt.format(*head).rstrip())
    for r, b in zip(rows, body, strict=True):
        lines.append(fmt.format(*b).rstrip())
        if r.get("reason"):
            lines.append(f"    reason: {r['reason']}")
        cycle = r.get("cycle")
        if cycle and (not cycle["complete"] or r.get("released")):
            how = " (released by admin)" if r.get("released") else ""
            lines.append(f"    phases: {cycle['summary']}{how}")
        for w in r.get("warnings") or []:
            lines.append(f"    warning: {w}")
    return "\n".join(lines)


def deliveries(data_dir: Path, study_key: str) -> list[dict[str, Any]]:
    """Every outbox delivery of the study, per item and destination (pending, finished, dead)."""
    from service.store.outbox_item import iso, iter_items

    out: list[dict[str, Any]] = []
    for item in iter_items(DataLayout(data_dir).outbox):
        if item.study_key != study_key:
            continue
        for dest, st in sorted(item.destinations.items()):
            out.append({
                "item_id": item.item_id, "destination": dest, "status": st.status,
                "attempts": st.attempts, "created": iso(item.created_at),
                "delivered_at": iso(st.delivered_at), "last_error": st.last_error,
                "dead_reason": st.dead_reason, "dead_letter": st.dead_letter,
                "next_attempt_at": iso(st.next_attempt_at) if st.status == "pending" else None,
            })
    out.sort(key=lambda d: str(d["created"] or ""))
    return out


def study_detail(data_dir: Path, study: str, quiet_period: float = 60.0) -> list[dict[str, Any]]:
    """``itvnode status STUDY``: each study key's row plus history, timings, QA warnings and deliveries."""
    from service.ops.admin import resolve_study
    from service.store.manifest import load_manifest

    rows = {r["study_key"]: r for r in collect_status(data_dir, quiet_period) if r["study_key"]}
    out = []
    for path in resolve_study(Path(data_dir), study):
        m = load_manifest(path)
        row = dict(rows.get(m.study_key) or {"study_key": m.study_key, "state": m.state})
        row["history"] = [h.model_dump() for h in m.history]
        row["timings"] = dict(m.results.get("timings") or {})
        row["split"] = m.results.get("split")
        row["deliveries"] = deliveries(Path(data_dir), m.study_key)
        out.append(row)
    return out


def format_detail(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        lines.append(f"study key {r['study_key']}  state {r['state']}  study {r.get('study_instance_uid')}")
        if r.get("reason"):
            lines.append(f"  reason: {r['reason']}")
        pcts = ", ".join(f"{p['percent']:g}%" for p in r.get("phases") or [])
        lines.append(f"  phases: {pcts or '-'}")
        lines.append("  history:")
        for h in r["history"]:
            lines.append(f"    {h['at'][:23]}  {h['state']:<10}  {h.get('reason') or ''}".rstrip())
        if r["timings"]:
            lines.append("  timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["timings"].items()
                                                       if isinstance(v, int | float)))
        lines.extend(split_lines(r.get("split")))
        for w in r.get("warnings") or []:
            lines.append(f"  QA warning: {w}")
        for n in r.get("notes") or []:
            lines.append(f"  note {n['at'][:19]}: {n['text']}")
        lines.append("  delivery:" if r["deliveries"] else "  delivery: none")
        for d in r["deliveries"]:
            when = d["delivered_at"] or d["next_attempt_at"] or ""
            why = d["dead_reason"] or d["last_error"] or ""
            lines.append(f"    {d['destination']:<30} {d['status']:<9} attempts {d['attempts']}  {when}  "
                         f"{why}".rstrip())
    return "\n".join(lines)


def split_lines(split: dict[str, Any] | None) -> list[str]:
    """A split study (worker.study_split): its phase groups, which worker ran each, and what the finishing
    task had to compute itself."""
    if not split:
        return []
    groups = split.get("groups") or []
    lines = [f"  split into {len(groups)} phase groups (run {split.get('run')}):"]
    done = {tuple(g.get("phases") or []): g for g in split.get("done") or []}
    for g in groups:
        d = done.get(tuple(g))
        if d is None:
            lines.append(f"    phases {g}: not finished")
            continue
        found = len(g) - len(d.get("computed") or [])
        line = f"    phases {g}: {d.get('worker') or '?'} {float(d.get('wall') or 0):.1f} s"
        line += f", {found} already done" if found else ""
        line += f" ({d['skipped']})" if d.get("skipped") else ""
        lines.append(line)
    if split.get("computed_here"):
        lines.append(f"    computed by the finishing task (no mask file from its group): "
                     f"{split['computed_here']}")
    return lines

"""Prometheus metrics, derived from durable state rather than process memory.

Multiprocess design: the node runs as several processes (SCP, assembler, Celery workers, possibly on
several machines). Instead of per-process counters that would need aggregation, every number here is computed
at scrape time from what the node already persists under ``data_dir`` (spool index, study manifests, outbox)
and from the broker (queue depth). Any process that can see ``data_dir`` and the broker serves the same,
complete numbers: ``itvnode run`` serves them from its supervisor (:mod:`service.ops.http_server`), the
compose file from a small ``monitor`` service. Counters derived this way can go down when retention removes
old studies; Prometheus ``rate()`` treats that as a counter reset. A scrape only reads: it never creates a
file nor takes a write lock.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from service.ops.health import queue_depths, resolve_broker_url
from service.store.layout import DataLayout
from service.store.manifest import iter_manifest_dicts
from service.store.outbox_item import item_counts
from service.store.spool_index import SpoolIndexReader
from service.store.state import STATES, StudyState

log = logging.getLogger(__name__)

#: results.timings keys observed; load, segmenter, phase_cpu (and inference, their sum) overlap in time: busy
#: seconds; overlap_wall is that section's wall time, segmenter_idle the segmenter's (GPU's) wait in it
STAGES = (
    "receive", "quiet", "model", "load", "inference", "filter", "rtstruct", "outbox", "report", "export",
    "segmenter", "phase_cpu", "overlap_wall", "segmenter_idle", "processing",
)
_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)


def _count_instances(layout: DataLayout) -> int | None:
    """Rows of the spool index, read-only so a scrape never takes a write lock."""
    try:
        return SpoolIndexReader(layout.spool_index).count()
    except sqlite3.Error as exc:
        log.warning("metrics: cannot read spool index: %s", exc)
        return None


class _QAMetrics:
    """Phase coverage and QA of each study (the manifest's ``cycle``, ``released`` and ``results.qa``)."""

    def __init__(self) -> None:
        self.phases = GaugeMetricFamily(
            "itvnode_study_phases", "Phases of the breathing cycle per study: used (in the ITV) and expected",
            labels=["study_key", "kind"])
        self.incomplete: dict[str, int] = {}
        self.released = 0
        self.kinds: dict[str, int] = {}
        self.motion = GaugeMetricFamily(
            "itvnode_study_motion_mm", "Peak-to-peak centroid motion of enveloped structures (SI/AP/LR/3D)",
            labels=["study_key", "structure", "axis"])
        self.envelope = GaugeMetricFamily(
            "itvnode_study_envelope_ratio", "Envelope (ITV) volume over its structure's largest phase volume",
            labels=["study_key", "envelope"])

    def add(self, m: dict[str, Any]) -> None:
        from service.store.manifest import Cycle

        key, state = str(m.get("study_key", "")), str(m.get("state", ""))
        try:
            cycle = Cycle.model_validate(m["cycle"]) if m.get("cycle") else None
        except ValueError:
            cycle = None
        if cycle is not None:
            self.phases.add_metric([key, "used"], cycle.used)
            self.phases.add_metric([key, "expected"], cycle.expected)
            if not cycle.complete:
                self.incomplete[state] = self.incomplete.get(state, 0) + 1
        self.released += 1 if m.get("released") else 0
        summary = (m.get("results") or {}).get("qa") or {}
        for kind in summary.get("flag_kinds") or []:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        for structure, motion in (summary.get("motion_mm") or {}).items():
            for axis, mm in (motion or {}).items():
                if isinstance(mm, int | float):
                    self.motion.add_metric([key, structure, axis], mm)
        for name, env in (summary.get("envelopes") or {}).items():
            ratio = (env or {}).get("ratio_to_largest_phase")
            if isinstance(ratio, int | float):
                self.envelope.add_metric([key, name], ratio)

    def metrics(self) -> Iterator[Metric]:
        yield self.phases
        g = GaugeMetricFamily("itvnode_studies_incomplete_cycle",
                              "Studies whose phases do not cover the breathing cycle, by state",
                              labels=["state"])
        for state, n in sorted(self.incomplete.items()):
            g.add_metric([state], n)
        yield g
        yield GaugeMetricFamily("itvnode_studies_released", "Studies an admin released from held",
                                value=self.released)
        w = GaugeMetricFamily("itvnode_qa_warnings", "QA warnings of the known studies, by kind",
                              labels=["kind"])
        for kind, n in sorted(self.kinds.items()):
            w.add_metric([kind], n)
        yield w
        yield self.motion
        yield self.envelope


class NodeCollector(Collector):
    """Prometheus collector computing every metric from ``data_dir`` and the broker at scrape time."""

    def __init__(self, data_dir: Path, broker_url: str | None) -> None:
        self.data_dir = data_dir
        self.layout = DataLayout(data_dir)
        self.broker_url = broker_url

    def collect(self) -> Iterator[Metric]:
        t0 = time.monotonic()
        by_state: dict[str, int] = {s.value: 0 for s in STATES}
        completed = failed = 0
        stage_obs: dict[str, list[float]] = {s: [] for s in STAGES}
        phase_slices = 0
        qa = _QAMetrics()
        skipped: dict[tuple[str, str], int] = {}
        latest: tuple[float, dict[str, Any]] | None = None
        for m in iter_manifest_dicts(self.data_dir):
            qa.add(m)
            results = m.get("results") or {}
            rec = results.get("model")
            if isinstance(rec, dict) and isinstance(rec.get("at"), int | float):
                if latest is None or float(rec["at"]) > latest[0]:
                    latest = (float(rec["at"]), rec)
                for name in rec.get("skipped") or []:
                    k = (str(name), str(rec.get("cause") or "unknown"))
                    skipped[k] = skipped.get(k, 0) + 1
            elif isinstance(results.get("skipped"), dict):  # written before results.model existed
                for name in results["skipped"]:
                    skipped[(str(name), "unknown")] = skipped.get((str(name), "unknown"), 0) + 1
            state = str(m.get("state", ""))
            by_state[state] = by_state.get(state, 0) + 1
            history = m.get("history") or []
            done = any(isinstance(h, dict) and h.get("state") == StudyState.DONE for h in history)
            completed += 1 if done else 0
            failed += 1 if state == StudyState.FAILED else 0
            for p in m.get("phases") or []:
                phase_slices += int(p.get("slices") or 0)
            timings = (m.get("results") or {}).get("timings") or {}
            for stage, secs in timings.items():
                if stage in stage_obs and isinstance(secs, int | float):
                    stage_obs[stage].append(float(secs))

        g = GaugeMetricFamily("itvnode_studies", "Studies known to the node, by state", labels=["state"])
        for state, n in sorted(by_state.items()):
            g.add_metric([state], n)
        yield g
        yield CounterMetricFamily(
            "itvnode_studies_completed", "Studies whose RTSTRUCT reached the done state", value=completed
        )
        yield CounterMetricFamily("itvnode_studies_failed", "Studies whose processing failed", value=failed)

        yield from qa.metrics()
        ml = GaugeMetricFamily(
            "itvnode_model_loaded",
            "1 when SAM 3 was loaded for the most recently segmented study, 0 when it was not (no sample "
            "before the first study)", labels=["cause"])
        if latest is not None:
            ml.add_metric([str(latest[1].get("cause") or "loaded")], 1 if latest[1].get("loaded") else 0)
        yield ml
        sk = CounterMetricFamily(
            "itvnode_structures_skipped",
            "Structures left out of a study's RTSTRUCT, by structure and cause (not_configured, dir_missing, "
            "file_missing, file_invalid, adapter_mismatch, weights_mismatch, load_error)",
            labels=["structure", "cause"])
        for (name, cause), n in sorted(skipped.items()):
            sk.add_metric([name, cause], n)
        yield sk

        received = _count_instances(self.layout)
        yield CounterMetricFamily(
            "itvnode_instances_received",
            "DICOM instances received and held in the spool",
            value=received if received is not None else 0,
        )
        yield CounterMetricFamily(
            "itvnode_phase_slices_assembled", "CT slices in assembled 4D phases", value=phase_slices
        )

        h = HistogramMetricFamily(
            "itvnode_stage_duration_seconds",
            "Seconds per pipeline stage, per study (busy time for the stages that overlap)", labels=["stage"]
        )
        for stage, values in stage_obs.items():
            buckets = [(str(b), sum(1 for v in values if v <= b)) for b in _BUCKETS]
            buckets.append(("+Inf", len(values)))
            h.add_metric([stage], buckets, sum(values))
        yield h

        from service.ops.retention import RetentionStats

        purged = RetentionStats(self.layout).read()
        ps = CounterMetricFamily("itvnode_purged_studies", "Studies purged, by reason (age, watermark, admin "
                                 "purge, delete)", labels=["reason"])
        pb = CounterMetricFamily("itvnode_purged_bytes", "Bytes freed by purges, by reason",
                                 labels=["reason"])
        for reason in sorted(purged["studies"]):
            ps.add_metric([reason], purged["studies"][reason])
            pb.add_metric([reason], purged["bytes"][reason])
        yield ps
        yield pb
        free = GaugeMetricFamily("itvnode_data_free_bytes", "Free bytes on the data directory's file system")
        try:
            free.add_metric([], shutil.disk_usage(self.data_dir).free)
        except OSError:
            pass
        yield free

        exports = item_counts(self.layout.outbox)
        yield CounterMetricFamily(
            "itvnode_export_failures", "Export items given up (dead letter)", value=exports.get("dead", 0)
        )
        eg = GaugeMetricFamily("itvnode_outbox_items", "Outbox items by state", labels=["state"])
        for state, n in sorted(exports.items()):
            eg.add_metric([state], n)
        yield eg

        qd = GaugeMetricFamily(
            "itvnode_queue_depth", "Messages waiting in each Celery queue", labels=["queue"]
        )
        up = 1
        try:
            depths = queue_depths(resolve_broker_url(self.broker_url, self.data_dir), timeout=2.0)
            for q, n in depths.items():
                qd.add_metric([q], n)
        except Exception as exc:
            log.warning("metrics: broker unreachable: %s", exc)
            up = 0
        yield qd
        yield GaugeMetricFamily("itvnode_broker_up", "1 when the broker answered this scrape", value=up)
        yield GaugeMetricFamily(
            "itvnode_scrape_duration_seconds", "Time to compute these metrics", value=time.monotonic() - t0
        )

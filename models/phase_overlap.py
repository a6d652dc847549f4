"""Drive a :class:`models.phase_segmentation.PhaseSegmentation` so that its stages overlap across phases.

Threads joined by queues of one item: a feeder pulls phases from the caller's iterator (the worker's
reads a phase from DICOM into its slot of the 4D array when asked), this thread runs the segmenter (the GPU
in production), and two CPU threads settle the phases before (thresholds, midline, side split). While the
segmenter works on phase k, phase k+1 is being read and phases k-1 and k-2 settled. At most one phase waits
between two stages, so SAM 3's unsplit masks of at most four phases exist at once beside the study's arrays.
The heavy parts (file reads, numpy, scipy, torch) release the GIL.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.phase_segmentation import PhaseSegmentation, SamPhase

_POLL_S = 0.2  # how often a blocked thread looks whether another one failed
#: threads settling phases (PhaseSegmentation.settle writes only its own phase's slots): without a model,
#: or with a fast one, the External threshold is the slowest stage and one thread of it leaves a core idle
SETTLERS = 2


@dataclass(frozen=True)
class OverlapTimes:
    """Seconds: the wall time of the whole per-phase section and the time spent waiting for the iterator."""

    wall: float
    feed: float


class _Failed(Exception):
    """Another stage failed: stop quietly, the first error is re-raised by :func:`run_phases`."""


def run_phases(seg: PhaseSegmentation, phases: Iterable[tuple[int, np.ndarray]], *,
               overlap: bool = True, settlers: int = SETTLERS) -> OverlapTimes:
    """Segment and settle every ``(phase index, (Z, Y, X) HU)`` that ``phases`` yields, phases settled on
    ``settlers`` threads.

    ``overlap=False`` runs the same calls one after the other (the reference the threaded run must equal).
    """
    if settlers < 1:
        raise ValueError(f"settlers must be >= 1, got {settlers}")
    t0 = time.perf_counter()
    feed = [0.0]
    it = iter(phases)

    def pull() -> tuple[int, np.ndarray] | None:
        t = time.perf_counter()
        try:
            return next(it)
        except StopIteration:
            return None
        finally:
            feed[0] += time.perf_counter() - t

    if not overlap:
        while (item := pull()) is not None:
            p, phase = item
            seg.settle(p, phase, seg.segment(p, phase))
        return OverlapTimes(time.perf_counter() - t0, feed[0])

    failed = threading.Event()
    errors: list[BaseException] = []
    to_segment: queue.Queue[tuple[int, np.ndarray] | None] = queue.Queue(maxsize=1)
    to_settle: queue.Queue[tuple[np.ndarray, SamPhase] | None] = queue.Queue(maxsize=1)

    def put(q: queue.Queue[Any], item: Any) -> None:
        while True:
            if failed.is_set():
                raise _Failed
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def get(q: queue.Queue[Any]) -> Any:
        while True:
            if failed.is_set():
                raise _Failed
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except _Failed:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                errors.append(exc)
                failed.set()
        return run

    def feeder() -> None:
        while (item := pull()) is not None:
            put(to_segment, item)
        put(to_segment, None)

    def settler() -> None:
        while (item := get(to_settle)) is not None:
            phase, sam = item
            seg.settle(sam.phase, phase, sam)

    def segmenter() -> None:
        while (item := get(to_segment)) is not None:
            p, phase = item
            put(to_settle, (phase, seg.segment(p, phase)))
        for _ in range(settlers):
            put(to_settle, None)

    threads = [threading.Thread(target=guarded(fn), name=f"phase-{name}", daemon=True)
               for name, fn in (("feed", feeder), *((f"settle-{i}", settler) for i in range(settlers)))]
    for t in threads:
        t.start()
    try:
        guarded(segmenter)()
    finally:
        if errors:
            failed.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return OverlapTimes(time.perf_counter() - t0, feed[0])


def array_phases(hu: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """The phases of a (P, Z, Y, X) array that is already in memory."""
    for p in range(hu.shape[0]):
        yield p, hu[p]

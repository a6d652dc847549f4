"""models.phase_overlap.run_phases: the stages of different phases run at the same time, every phase is
segmented then settled once, and the first error of any stage reaches the caller (no thread left waiting)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from models.phase_overlap import array_phases, run_phases
from models.phase_segmentation import SamPhase

WAIT_S = 20.0


class Recorder:
    """Stands in for PhaseSegmentation: records the calls; hooks can block or fail them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.on_segment: Any = None
        self.on_settle: Any = None

    def segment(self, p: int, phase: np.ndarray) -> SamPhase:
        with self.lock:
            self.calls.append(("segment", p))
        if self.on_segment:
            self.on_segment(p)
        return SamPhase(p, None)

    def settle(self, p: int, phase: np.ndarray, sam: SamPhase) -> None:
        assert sam.phase == p
        with self.lock:
            self.calls.append(("settle", p))
        if self.on_settle:
            self.on_settle(p)


def test_phase_k_plus_1_is_read_and_k_minus_1_settled_while_k_is_segmented() -> None:
    rec = Recorder()
    read = [threading.Event() for _ in range(4)]
    settled = [threading.Event() for _ in range(4)]
    seen: list[tuple[int, bool, bool]] = []

    def phases() -> Iterator[tuple[int, np.ndarray]]:
        for p in range(4):
            read[p].set()
            yield p, np.zeros((2, 2, 2))

    def on_segment(p: int) -> None:  # phase p's segmenter waits for phase p+1's read and p-1's settle
        nxt = p + 1 >= 4 or read[p + 1].wait(WAIT_S)
        prev = p == 0 or settled[p - 1].wait(WAIT_S)
        seen.append((p, nxt, prev))

    rec.on_segment = on_segment
    rec.on_settle = lambda p: settled[p].set()
    times = run_phases(rec, phases())  # type: ignore[arg-type]
    assert seen == [(p, True, True) for p in range(4)]
    assert sorted(rec.calls) == sorted([(k, p) for p in range(4) for k in ("segment", "settle")])
    assert times.wall >= times.feed >= 0


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("where", ["feed", "segment", "settle"])
def test_the_first_error_reaches_the_caller(where: str, overlap: bool) -> None:
    rec = Recorder()

    def boom(p: int) -> None:
        if p == 2:
            raise ValueError(f"{where} failed")

    def phases() -> Iterator[tuple[int, np.ndarray]]:
        for p, phase in array_phases(np.zeros((6, 2, 2, 2))):
            if where == "feed":
                boom(p)
            yield p, phase

    if where == "segment":
        rec.on_segment = boom
    if where == "settle":
        rec.on_settle = boom
    before = threading.active_count()
    with pytest.raises(ValueError, match=f"{where} failed"):
        run_phases(rec, phases(), overlap=overlap)  # type: ignore[arg-type]
    assert threading.active_count() == before
    assert ("segment", 5) not in rec.calls


def test_two_phases_settle_at_the_same_time() -> None:
    rec = Recorder()
    started = [threading.Event() for _ in range(4)]
    overlapped: list[int] = []

    def on_settle(p: int) -> None:  # phase 0's settle waits for phase 1's to start: one settler would hang
        started[p].set()
        if p == 0 and started[1].wait(WAIT_S):
            overlapped.append(p)

    rec.on_settle = on_settle
    run_phases(rec, array_phases(np.zeros((4, 2, 2, 2))))  # type: ignore[arg-type]
    assert overlapped == [0]
    assert sorted(c for c in rec.calls if c[0] == "settle") == [("settle", p) for p in range(4)]
    with pytest.raises(ValueError, match="settlers"):
        run_phases(rec, array_phases(np.zeros((1, 2, 2, 2))), settlers=0)  # type: ignore[arg-type]

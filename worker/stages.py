"""The stages of one pipeline run: their wall times (``results.timings``), the error that fails a study at
one, and which failures are worth another attempt."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A study cannot be processed; the message is the reason recorded in the manifest."""


class Stages:
    """Wall time per stage, in the order run."""

    def __init__(self, study_key: str) -> None:
        self.study_key = study_key
        self.timings: dict[str, float] = {}
        self.current = ""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.current = name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 4)
        log.info("study %s: %s done in %.2f s", self.study_key, name, self.timings[name])


def is_transient(exc: BaseException, stage: str) -> bool:
    """Whether another attempt may succeed: time limits, loading the model, memory, I/O, the broker. Bad
    input (PipelineError, ValueError, ...) fails at once: a retry would fail the same way."""
    if isinstance(exc, PipelineError | ValueError | KeyError | TypeError | IndexError | AssertionError):
        return stage == "model"
    if type(exc).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded", "WorkerLostError"):
        return True
    if stage == "model" or isinstance(exc, MemoryError | OSError | ConnectionError | TimeoutError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA" in text or "out of memory" in text)

"""The engine one phase at a time, so that reading, the segmenter and the CPU work of phases overlap.

Per phase, in this order (:func:`models.phase_overlap.run_phases` drives it, threaded or not):

1. :meth:`PhaseSegmentation.segment` (the segmenter's thread): the slices SAM 3 should see
   (:func:`models.engine.prompt_slices`), then ``segmenter.predict`` chunk by chunk, binarised at 0.5 into
   one unsplit bool (Z, Y, X) mask per prompt. Only the ``predict`` calls count as the segmenter's busy time.
2. :meth:`PhaseSegmentation.settle` (CPU threads, one phase each): threshold structures
   (:func:`models.threshold.threshold_body`), the body midline, the laterality split of threshold and SAM 3
   masks, all written into the study's preallocated (P, Z, Y, X) masks.
3. After the last phase, :meth:`PhaseSegmentation.finish`: the cross-phase work (temporal filter,
   connectivity, envelopes, QA) of :func:`models.engine.postprocess_volume`.

Every step of one phase only reads that phase, so the result does not depend on the order or the overlap:
:func:`models.engine.segment_volume` (the whole array at once) runs the same steps.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.engine import (
    PROBABILITY_CUT,
    SAM3_NOT_CONFIGURED,
    EngineResult,
    Segmenter,
    SkipParams,
    body_midlines,
    output_structures,
    postprocess_volume,
    prompt_slices,
    split_sides,
)
from models.post.qa import QAParams
from models.post.temporal import TemporalParams
from models.structures import StructureSpec
from models.threshold import ScratchPool, threshold_body

log = logging.getLogger(__name__)

#: busy-time keys of :attr:`PhaseSegmentation.busy` (seconds, summed over phases)
BUSY_KEYS = ("segmenter", "phase_cpu", "postprocess")


@dataclass
class SamPhase:
    """SAM 3's output for one phase: unsplit bool (Z, Y, X) per prompt (None without SAM 3 structures)."""

    phase: int
    masks: dict[str, np.ndarray] | None
    skipped_slices: int = 0


@dataclass
class PhaseSegmentation:
    """One study's segmentation, fed phase by phase; see the module docstring for the order of calls."""

    shape: tuple[int, int, int, int]  # (P, Z, Y, X)
    spacing: Sequence[float]  # (dz, dy, dx) mm
    structures: Sequence[StructureSpec]
    segmenter: Segmenter | None
    slices_per_call: int = 32
    skip: SkipParams | None = SkipParams()
    study_key: str = ""
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    busy: dict[str, float] = field(default_factory=lambda: dict.fromkeys(BUSY_KEYS, 0.0))

    def __post_init__(self) -> None:
        if len(self.shape) != 4 or min(self.shape) < 1:
            raise ValueError(f"hu must be (phases, z, y, x), got shape {self.shape}")
        if len(self.spacing) != 3 or min(float(s) for s in self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive values (dz, dy, dx), got {tuple(self.spacing)}")
        if self.slices_per_call < 1:
            raise ValueError("slices_per_call must be >= 1")
        self.spacing = (float(self.spacing[0]), float(self.spacing[1]), float(self.spacing[2]))
        self._lock = threading.Lock()  # busy-time sums from several threads
        self._scratch = ScratchPool()  # the thresholds' temporaries, reused from phase to phase
        self._sam = [s for s in self.structures if s.method == "sam3"]
        self._thresholds = [s for s in self.structures if s.method == "threshold"]
        self._prompts = _prompt_thresholds(self._sam)
        self._skipped_per_phase = [0] * self.shape[0]
        self._t_start = time.perf_counter()
        if self._sam and self.segmenter is None:
            for o in output_structures(self.structures):
                if o.spec.method == "sam3":
                    self.skipped[o.name] = SAM3_NOT_CONFIGURED
                    if o.envelope_name:
                        self.skipped[o.envelope_name] = SAM3_NOT_CONFIGURED
            log.warning("study %s: %d SAM 3 structure(s) skipped: %s", self.study_key or "-", len(self._sam),
                        SAM3_NOT_CONFIGURED)
        for spec in self._thresholds:
            for name in spec.output_names:
                self.masks[name] = np.zeros(self.shape, dtype=bool)
        if self._sam and self.segmenter is not None:
            for spec in self._sam:
                for name in spec.output_names:
                    self.masks[name] = np.zeros(self.shape, dtype=bool)

    @property
    def runs_segmenter(self) -> bool:
        return bool(self._sam) and self.segmenter is not None

    def _add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.busy[key] += seconds

    def segment(self, p: int, phase: np.ndarray) -> SamPhase:
        """SAM 3 on the slices of phase ``p`` (Z, Y, X HU) that :func:`prompt_slices` keeps."""
        if not self.runs_segmenter:
            return SamPhase(p, None)
        assert self.segmenter is not None
        t0 = time.perf_counter()
        n_z = phase.shape[0]
        keep = prompt_slices(phase, self.spacing, self.skip) if self.skip is not None else np.ones(n_z, bool)
        zs = np.flatnonzero(keep)
        out = {prompt: np.zeros(phase.shape, dtype=bool) for prompt in self._prompts}
        in_predict = 0.0
        for c0 in range(0, zs.size, self.slices_per_call):
            idx = zs[c0 : c0 + self.slices_per_call]
            z0, z1 = int(idx[0]), int(idx[-1]) + 1
            contiguous = idx.size == z1 - z0
            t_pred = time.perf_counter()
            probs = self.segmenter.predict(phase[z0:z1] if contiguous else phase[idx], list(self._prompts),
                                           score_threshold=dict(self._prompts))
            in_predict += time.perf_counter() - t_pred
            rows = slice(z0, z1) if contiguous else idx
            for prompt in self._prompts:
                out[prompt][rows] = np.asarray(probs[prompt]) >= PROBABILITY_CUT
            del probs
        self._add("segmenter", in_predict)
        self._add("phase_cpu", time.perf_counter() - t0 - in_predict)
        self._skipped_per_phase[p] = int(n_z - zs.size)
        log.info("study %s: SAM 3 phase %d/%d done (%.1f s, %d of %d slices skipped)", self.study_key or "-",
                 p + 1, self.shape[0], time.perf_counter() - t0, self._skipped_per_phase[p], n_z)
        return SamPhase(p, out, self._skipped_per_phase[p])

    def settle(self, p: int, phase: np.ndarray, sam: SamPhase) -> None:
        """Threshold structures of phase ``p``, the midline, and every mask of the phase in its place."""
        t0 = time.perf_counter()
        whole: dict[str, np.ndarray] = {}
        for spec in self._thresholds:
            assert spec.hu_range is not None
            # an unsplit structure is computed straight into its slot of the study's mask
            into = None if spec.split_laterality else self.masks[spec.name][p]
            whole[spec.name] = threshold_body(phase, self.spacing, spec.hu_range, out=into,
                                              scratch=self._scratch)
        default_body: list[np.ndarray] = []  # threshold_body at its defaults, computed at most once

        def midline(external: str | None) -> float:
            if external is not None:
                body = whole[external]
            else:
                if not default_body:
                    default_body.append(threshold_body(phase, self.spacing, scratch=self._scratch))
                body = default_body[0]
            return float(body_midlines(body[None])[0])

        externals = [s for s in self._thresholds if s.interpreted_type == "EXTERNAL"]
        if any(s.split_laterality for s in self._thresholds):  # from the unsplit External
            mid = midline(externals[0].name if externals else None)
        for spec in self._thresholds:
            if spec.split_laterality:
                left, right = split_sides(whole[spec.name], mid)
                self.masks[f"{spec.name}_L"][p], self.masks[f"{spec.name}_R"][p] = left, right
            # else: already in self.masks[spec.name][p]
        if sam.masks is not None:
            if any(s.split_laterality for s in self._sam):  # an External that is split is not a midline
                unsplit = [s.name for s in externals if not s.split_laterality]
                sam_mid = midline(unsplit[0] if unsplit else None)
            for spec in self._sam:
                m = sam.masks[spec.prompt]
                if spec.split_laterality:
                    left, right = split_sides(m, sam_mid)
                    self.masks[f"{spec.name}_L"][p], self.masks[f"{spec.name}_R"][p] = left, right
                else:
                    self.masks[spec.name][p] = m
        self._add("phase_cpu", time.perf_counter() - t0)

    def phase_masks(self, p: int) -> dict[str, np.ndarray]:
        """Every settled mask of phase ``p``: views into the study's arrays."""
        return {name: m[p] for name, m in self.masks.items()}

    def skipped_slices(self, p: int) -> int:
        """Slices of phase ``p`` that SAM 3 did not see (:func:`prompt_slices`)."""
        return self._skipped_per_phase[p]

    def put_phase(self, p: int, masks: dict[str, np.ndarray], skipped_slices: int = 0) -> None:
        """Phase ``p`` segmented and settled elsewhere (another worker of a split study): its masks, as
        :meth:`phase_masks` gave them there, in their place."""
        if set(masks) != set(self.masks):
            raise ValueError(f"phase {p}: masks {sorted(masks)} are not the study's {sorted(self.masks)}")
        for name, m in masks.items():
            if m.shape != self.shape[1:]:
                raise ValueError(f"phase {p}: mask {name} has shape {m.shape}, expected {self.shape[1:]}")
            self.masks[name][p] = m
        self._skipped_per_phase[p] = int(skipped_slices)

    def finish(self, hu: np.ndarray, temporal: TemporalParams | None = None, *, keep_raw: bool = False,
               workers: int = 2, qa_params: QAParams | None = None,
               phase_percents: Sequence[float] | None = None) -> EngineResult:
        """The cross-phase post-processing of :func:`postprocess_volume` on every settled phase."""
        t0 = time.perf_counter()
        raw = {k: v.copy() for k, v in self.masks.items()} if keep_raw else None
        result = postprocess_volume(self.masks, hu, self.spacing, self.structures, temporal,
                                    skipped=self.skipped, workers=workers, qa_params=qa_params,
                                    phase_percents=phase_percents, study_key=self.study_key)
        self._add("postprocess", time.perf_counter() - t0)
        result.qa["timing_s"]["total"] = round(time.perf_counter() - self._t_start, 3)
        if self.runs_segmenter:
            n_ph, n_z = self.shape[:2]
            total, skipped = n_ph * n_z, sum(self._skipped_per_phase)
            per_prompt = {"slices": total, "run": total - skipped, "skipped": skipped,
                          "skipped_per_phase": list(self._skipped_per_phase)}
            result.qa["sam3_slices"] = {
                "rule": None if self.skip is None else dataclasses.asdict(self.skip),
                "prompts": {prompt: dict(per_prompt) for prompt in self._prompts}}
        result.raw_masks = raw
        return result


def _prompt_thresholds(sam_specs: Sequence[StructureSpec]) -> dict[str, float]:
    """Each prompt once, with its score threshold (one value per prompt)."""
    thresholds: dict[str, float] = {}
    for s in sam_specs:
        if s.prompt in thresholds and thresholds[s.prompt] != s.score_threshold:
            raise ValueError(f"prompt {s.prompt!r} is used with two score thresholds; give each one value")
        thresholds[s.prompt] = s.score_threshold
    return thresholds


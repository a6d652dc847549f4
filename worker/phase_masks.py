"""A split study's per-phase masks on disk (worker.study_split): what one worker's phase group hands to the
task that finishes the study.

``studies/<key>/phase_masks/<masks key>/phase_<p>.npz``: every settled mask of phase ``p``
(:meth:`models.phase_segmentation.PhaseSegmentation.phase_masks`) bit-packed, plus a small JSON header
(format, phase, shape, names, slices SAM 3 skipped). The masks key (:func:`masks_key`) derives from what the
masks depend on: the study, the input instances (with revisions), the engine settings and the model/adapter
identity. Masks made under other inputs or another model are never mixed in; a re-delivered group finds its
phases done and skips them.

A file is written to a temporary name and renamed, without fsync: masks can be recomputed, and a file that
a power cut left damaged fails its zip CRC on reading and counts as missing (:meth:`PhaseMaskStore.read`).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.dicomio.uids import content_key
from service.store.durable import private_dir, write_atomic
from service.store.layout import DataLayout

log = logging.getLogger(__name__)

FORMAT = "itvnode-phase-masks/1"


def masks_key(study_key: str, geometries: Sequence[Any], algorithm: Sequence[str], settings: str,
              revisions: Mapping[str, int] | None = None) -> str:
    """32 hex digits naming the masks of these phase ``geometries`` (their SOP Instance UIDs) made by
    ``algorithm`` (the RTSTRUCT's model/adapter identity) under engine ``settings`` (a settings digest)."""
    return content_key(study_key=study_key,
                       input_sop_instance_uids=(u for g in geometries for u in g.sop_instance_uids),
                       algorithm=algorithm, layout=FORMAT, settings=settings, revisions=revisions)


@dataclass(frozen=True)
class PhaseMaskStore:
    """The per-phase mask files of one study under one masks key."""

    data_dir: Path
    study_key: str
    key: str

    @property
    def root(self) -> Path:
        return DataLayout(self.data_dir).phase_masks(self.study_key) / self.key

    def path(self, p: int) -> Path:
        return self.root / f"phase_{p:03d}.npz"

    def exists(self, p: int) -> bool:
        return self.path(p).is_file()

    def write(self, p: int, masks: Mapping[str, np.ndarray], skipped_slices: int) -> Path:
        """Phase ``p``'s masks (bool, one shape), atomically."""
        names = sorted(masks)
        shapes = {masks[n].shape for n in names}
        if len(shapes) != 1:
            raise ValueError(f"phase {p}: masks of different shapes {sorted(shapes)}")
        shape = shapes.pop()
        meta = {"format": FORMAT, "phase": p, "shape": list(shape), "names": names,
                "skipped_slices": int(skipped_slices)}
        arrays = {f"mask_{i}": np.packbits(np.asarray(masks[n], dtype=bool), axis=None)
                  for i, n in enumerate(names)}
        buf = io.BytesIO()
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez(buf, allow_pickle=False, **arrays)
        private_dir(DataLayout(self.data_dir).phase_masks(self.study_key))
        private_dir(self.root)
        path = self.path(p)
        write_atomic(path, buf.getvalue(), fsync=False)
        return path

    def read(self, p: int, shape: Sequence[int],
             names: Sequence[str]) -> tuple[dict[str, np.ndarray], int] | None:
        """``(masks, skipped slices)`` of phase ``p``, or None when the file is missing, damaged or made for
        another shape or set of structures (the caller computes the phase again)."""
        path = self.path(p)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if (meta.get("format") != FORMAT or meta.get("phase") != p
                        or list(meta.get("shape") or []) != list(shape)
                        or sorted(meta.get("names") or []) != sorted(names)):
                    log.warning("phase masks %s do not match this study (%s); computing phase %d again",
                                path, {k: meta.get(k) for k in ("format", "phase", "shape")}, p)
                    return None
                count = int(np.prod(shape))
                masks = {n: np.unpackbits(z[f"mask_{i}"], count=count).view(bool).reshape(tuple(shape))
                         for i, n in enumerate(meta["names"])}
                return masks, int(meta.get("skipped_slices", 0))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("phase masks %s unreadable (%s: %s); computing phase %d again", path,
                        type(exc).__name__, exc, p)
            return None


def remove_phase_masks(data_dir: Path, study_key: str) -> None:
    """Drop every per-phase mask file of a study (its result is written; they were intermediate)."""
    shutil.rmtree(DataLayout(data_dir).phase_masks(study_key), ignore_errors=True)

"""What to contour: one :class:`StructureSpec` per structure, plain fields, validated on construction.

Mirrors ``service.settings.StructureSetting`` (the worker converts one into the other) so that ``models/``
never imports settings. Defaults of :func:`default_structures` equal
``service.settings.default_structures()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Method = Literal["sam3", "threshold"]
InterpretedType = Literal["EXTERNAL", "ORGAN", "GTV", "CTV", "PTV", "AVOIDANCE", "CONTROL"]

METHODS: tuple[str, ...] = ("sam3", "threshold")
INTERPRETED_TYPES: tuple[str, ...] = ("EXTERNAL", "ORGAN", "GTV", "CTV", "PTV", "AVOIDANCE", "CONTROL")
MAX_NAME_LEN = 16  # TG-263 / RT ROI Name as most TPS accept it


@dataclass(frozen=True)
class StructureSpec:
    """One structure to contour.

    ``method="sam3"`` segments with the text ``prompt``; ``method="threshold"`` uses ``hu_range``.
    ``split_laterality`` splits one prompt into ``<name>_L`` / ``<name>_R`` by patient side.
    ``envelope`` builds the union over phases, named ``envelope_name`` (e.g. ``ITV`` for ``GTVp``).
    ``expected_components`` keeps that many largest 3D components (``None``: every component above
    ``min_volume_cc``).
    """

    name: str
    prompt: str = ""
    method: Method = "sam3"
    score_threshold: float = 0.5
    hu_range: tuple[float, float] | None = None
    split_laterality: bool = False
    envelope: bool = False
    envelope_name: str | None = None
    expected_components: int | None = None
    min_volume_cc: float = 0.05
    color: tuple[int, int, int] = (255, 0, 0)
    interpreted_type: InterpretedType = "ORGAN"

    def __post_init__(self) -> None:
        if not 1 <= len(self.name) <= MAX_NAME_LEN:
            raise ValueError(f"structure name {self.name!r} must be 1-{MAX_NAME_LEN} characters (TG-263)")
        if self.method not in METHODS:
            raise ValueError(f"structure {self.name}: method {self.method!r} is not one of {METHODS}")
        if self.interpreted_type not in INTERPRETED_TYPES:
            raise ValueError(
                f"structure {self.name}: interpreted_type {self.interpreted_type!r} "
                f"is not one of {INTERPRETED_TYPES}"
            )
        if self.method == "sam3" and not self.prompt.strip():
            raise ValueError(f"structure {self.name}: method sam3 needs a prompt")
        if self.method == "threshold":
            if self.hu_range is None:
                raise ValueError(f"structure {self.name}: method threshold needs hu_range")
        if self.hu_range is not None:
            lo, hi = self.hu_range
            if not lo < hi:
                raise ValueError(
                    f"structure {self.name}: hu_range {self.hu_range} must be (low, high) with low < high"
                )
            object.__setattr__(self, "hu_range", (float(lo), float(hi)))
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"structure {self.name}: score_threshold {self.score_threshold} not in [0, 1]")
        if self.split_laterality and len(self.name) + 2 > MAX_NAME_LEN:
            raise ValueError(
                f"structure {self.name}: with split_laterality, {self.name}_L exceeds {MAX_NAME_LEN}"
            )
        if self.envelope_name is not None:
            if not 1 <= len(self.envelope_name) <= MAX_NAME_LEN:
                raise ValueError(
                    f"structure {self.name}: envelope_name {self.envelope_name!r} must be 1-16 characters"
                )
            if not self.envelope:
                raise ValueError(f"structure {self.name}: envelope_name given but envelope is False")
        if self.expected_components is not None and self.expected_components < 1:
            raise ValueError(f"structure {self.name}: expected_components must be >= 1 or None")
        if self.min_volume_cc < 0:
            raise ValueError(f"structure {self.name}: min_volume_cc must be >= 0")
        if len(self.color) != 3 or any(not 0 <= int(c) <= 255 for c in self.color):
            raise ValueError(f"structure {self.name}: color {self.color} must be three values in 0-255")
        object.__setattr__(self, "color", tuple(int(c) for c in self.color))

    @property
    def output_names(self) -> tuple[str, ...]:
        """ROI names this spec produces per phase (``Lung`` with laterality gives ``Lung_L``, ``Lung_R``)."""
        if self.split_laterality:
            return (f"{self.name}_L", f"{self.name}_R")
        return (self.name,)


def default_structures() -> list[StructureSpec]:
    """External by threshold; lungs (split L/R), heart and GTVp (with its ITV) by SAM 3."""
    return [
        StructureSpec(
            name="External",
            method="threshold",
            hu_range=(-350.0, 3000.0),
            interpreted_type="EXTERNAL",
            color=(0, 255, 0),
        ),
        StructureSpec(
            name="Lung",
            prompt="lung",
            split_laterality=True,
            color=(0, 128, 255),
            interpreted_type="ORGAN",
            expected_components=1,
        ),
        StructureSpec(
            name="Heart", prompt="heart", color=(255, 0, 128), interpreted_type="ORGAN", expected_components=1
        ),
        StructureSpec(
            name="GTVp",
            prompt="lung tumor",
            color=(255, 0, 0),
            interpreted_type="GTV",
            envelope=True,
            envelope_name="ITV",
            min_volume_cc=0.01,
        ),
    ]

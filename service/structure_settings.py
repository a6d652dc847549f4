"""The structures a site contours (``structures`` setting) and the ROI names of contours it already has
(``roi_map``): the engine group's value types, mirrored as plain ``models.structures.StructureSpec``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator


class StructureSetting(BaseModel):
    """One structure to contour. ``method`` picks SAM 3 (text prompt) or a HU threshold."""

    name: str  # TG-263, <= 16 characters
    prompt: str = ""
    color: tuple[int, int, int] = (255, 0, 0)
    interpreted_type: Literal["EXTERNAL", "ORGAN", "GTV", "CTV", "PTV", "AVOIDANCE", "CONTROL"] = "ORGAN"
    method: Literal["sam3", "threshold"] = "sam3"
    score_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    hu_range: tuple[float, float] | None = None  # for method=threshold
    split_laterality: bool = False  # one SAM 3 prompt, split into <name>_L / <name>_R by patient side
    envelope: bool = False
    envelope_name: str | None = None  # e.g. "ITV" for GTVp
    # RT ROI Interpreted Type of the envelope: '' makes no claim (ITV is not a DICOM defined term, see
    # docs/rtstruct.md); keep it stable per site or RayStation duplicates the ROI as "ITV (1)".
    envelope_interpreted_type: Literal["", "GTV", "CTV", "PTV", "ITV", "ORGAN", "CONTROL"] = ""
    expected_components: int | None = None  # keep this many largest 3D components (None: all above the floor)
    min_volume_cc: float = 0.05

    @field_validator("name", "envelope_name")
    @classmethod
    def _tg263_len(cls, v: str | None) -> str | None:
        if v is not None and not (1 <= len(v) <= 16):
            raise ValueError(f"structure name {v!r} must be 1-16 characters (TG-263)")
        return v

    @model_validator(mode="after")
    def _method_args(self) -> StructureSetting:
        if self.method == "sam3" and not self.prompt:
            raise ValueError(f"structure {self.name}: method sam3 needs a prompt")
        if self.method == "threshold" and self.hu_range is None:
            raise ValueError(f"structure {self.name}: method threshold needs hu_range")
        return self


def default_structures() -> list[StructureSetting]:
    return [
        StructureSetting(name="External", method="threshold", hu_range=(-350.0, 3000.0),
                         interpreted_type="EXTERNAL", color=(0, 255, 0)),
        StructureSetting(name="Lung", prompt="lung", split_laterality=True, color=(0, 128, 255),
                         interpreted_type="ORGAN", expected_components=1),
        StructureSetting(name="Heart", prompt="heart", color=(255, 0, 128), interpreted_type="ORGAN",
                         expected_components=1),
        StructureSetting(name="GTVp", prompt="lung tumor", color=(255, 0, 0), interpreted_type="GTV",
                         envelope=True, envelope_name="ITV", min_volume_cc=0.01),
    ]


def default_roi_map() -> dict[str, str]:
    """RTSTRUCT ROI names a site already uses -> our structure names (regex, full match, case-insensitive,
    tried on the whole name, then on the part before a ``^`` qualifier: ``GTVp^P40`` matches ``GTVp``).

    The usual primary GTV spellings (GTV, GTVp, GTV1, GTV_Primary, GTV-1, GTV_P ...), lungs by side, heart.
    """
    return {
        r"gtv(?:[ _-]?(?:p|1|p1|prim|primary|primaire|t))?": "GTVp",
        r"lung[ _-]?(?:l|lt|left)|(?:l|lt|left)[ _-]?lung": "Lung_L",
        r"lung[ _-]?(?:r|rt|right)|(?:r|rt|right)[ _-]?lung": "Lung_R",
        r"heart": "Heart",
    }

"""What the node's DICOM outputs (RTSTRUCT, SEG, encapsulated PDF) share: what made them (:class:`Algorithm`,
``MANUFACTURER``), the ROI display styles, and durable writing of a dataset."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from itvnode_version import __version__
from service.store.durable import private_dir, write_atomic

MANUFACTURER = "itvnode"


@dataclass(frozen=True)
class RoiStyle:
    """Display colour and RT ROI Interpreted Type ('' = no claim, a Type 2 empty value)."""

    color: tuple[int, int, int] = (255, 0, 0)
    interpreted_type: str = ""


@dataclass(frozen=True)
class Algorithm:
    """What produced the masks; goes into ROIGenerationDescription, SoftwareVersions and the UIDs."""

    model: str = "SAM 3"
    model_version: str = "unknown"
    adapter_version: str = "none"
    generation: str = "AUTOMATIC"  # ROIGenerationAlgorithm; SEMIAUTOMATIC: input contours, cleaned

    @property
    def description(self) -> str:
        return f"itvnode {__version__}; {self.model} {self.model_version}; LoRA {self.adapter_version}"

    @property
    def identity(self) -> tuple[str, ...]:
        """What goes into the output content key (service.dicomio.uids)."""
        return (self.model, self.model_version, self.adapter_version, f"itvnode {__version__}")


def write_dataset(ds: Dataset, out_dir: str | Path, prefix: str) -> Path:
    """Write ``<prefix>.<SOPInstanceUID>.dcm`` under ``out_dir`` durably and atomically, in the transfer
    syntax of its file meta; a re-run overwrites the same name (deterministic UIDs)."""
    out = Path(out_dir)
    private_dir(out)
    path = out / f"{prefix}.{ds.SOPInstanceUID}.dcm"
    buf = BytesIO()
    implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    write_atomic(path, buf.getvalue())
    return path

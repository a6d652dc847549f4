"""One table from ingest exceptions to C-STORE DIMSE status codes.

The SCP handler catches every exception, looks it up here (most specific class first) and answers with the
status and an ``ErrorComment`` carrying the reason, so a PACS administrator sees why an instance was refused.
The codes are documented for sites in ``docs/conformance.md``; keep both in step.
"""

from __future__ import annotations

from service.store.ingest_errors import (
    ConflictingDuplicate,
    InvalidGeometry,
    InvalidIdentifier,
    MissingAttribute,
    MissingGeometry,
    ModalityMismatch,
    PixelDataLengthMismatch,
    SOPClassMismatch,
    SOPInstanceMismatch,
    SpoolFull,
    SpoolUnavailable,
    UndecodableDataset,
)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
SOP_CLASS_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand (unexpected failure inside the node)
MISSING_ATTRIBUTE = 0xC001  # a required identifying attribute is absent or empty
INVALID_IDENTIFIER = 0xC002  # a UID is not a valid DICOM UID
MISSING_GEOMETRY = 0xC003  # image plane / frame of reference attributes absent
SOP_INSTANCE_MISMATCH = 0xC004  # data set SOP Instance UID differs from the request's Affected one
CONFLICTING_DUPLICATE = 0xC005  # SOP Instance UID already stored in another series of the same study
INVALID_GEOMETRY = 0xC006  # image plane values not finite, spacing not positive, orientation degenerate
PIXEL_DATA_LENGTH = 0xC007  # native Pixel Data shorter than Rows x Columns x samples x frames x bits
UNDECODABLE = 0xC210  # the data set could not be decoded (pynetdicom uses the same code)

# Order matters: the first matching entry wins, so subclasses come before their bases.
STATUS_TABLE: tuple[tuple[type[BaseException], int], ...] = (
    (SpoolFull, OUT_OF_RESOURCES),
    (SpoolUnavailable, OUT_OF_RESOURCES),
    (SOPClassMismatch, SOP_CLASS_MISMATCH),
    (ModalityMismatch, SOP_CLASS_MISMATCH),
    (SOPInstanceMismatch, SOP_INSTANCE_MISMATCH),
    (ConflictingDuplicate, CONFLICTING_DUPLICATE),
    (InvalidGeometry, INVALID_GEOMETRY),
    (PixelDataLengthMismatch, PIXEL_DATA_LENGTH),
    (MissingGeometry, MISSING_GEOMETRY),
    (MissingAttribute, MISSING_ATTRIBUTE),
    (InvalidIdentifier, INVALID_IDENTIFIER),
    (UndecodableDataset, UNDECODABLE),
    (MemoryError, OUT_OF_RESOURCES),
)


def status_for(exc: BaseException) -> int:
    """DIMSE status for an exception raised while receiving one instance; unknown ones are 0xC000."""
    for exc_type, status in STATUS_TABLE:
        if isinstance(exc, exc_type):
            return status
    return CANNOT_UNDERSTAND


def error_comment(exc: BaseException) -> str:
    """``ErrorComment`` (LO, at most 64 characters) for the response; never carries patient data."""
    text = str(exc) if not isinstance(exc, MemoryError) else "out of memory"
    if status_for(exc) == CANNOT_UNDERSTAND and not text.startswith("internal"):
        text = f"internal error: {type(exc).__name__}"
    text = text.replace("\\", "/")
    return text[:64]

"""Why the node refuses an instance: one exception per reason, each mapped to a DIMSE status in
:mod:`service.net.dimse_status`."""

from __future__ import annotations


class IngestError(Exception):
    """An instance the node refuses; ``str(exc)`` is a short reason without patient data."""


class UndecodableDataset(IngestError):
    pass


class MissingAttribute(IngestError):
    pass


class MissingGeometry(MissingAttribute):
    pass


class InvalidIdentifier(IngestError):
    pass


class InvalidGeometry(IngestError):
    """Image plane values present but unusable: not finite, non-positive spacing, degenerate orientation."""


class PixelDataLengthMismatch(IngestError):
    """Native Pixel Data shorter than Rows x Columns x samples x frames x BitsAllocated say it must be."""


class ConflictingDuplicate(IngestError):
    """The SOP Instance UID is already stored in this study under another series."""


class SOPClassMismatch(IngestError):
    pass


class SOPInstanceMismatch(IngestError):
    pass


class ModalityMismatch(IngestError):
    pass


class SpoolFull(IngestError):
    """Free space is below the watermark (or the disk filled up mid-write); nothing was kept."""


class SpoolUnavailable(IngestError):
    """The spool could not be written (permissions, read-only or failing disk); nothing was kept."""


"""The QA report as a DICOM Encapsulated PDF: the PACS shows it beside the images and the RTSTRUCT.

Same study as the CT (Patient and General Study modules from the manifest's identifiers), its own series
(Modality ``DOC``), UIDs from service.dicomio.uids's rule on the result's content key: the same result gives
the same instance (a re-send replaces it), a new result a new one. The report's PDF bytes are deterministic
(no creation date inside), so the same UID never carries different bytes.

Modules (PS3.3 A.45.1): Patient, General Study, Encapsulated Document Series, General Equipment, SC Equipment,
Encapsulated Document, SOP Common. ``SourceInstanceSequence`` names the RTSTRUCT(s) the report describes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, EncapsulatedPDFStorage, ExplicitVRLittleEndian

from itvnode_version import __version__
from service.dicomio.output import MANUFACTURER, write_dataset
from service.dicomio.uids import output_uid

SERIES_NUMBER = 990  # + 100 per result version, like the RTSTRUCT's series numbers
FILE_PREFIX = "DOC"
TITLE = "itvnode QA report - review before clinical use"


def build_encapsulated_pdf(
    pdf: bytes,
    *,
    study_instance_uid: str,
    identifiers: Mapping[str, str],
    content_key: str,
    uid_prefix: str | None = None,
    version: int = 1,
    sources: Sequence[tuple[str, str]] = (),
    now: datetime | None = None,
) -> Dataset:
    """An Encapsulated PDF Storage instance of ``pdf`` in study ``study_instance_uid``.

    ``sources``: (SOP Class UID, SOP Instance UID) of the objects the report describes (the RTSTRUCTs).
    """
    if not pdf.startswith(b"%PDF"):
        raise ValueError("not a PDF document")
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    now = now or datetime.now(UTC)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    sop_uid = output_uid(uid_prefix, content_key, "qa-report", "instance")
    ds = Dataset()
    if any(not str(v).isascii() for v in identifiers.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(ds, key, str(identifiers.get(key, "") or ""))
    if identifiers.get("StudyDescription"):
        ds.StudyDescription = str(identifiers["StudyDescription"])
    ds.StudyInstanceUID = study_instance_uid
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = output_uid(uid_prefix, content_key, "qa-report", "series")
    ds.SeriesNumber = SERIES_NUMBER + 100 * (version - 1)
    ds.SeriesDescription = f"itvnode QA report v{version} - review before clinical use"[:64]
    # General Equipment, SC Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "itvnode 4DCT auto-contouring"
    ds.SoftwareVersions = f"itvnode {__version__}"
    ds.ConversionType = "WSD"  # workstation
    # Encapsulated Document
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the pages name the study key and ROIs, never the patient
    ds.DocumentTitle = TITLE
    ds.ConceptNameCodeSequence = DicomSequence([])
    if sources:
        items = []
        for cls, uid in sources:
            item = Dataset()
            item.ReferencedSOPClassUID = cls
            item.ReferencedSOPInstanceUID = uid
            items.append(item)
        ds.SourceInstanceSequence = DicomSequence(items)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")  # OB values have even length

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"ITVNODE_{__version__}"[:16]
    ds.file_meta = meta
    return ds


def write_encapsulated_pdf(ds: Dataset, out_dir: str | Path) -> Path:
    """``DOC.<SOPInstanceUID>.dcm`` under ``out_dir`` (atomic; a re-run overwrites the same name)."""
    return write_dataset(ds, out_dir, FILE_PREFIX)

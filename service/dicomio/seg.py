"""Optional DICOM SEG output (highdicom) for receivers that prefer label maps to contours.

One binary Segmentation per phase series: that phase's structures (``GTVp^P40`` ...) and the envelopes
(``ITV``), each a segment. highdicom validates the object while building it. UIDs follow the one rule of
:mod:`service.dicomio.uids`: the result's content key (every input used, algorithm, layout, settings) and the
phase series. highdicom is an optional dependency (extra ``seg``); it is imported when a SEG is built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from itvnode_version import __version__
from service.dicomio.geometry import Geometry
from service.dicomio.output import Algorithm, RoiStyle, write_dataset
from service.dicomio.uids import output_uid

log = logging.getLogger(__name__)


def _codes(name: str, interpreted_type: str) -> tuple[Any, Any]:
    """(segmented property category, type) for a structure: SNOMED CT codes for what we know, else generic."""
    from pydicom.sr.codedict import codes

    base = name.split("^")[0].split("_")[0].lower()
    if interpreted_type in ("GTV", "CTV", "PTV", "ITV") or base in ("gtvp", "gtv", "itv", "igtv"):
        return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm
    if interpreted_type == "EXTERNAL" or base in ("external", "body"):
        return codes.SCT.AnatomicalStructure, codes.SCT.EntireBody
    known = {"lung": codes.SCT.Lung, "heart": codes.SCT.Heart}
    return codes.SCT.AnatomicalStructure, known.get(base, codes.SCT.Organ)


def build_seg(
    *,
    study_key: str,
    source_files: Sequence[str | Path],
    geometry: Geometry,
    segments: Mapping[str, np.ndarray],
    styles: Mapping[str, RoiStyle] | None = None,
    algorithm: Algorithm | None = None,
    uid_prefix: str | None = None,
    series_number: int = 951,
    content_key: str | None = None,
) -> Dataset:
    """A binary SEG on the series ``source_files`` (read by :mod:`service.dicomio.volume` into ``geometry``).

    ``segments``: label -> bool (Z, Y, X) in the canonical axes of ``geometry``; empty ones are left out
    (a SEG segment must cover at least one frame) and logged. ``content_key``: the result's key
    (:func:`service.dicomio.rtstruct.result_content_key`, shared with its RTSTRUCT); default: the key of this
    series alone with the algorithm.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = algorithm or Algorithm()
    styles = styles or {}
    if content_key is None:
        from service.dicomio.rtstruct import result_content_key

        content_key = result_content_key(study_key=study_key, geometries=[geometry], references=None,
                                         algorithm=algorithm, layout="seg")
    by_uid = {}
    for f in source_files:
        ds = pydicom.dcmread(f)
        by_uid[str(ds.SOPInstanceUID)] = ds
    if len(set(geometry.sop_instance_uids)) != len(geometry.sop_instance_uids):
        raise ValueError("SEG output needs a single-frame source series (one instance per slice)")
    try:
        sources = [by_uid[u] for u in geometry.sop_instance_uids]
    except KeyError as exc:
        raise ValueError(f"source file for instance {exc} not given") from None

    kept = {k: np.asarray(v, dtype=bool) for k, v in segments.items() if np.asarray(v).any()}
    for k in segments.keys() - kept.keys():
        log.info(
            "study %s: SEG on series %s leaves out empty segment %s",
            study_key,
            geometry.series_instance_uid,
            k,
        )
    if not kept:
        raise ValueError("every segment is empty: no SEG to write")
    for k, v in kept.items():
        if v.shape != geometry.shape:
            raise ValueError(f"segment {k!r} has shape {v.shape}, expected (z, y, x) = {geometry.shape}")
    stack = np.stack(list(kept.values()), axis=-1)  # (Z, Y, X, S) canonical
    if geometry.flip_rows:  # back into the stored pixel order of the source images
        stack = stack[:, ::-1]
    if geometry.flip_cols:
        stack = stack[:, :, ::-1]
    version = f"{algorithm.model_version}; LoRA {algorithm.adapter_version}"[:64]
    ident = hd.AlgorithmIdentificationSequence(
        name=f"itvnode {algorithm.model}"[:64], version=version, family=codes.DCM.ArtificialIntelligence
    )
    descriptions = []
    for i, name in enumerate(kept, start=1):
        style = styles.get(name.split("^")[0], styles.get(name, RoiStyle()))
        category, prop = _codes(name, style.interpreted_type)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=i,
                segment_label=name,
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=ident,
                tracking_uid=output_uid(uid_prefix, content_key, "seg", geometry.series_instance_uid, name),
                tracking_id=name,
            )
        )
    entropy = [content_key, "seg", geometry.series_instance_uid]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.ascontiguousarray(stack.astype(np.uint8)),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=output_uid(uid_prefix, *entropy, "series"),
        series_number=series_number,
        sop_instance_uid=output_uid(uid_prefix, *entropy, "instance"),
        instance_number=1,
        manufacturer="itvnode",
        manufacturer_model_name="itvnode 4DCT auto-contouring",
        software_versions=f"itvnode {__version__}",
        device_serial_number="none",
        content_label="AUTOSEG",
        content_description="AUTOMATIC - review before clinical use",
    )
    seg.SeriesDescription = "itvnode SEG - review before clinical use"
    return seg


def write_seg(seg: Dataset, out_dir: str | Path) -> Path:
    """Write ``SEG.<SOPInstanceUID>.dcm`` under ``out_dir``."""
    return write_dataset(seg, out_dir, "SEG")

"""itvnode: a DICOM-RT node that contours 4DCT phases with SAM 3 + LoRA and sends back an ITV."""

from itvnode_version import __version__

__all__ = ["__version__"]

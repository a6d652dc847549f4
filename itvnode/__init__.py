"""itvnode: a DICOM-RT node that contours 4DCT phases with SAM 3 + LoRA and sends back an ITV."""

__version__ = "0.1.0"

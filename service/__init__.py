"""Everything DICOM and network. Never imports torch."""

"""DICOM networking: the Storage SCP, the C-STORE SCU, TLS, admission and the DIMSE status table."""

"""DICOM reading and writing: header scan, CT volumes, RTSTRUCT, SEG, encapsulated PDF, output UIDs."""

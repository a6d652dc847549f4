"""Numbers only: arrays in, masks out. Never imports pydicom; torch only in the SAM 3 and training modules."""

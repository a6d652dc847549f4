"""Numbers only: arrays in, masks out. Never imports pydicom. torch is imported lazily by the SAM 3 modules."""

"""Post-processing of per-phase masks: temporal filter, motion, connectivity, envelope (ITV), QA numbers."""

"""Fine-tuning SAM 3 with LoRA on annotated CT volumes, with hard negative mining (docs/training.md).

Numbers only: volumes arrive as numpy arrays (the DICOM / NIfTI readers live in ``service/``).
Modules: :mod:`.dataset` (volumes, targets, slice samples, patient split), :mod:`.sampler` (the hard-negative
weighted sampler), :mod:`.losses`, :mod:`.hard_negatives` (pixel candidates, periodic mining),
:mod:`.trainer` (the loop), :mod:`.manifest` (training.json).
"""

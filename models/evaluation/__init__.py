"""Evaluation report: Dice, HD95 and MSD per structure x phase and for the envelopes (ITV), zero-shot next to
adapted; median [IQR] tables (CSV + Markdown, :mod:`.scores`), the worst slices (:mod:`.worst_slices`),
volumes and motion (:mod:`.shapes`) and the figures (:mod:`.figures`)."""

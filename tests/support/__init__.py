"""What tests/ and bench/ share, imported as ``tests.support.<module>`` from the repository root (pytest's
``pythonpath``; ``python -m bench.x``): free ports (net), synthetic CT files (ctdata), the real RTSTRUCT peers
(rtstruct_peers), the previous implementations kept as references (threshold_previous, contours_previous,
rtstruct_previous) and the naive post-processing peer (postprocess_reference).

Nothing here imports pytest, so bench scripts can use it.
"""

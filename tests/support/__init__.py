"""Helpers shared by tests/ and bench/: ``from tests.support.net import free_port``,
``from tests.support.ctdata import ct_slice, make_ct, write_ct_series``.

Standard library, numpy and pydicom only; nothing here imports pytest, so bench scripts can use it.
"""

"""pynetdicom's process-wide ``_config`` switches that the node sets, each applied where it is needed."""

from __future__ import annotations

from pynetdicom import _config


def send_files_as_stored() -> None:
    """``send_c_store(path)`` sends the file bytes as stored, without decoding and re-encoding them.

    Process-wide; it only affects ``send_c_store()`` called with a path, which is what we want everywhere in
    this node. Applied by :func:`service.net.scu.send_files` before it associates.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True

"""The YAML configuration file: a mapping of flat setting names, or of groups holding them.

``temporal: {motion_mm: 25}`` is read as ``temporal_motion_mm: 25``: a key inside a group is the flat name
with the group's prefix (``temporal_``, ``qa_``, ``export_`` ...) or the flat name itself
(``network: {port: 104}``).
Groups are flattened here, in the file's own source, so the environment still wins over either form.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel


class ConfigFileError(ValueError):
    """The file is not a mapping of setting names (or of groups of them)."""


def flat_name(group: str, key: str, model: type[BaseModel], prefix: str) -> str:
    """The flat setting name ``key`` stands for inside ``group`` (ConfigFileError when none)."""
    for name in (prefix + key, key):
        if name in model.model_fields:
            return name
    raise ConfigFileError(f"setting '{group}.{key}': not a setting of the {group} group "
                          f"({', '.join(sorted(model.model_fields))})")


Groups = Mapping[str, tuple[type[BaseModel], str]]  # group name -> (its settings, its flat names' prefix)


def flatten_groups(data: Mapping[str, Any], groups: Groups) -> dict[str, Any]:
    """``data`` with every group mapping replaced by its flat keys; a key given both ways is an error."""
    out = {k: v for k, v in data.items() if k not in groups}
    for group, (model, prefix) in groups.items():
        values = data.get(group)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigFileError(f"setting {group!r}: a group is a mapping of its settings")
        for key, value in values.items():
            name = flat_name(group, str(key), model, prefix)
            if name in out:
                raise ConfigFileError(f"setting {name!r} is given twice: flat and as '{group}.{key}'")
            out[name] = value
    return out


def read_config_file(path: Path, groups: Groups) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: top level must be a mapping of setting names")
    return flatten_groups(data, groups)

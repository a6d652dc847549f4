"""The structured values settings hold: AE titles, DICOM TLS paths, C-STORE destinations, phase rules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

_AE_RE = re.compile(r"^[ -~]{1,16}$")
_DEST_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


def check_ae_title(value: str) -> str:
    """``value`` stripped, when it is a valid AE title (ValueError otherwise)."""
    value = value.strip()
    if not _AE_RE.match(value) or "\\" in value:
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable ASCII characters, no backslash")
    return value


class TLSSettings(BaseModel):
    """Paths for DICOM TLS. Enabled when ``cert`` and ``key`` are set."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None  # when set, peers must present a certificate signed by it
    require_client_cert: bool = True

    @property
    def enabled(self) -> bool:
        return self.cert is not None and self.key is not None


class Destination(BaseModel):
    """A C-STORE destination (PACS or TPS)."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TLSSettings | None = None

    _ae = field_validator("ae_title")(check_ae_title)

    @classmethod
    def parse(cls, text: str) -> Destination:
        m = _DEST_RE.match(text.strip())
        if not m:
            raise ValueError(f"destination {text!r} is not AE@host:port")
        return cls(ae_title=m["ae"], host=m["host"], port=int(m["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class PhaseRule(BaseModel):
    """A site rule: a regex on SeriesDescription whose named group ``pct`` is the phase percent."""

    pattern: str
    field: Literal["SeriesDescription", "ProtocolName", "ImageComments"] = "SeriesDescription"

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        rx = re.compile(v)
        if "pct" not in rx.groupindex:
            raise ValueError(f"phase rule {v!r} needs a named group (?P<pct>...)")
        return v

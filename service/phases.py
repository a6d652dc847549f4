"""Respiratory phase detection for one CT series: an ordered rule table, first match wins.

Order (see :func:`classify_series`):

1. ``(0020,9245)`` Nominal Percentage of Respiratory Phase, when the instance carries it.
2. Site rules (``settings.phase_rules``): a regex with a named group ``pct`` on SeriesDescription,
   ProtocolName or ImageComments. Checked before every built-in so a site can override them.
3. Reference series: ImageType containing AVERAGE / MIP / MINIP, or a description token (``AVG``,
   ``AVE``, ``Ave-IP``, ``Average``, ``MIP``, ``MinIP``, ``Min-IP``...). These are not phases.
4. Built-in description patterns: Siemens ``RespCT 3.0 B30f 50% Ex`` / ``0% In``; Philips / TCIA
   ``P4^P100^S300^I00008, Gated, 50.0%A`` and ``4DFBCT, Gated, 0.0%A`` (text may follow); ``T=50%``;
   a generic lone ``NN%``.

Never used: SeriesNumber (all ten TCIA 4D-Lung phases are SeriesNumber 1) and ``(0020,9241)``
(Nominal Percentage of *Cardiac* Phase).

Percent range: a phase percent is ``0 <= p < 100``. 100 % of a breathing cycle is 0 % of the next one,
phase-binned scanners label 0 %..90 %, and the "100 %" of amplitude binning is an amplitude, not a
cycle position. A description that reads 100 % (or more) is therefore not a phase; the study is not
guessed at — with fewer than two valid phases it is held by the assembler.

Cycle coverage (:func:`cycle_coverage`): a 4D set is treated only when its phases cover the breathing
cycle. The cycle has ``expected_phases`` phases on a regular percent grid (step ``100 / expected_phases``,
anchored at 0 % or at the first label, labels within ``min(1 %, step / 4)`` of a grid point, so vendor
rounding such as 12 % / 37 % / 62 % / 87 % of an 8-phase cycle still fits). When the labels do not fit that
grid, the grid is the coarsest one they all fit (20 labels every 5 % are a 20-phase cycle; 8 labels every
12.5 % an 8-phase cycle, which is still fewer than 10 expected). With ``expected_phases`` unset the labels'
own grid is the cycle. Grid points without a phase are *missing*; a study with missing phases (or fewer
than expected) is held by the assembler unless released or the site chose ``incomplete_cycle: process``.

A description holding several percentages (``0-90%``, ``0%-90%``, ``50% 75%``) or one that qualifies
an iterative-reconstruction / dose strength (``40% ASiR``, ``ASIR 30%``, ``Dose 50%``) is not a phase.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from service.manifest import Cycle

__all__ = [
    "SeriesKind",
    "SeriesClass",
    "SiteRule",
    "SeriesHeader",
    "classify_series",
    "compile_rules",
    "reference_kind",
    "cycle_coverage",
]


class SeriesKind(StrEnum):
    PHASE = "phase"
    REFERENCE = "reference"  # AVG / MIP / MinIP
    OTHER = "other"  # a CT that is neither (e.g. a free-breathing planning CT)


class SeriesHeader(Protocol):
    """The header fields phase detection reads (``service.spool.InstanceMeta`` has them)."""

    @property
    def series_description(self) -> str: ...
    @property
    def protocol_name(self) -> str: ...
    @property
    def image_comments(self) -> str: ...
    @property
    def image_type(self) -> tuple[str, ...]: ...
    @property
    def nominal_phase_percent(self) -> float | None: ...


@dataclass(frozen=True)
class SeriesClass:
    """What one series is. ``rule`` names the table row that decided; ``note`` explains rejections."""

    kind: SeriesKind
    percent: float | None = None  # set for PHASE
    reference: str | None = None  # "AVG" | "MIP" | "MinIP" for REFERENCE
    rule: str = ""
    label: str = ""  # the matched text, e.g. "50% Ex"
    note: str = ""


@dataclass(frozen=True)
class SiteRule:
    """A compiled site rule (plain form of ``service.settings.PhaseRule``)."""

    regex: re.Pattern[str]
    field: str = "SeriesDescription"


class _RuleLike(Protocol):
    @property
    def pattern(self) -> str: ...
    @property
    def field(self) -> str: ...


def compile_rules(rules: Iterable[_RuleLike]) -> list[SiteRule]:
    """Compile settings' ``PhaseRule`` objects (``pattern`` with a ``pct`` group, ``field``)."""
    out = []
    for r in rules:
        rx = re.compile(r.pattern, re.IGNORECASE)
        if "pct" not in rx.groupindex:
            raise ValueError(f"phase rule {r.pattern!r} needs a named group (?P<pct>...)")
        out.append(SiteRule(rx, r.field))
    return out


_NUM = r"(?P<pct>\d{1,3}(?:[.,]\d+)?)"

# Reference series. Word-ish boundaries: letters/digits must not continue the token ("AVGA", "MIPS").
_REF_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("MinIP", re.compile(r"(?<![a-z0-9])(min[-_ ]?ip|minimum[-_ ]intensity)(?![a-z0-9])", re.I)),
    ("MIP", re.compile(r"(?<![a-z0-9])(mip|max[-_ ]?ip|maximum[-_ ]intensity)(?![a-z0-9])", re.I)),
    ("AVG", re.compile(r"(?<![a-z0-9])(avg|ave|aver|average|ave[-_ ]?ip|avg[-_ ]?ip|aip|mean)(?![a-z0-9])",
                       re.I)),
]
_IMAGE_TYPE_REF = {"AVERAGE": "AVG", "AVG": "AVG", "MIP": "MIP", "MAXIP": "MIP", "MINIP": "MinIP",
                   "MIN_IP": "MinIP", "MAX_IP": "MIP"}

# Built-in phase patterns, most specific first.
_PHASE_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    # Siemens: "RespCT  3.0  B30f  50% Ex", "... 0% In"
    ("siemens", re.compile(rf"(?<![\d.,%-]){_NUM}\s*%\s*(?P<half>in|ex)(?![a-z])", re.I)),
    # Philips / TCIA 4D-Lung: "..., Gated, 50.0%A", "4DFBCT, Gated, 0.0%A  extra"
    ("philips", re.compile(rf"gated\s*[,;:]?\s*{_NUM}\s*%", re.I)),
    # "T=50%", "T = 50 %", "Phase=50%", "Phase 50%"
    ("t-equals", re.compile(rf"(?<![a-z])(?:t|phase|ph)\s*[=:]?\s*{_NUM}\s*%", re.I)),
    # a lone percentage anywhere
    ("generic", re.compile(rf"(?<![\d.,]){_NUM}\s*%", re.I)),
]
_PERCENT_ANY = re.compile(r"\d{1,3}(?:[.,]\d+)?\s*%")
_RANGE = re.compile(r"\d\s*%?\s*(?:-|–|to|\.\.)\s*\d{1,3}(?:[.,]\d+)?\s*%", re.I)
# A percentage that qualifies iterative reconstruction or dose, not the breathing cycle.
_NOT_PHASE = re.compile(
    r"\b(asir(-v)?|admire|safire|idose\d?|aidr|dlir|veo|ir|dose|ma|mas|kv|blend|contrast|overlap)\b", re.I
)


def _to_float(text: str) -> float:
    return float(text.replace(",", "."))


def reference_kind(description: str, image_type: Sequence[str]) -> str | None:
    """``"AVG"``, ``"MIP"`` or ``"MinIP"`` when the series is a derived reference, else None.

    ImageType values 3+ (``AVERAGE``, ``MIP``, ``MINIP``) decide alone; a description token decides too
    (``DERIVED`` alone is not enough: vendors mark resampled or reformatted phases DERIVED).
    """
    for value in image_type[2:] if len(image_type) > 2 else image_type:
        kind = _IMAGE_TYPE_REF.get(value.strip().upper())
        if kind:
            return kind
    for kind, rx in _REF_PATTERNS:
        if rx.search(description):
            return kind
    return None


def _percent_ok(p: float) -> bool:
    return 0.0 <= p < 100.0


def _phase_from_description(text: str) -> SeriesClass | None:
    """The built-in description rows; None when nothing phase-like is present."""
    if not _PERCENT_ANY.search(text):
        return None
    if _RANGE.search(text):
        return SeriesClass(SeriesKind.OTHER, rule="range", note=f"percent range in {text!r}, not one phase")
    if len(_PERCENT_ANY.findall(text)) > 1:
        return SeriesClass(SeriesKind.OTHER, rule="ambiguous", note=f"several percentages in {text!r}")
    for name, rx in _PHASE_PATTERNS:
        m = rx.search(text)
        if not m:
            continue
        if name == "generic" and _NOT_PHASE.search(text):
            return SeriesClass(SeriesKind.OTHER, rule="not-phase",
                               note=f"percentage qualifies reconstruction/dose in {text!r}")
        pct = _to_float(m["pct"])
        label = m.group(0).strip()
        if not _percent_ok(pct):
            return SeriesClass(SeriesKind.OTHER, rule=name, label=label,
                               note=f"{pct:g}% is outside the phase range 0 <= p < 100")
        return SeriesClass(SeriesKind.PHASE, percent=pct, rule=name, label=label)
    return None


def classify_series(header: SeriesHeader, site_rules: Sequence[SiteRule] = ()) -> SeriesClass:
    """Classify a series from the header of one of its instances (first matching row wins)."""
    nominal = header.nominal_phase_percent
    if nominal is not None:
        pct = float(nominal)
        if _percent_ok(pct):
            return SeriesClass(SeriesKind.PHASE, percent=pct, rule="(0020,9245)", label=f"{pct:g}%")
        return SeriesClass(SeriesKind.OTHER, rule="(0020,9245)",
                           note=f"(0020,9245) {pct:g}% is outside the phase range 0 <= p < 100")

    fields = {
        "SeriesDescription": header.series_description or "",
        "ProtocolName": header.protocol_name or "",
        "ImageComments": header.image_comments or "",
    }
    for i, rule in enumerate(site_rules):
        m = rule.regex.search(fields.get(rule.field, ""))
        if m and m.group("pct") is not None:
            try:
                pct = _to_float(m.group("pct"))
            except ValueError:
                continue
            name = f"site[{i}]"
            if not _percent_ok(pct):
                return SeriesClass(SeriesKind.OTHER, rule=name, label=m.group(0),
                                   note=f"{pct:g}% is outside the phase range 0 <= p < 100")
            return SeriesClass(SeriesKind.PHASE, percent=pct, rule=name, label=m.group(0))

    desc = fields["SeriesDescription"]
    ref = reference_kind(desc, tuple(header.image_type or ()))
    if ref is not None:
        return SeriesClass(SeriesKind.REFERENCE, reference=ref, rule="reference", label=ref)

    found = _phase_from_description(desc)
    if found is not None:
        return found
    return SeriesClass(SeriesKind.OTHER, rule="none", note="no respiratory phase in the header")


CYCLE_TOL_PERCENT = 1.0  # a label this close to a grid point is that grid point (vendor rounding)


def _circular(a: float, b: float) -> float:
    d = abs(a - b) % 100.0
    return min(d, 100.0 - d)


def _grid_anchor(pcts: Sequence[float], m: int) -> float | None:
    """The anchor (0 % or the first label) of an ``m``-phase grid every label lies on, else None."""
    step = 100.0 / m
    tol = min(CYCLE_TOL_PERCENT, step / 4)
    for anchor in (0.0, pcts[0]):
        if all(_circular(p - anchor, step * round((p - anchor) / step)) <= tol for p in pcts):
            return anchor
    return None


def cycle_coverage(percents: Iterable[float], expected_phases: int | None) -> Cycle:
    """How the distinct phase ``percents`` cover the breathing cycle (rule in the module docstring)."""
    pcts = sorted({round(float(p) % 100.0, 3) for p in percents})
    n = len(pcts)
    if n == 0:
        return Cycle(expected=expected_phases or 0)
    m: int | None = None
    if expected_phases and _grid_anchor(pcts, expected_phases) is not None:
        m = expected_phases
    else:
        m = next((k for k in range(max(n, 2), 101) if _grid_anchor(pcts, k) is not None), None)
    if m is None:  # no regular grid at all
        return Cycle(expected=max(expected_phases or 0, n), off_grid=pcts)
    anchor = _grid_anchor(pcts, m)
    assert anchor is not None
    step = 100.0 / m
    tol = min(CYCLE_TOL_PERCENT, step / 4)
    grid = [round((anchor + k * step) % 100.0, 3) for k in range(m)]
    present = sorted(g for g in grid if any(_circular(g, p) <= tol for p in pcts))
    missing = sorted(g for g in grid if g not in present)
    note = None
    expected = m
    if expected_phases and m < expected_phases:
        expected = expected_phases
        note = (f"the labels lie on a {round(step, 2):g} % grid ({m}-phase cycle) but {expected_phases} "
                "phases are expected (setting expected_phases)")
    return Cycle(expected=expected, present=present, missing=missing, note=note)

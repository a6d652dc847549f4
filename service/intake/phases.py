"""Respiratory phase detection for one CT series: an ordered rule table, first match wins.

Order (see :func:`classify_series`):

1. ``(0020,9245)`` Nominal Percentage of Respiratory Phase, when the instance carries it.
2. Site rules (``settings.phase_rules``): a regex with a named group ``pct`` on SeriesDescription,
   ProtocolName or ImageComments (optionally a group ``dir`` matching ``In``/``Ex`` for amplitude
   binning). Checked before every built-in so a site can override them.
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

Classification and ordering share the percent rules above, so they stay in one module (just over 400 lines).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from service.store.manifest import Cycle

__all__ = [
    "SeriesKind",
    "SeriesClass",
    "SiteRule",
    "SeriesHeader",
    "PhaseOrder",
    "classify_series",
    "compile_rules",
    "descriptions_seen",
    "order_phases",
    "reference_kind",
    "cycle_coverage",
]


class SeriesKind(StrEnum):
    PHASE = "phase"
    REFERENCE = "reference"  # AVG / MIP / MinIP
    OTHER = "other"  # a CT that is neither (e.g. a free-breathing planning CT)


class SeriesHeader(Protocol):
    """The header fields phase detection reads (``service.store.spool.InstanceMeta`` has them)."""

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
    direction: str = ""  # "In" | "Ex" when the label names the half-cycle (Siemens)
    roi_label: str = ""  # set by order_phases: the per-phase ROI suffix ("P40", "In50")


@dataclass(frozen=True)
class SiteRule:
    """A compiled site rule (plain form of ``service.setting_values.PhaseRule``)."""

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
_PHASE_NUMBER = re.compile(r"(?<![a-z])(?:phase|ph)\s*[#:=]?\s*(?P<n>\d{1,3})(?![\d.,]|\s*%)", re.I)

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
    # GE (Advantage 4D) / Canon: "Phase 50%", "Ph50%", "T=50%", "T = 50 %", "Phase=50%", "50% Phase"
    ("t-equals", re.compile(rf"(?<![a-z])(?:t|phase|ph)\s*[=:]?\s*{_NUM}\s*%", re.I)),
    ("percent-phase", re.compile(rf"(?<![\d.,]){_NUM}\s*%\s*(?:phase|ph)(?![a-z])", re.I)),
    # Canon / Toshiba (Aquilion 4D, assumed): "4D 50%", "Resp 50%", "RESP_50%", "BH 4D 50.0%"
    ("canon", re.compile(rf"(?<![a-z])(?:4d|resp|respiratory|gate|gating)[\s_-]*{_NUM}\s*%", re.I)),
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
        m = _PHASE_NUMBER.search(text)
        if m is None or len(_PHASE_NUMBER.findall(text)) > 1:
            return None
        # "Phase 3" / "Phase 30": an index or a percent, decided per set by order_phases
        return SeriesClass(SeriesKind.PHASE, percent=float(m["n"]), rule="phase-number", label=m.group(0))
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
        if name == "siemens":
            direction = "In" if m["half"].lower() == "in" else "Ex"
            if not 0.0 <= pct <= 100.0:  # 100 % is an amplitude (amplitude binning), decided per set
                return SeriesClass(SeriesKind.OTHER, rule=name, label=label,
                                   note=f"{pct:g}% {direction} is outside 0..100 %")
            return SeriesClass(SeriesKind.PHASE, percent=pct, rule=name, label=label, direction=direction)
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
            half = (m.groupdict().get("dir") or "").strip().lower()
            if half in ("in", "ex", "i", "e", "insp", "exp"):  # a site rule for amplitude binning
                direction = "In" if half.startswith("i") else "Ex"
                if 0.0 <= pct <= 100.0:
                    return SeriesClass(SeriesKind.PHASE, percent=pct, rule=name, label=m.group(0),
                                       direction=direction)
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


# --------------------------------------------------------------------------------------------- one set


@dataclass(frozen=True)
class PhaseOrder:
    """The phases of one candidate 4D set in breathing order, each re-labelled (``percent`` = its position
    in the cycle, ``roi_label`` = the ROI suffix), and why the set is ambiguous (``problems``)."""

    ordered: list[tuple[int, SeriesClass]]  # (index into the input, resolved class), breathing order
    binning: str  # "phase" | "amplitude" | "mixed"
    problems: list[str]


def _fmt(p: float) -> str:
    return f"{p:g}"


def _phase_convention_ok(c: SeriesClass) -> bool:
    """A Siemens In/Ex label that fits *phase* binning (0 % end-inhale, Ex on the way to 50 %, In after)."""
    p = c.percent or 0.0
    if p >= 100.0:
        return False
    if p in (0.0, 50.0):
        return True
    return (c.direction == "Ex") == (0.0 < p < 50.0)


def _amplitude(c: SeriesClass) -> tuple[float, SeriesClass]:
    """Sort key and resolved class of an amplitude-binned label: ``NN% In`` at NN/2, ``NN% Ex`` at 100 - NN/2
    (inhale from end-exhale 0 % up to 100 %, then exhale back down: 0 % In first, 0 % Ex last)."""
    a = c.percent or 0.0
    key = a / 2.0 if c.direction == "In" else 100.0 - a / 2.0
    position = key % 100.0
    return key, replace(c, percent=position, roi_label=f"{c.direction}{_fmt(a)}")


def _phase_numbers(items: list[tuple[int, SeriesClass]],
                   expected: int | None) -> tuple[list[tuple[int, SeriesClass]], list[str]]:
    """``Phase N`` without a percent sign: percents when every N is a multiple of 5 and one is >= 10
    (``Phase 0`` .. ``Phase 90``), else indices of an ``expected`` (or as many as seen) phase cycle numbered
    from 0, or from 1 when 0 is absent and the highest index equals the cycle length."""
    values = [c.percent or 0.0 for _, c in items]
    if all(v == int(v) for v in values) and all(v % 5 == 0 for v in values) and max(values) >= 10 \
            and max(values) < 100:
        return [(i, replace(c, roi_label=f"P{_fmt(c.percent or 0.0)}")) for i, c in items], []
    cycle = max(expected or 0, len(values))
    base = 1 if 0 not in values and max(values) == cycle else 0
    if any(v != int(v) or not 0 <= v - base < cycle for v in values):
        seen = ", ".join(sorted({c.label for _, c in items}))
        return [], [f"'Phase N' labels ({seen}) are neither percents nor indices of a {cycle}-phase cycle"]
    out = []
    for i, c in items:
        pct = round(((c.percent or 0.0) - base) * 100.0 / cycle, 4)
        out.append((i, replace(c, percent=pct, roi_label=f"P{_fmt(pct)}",
                               note=f"phase index {c.percent:g} of {cycle} (numbered from {base})")))
    return out, []


def order_phases(classes: Sequence[SeriesClass], expected_phases: int | None = None,
                 names: Sequence[str] | None = None) -> PhaseOrder:
    """Put the phase series of one set in breathing order and decide what their labels mean.

    * Siemens ``NN% In`` / ``NN% Ex``: *amplitude* binning when a percentage appears with both directions,
      a label reads 100 %, or a direction contradicts phase binning (``25% In``, ``75% Ex``); then
      ``percent`` becomes the cycle position (In: NN/2, Ex: 100 - NN/2, so 0 % In = 0 = end-exhale) and
      ``roi_label`` keeps the label (``In50``). Otherwise phase binning: ``percent`` = NN, ``P<NN>``.
    * ``Phase N`` (no percent sign): see :func:`_phase_numbers`.
    * everything else: ``percent`` as read, ``P<percent>``.

    Problems (the set is held): several labelling schemes mixed in one set, the same label twice.
    ``names`` (one per class, e.g. series UID and description) name the series in those reasons.
    """
    items = [(i, c) for i, c in enumerate(classes) if c.kind is SeriesKind.PHASE and c.percent is not None]
    problems: list[str] = []
    directional = [(i, c) for i, c in items if c.direction]
    numbered = [(i, c) for i, c in items if c.rule == "phase-number" and not c.direction]
    plain = [(i, c) for i, c in items if not c.direction and c.rule != "phase-number"]
    families = [name for name, group in (("Siemens 'NN% In/Ex'", directional), ("'Phase N'", numbered),
                                         ("percent", plain)) if group]
    binning = "phase"
    keyed: list[tuple[float, int, SeriesClass]] = []
    if len(families) > 1:
        binning = "mixed"
        seen = ", ".join(sorted({repr(c.label) for _, c in items}))
        problems.append(f"phase labels mix {' and '.join(families)} naming ({seen}); set a site phase rule")
    if directional:
        amplitude = (any(not _phase_convention_ok(c) for _, c in directional)
                     or len({c.percent for _, c in directional}) < len({(c.percent, c.direction)
                                                                      for _, c in directional}))
        if amplitude:
            binning = "amplitude" if binning != "mixed" else binning
            for i, c in directional:
                key, r = _amplitude(c)
                keyed.append((key, i, r))
        else:
            keyed += [(c.percent or 0.0, i, replace(c, roi_label=f"P{_fmt(c.percent or 0.0)}"))
                      for i, c in directional]
    if numbered:
        resolved, more = _phase_numbers(numbered, expected_phases)
        problems += more
        keyed += [(c.percent or 0.0, i, c) for i, c in resolved]
    keyed += [(c.percent or 0.0, i, replace(c, roi_label=f"P{_fmt(c.percent or 0.0)}")) for i, c in plain]
    keyed.sort(key=lambda t: (t[0], t[1]))
    by_label: dict[str, list[tuple[int, SeriesClass]]] = {}
    for _, i, c in keyed:
        by_label.setdefault(c.roi_label, []).append((i, c))
    for lab, group in by_label.items():
        if len(group) > 1:
            listed = ", ".join(names[i] if names else repr(c.label) for i, c in group)
            shown = f"{lab[1:]}%" if lab.startswith("P") else f"{lab[2:]}% {lab[:2]}"
            problems.append(f"{len(group)} series claim phase {shown}: {listed}")
    return PhaseOrder([(i, c) for _, i, c in keyed], binning, problems)


_LONG_DIGITS = re.compile(r"\d{6,}")


def descriptions_seen(descriptions: Iterable[str], limit: int = 8, width: int = 40) -> str:
    """The series descriptions of a set for a hold reason: distinct, each cut at ``width`` characters, runs of
    six or more digits masked (dates, IDs: no patient data in reasons), at most ``limit`` listed."""
    seen: list[str] = []
    for d in descriptions:
        text = _LONG_DIGITS.sub("#", " ".join((d or "").split()))
        text = text if len(text) <= width else text[: width - 1] + "…"
        if text not in seen:
            seen.append(text)
    shown = ", ".join(repr(t) for t in seen[:limit]) or "(no SeriesDescription)"
    return shown + (f" and {len(seen) - limit} more" if len(seen) > limit else "")

"""Parse Nsight Compute (ncu) CSV output into per-launch metric dicts.

Two layouts exist and both are read:

- long (``--page details``, and ``--page raw`` of old versions): one row per metric, with
  columns "ID", "Kernel Name", ..., "Section Name", "Metric Name", "Metric Unit",
  "Metric Value" (then rule columns, which metric rows leave off and rule rows fill with an
  empty metric name). Metric names are display names ("Duration") for section metrics and
  raw names ("gpu__time_duration.sum") for ones requested with ``--metrics``.
- wide (``--page raw``): one row per launch, one column per raw metric name, with a second
  header row of units (its identification cells are empty).

The source page (``--page source --print-source sass``, :func:`parse_ncu_source_csv`) is a
third layout: a ``"Kernel Name","<name>"`` row, then a header row starting with "Address",
"Source", then one row per SASS instruction with its PC-sampling counts (the SourceCounters
section: "Warp Stall Sampling (All Samples)", one ``stall_<reason>`` column per reason, and
the same ``(Not Issued)``) and execution counts.

Tolerant by design: ncu's own lines (``==PROF==``, ``==WARNING==``) and anything the profiled
program printed are skipped; identification columns are found by name (they differ between
versions: some have "Kernel Time", newer ones "Block Size", "Grid Size", "Device", "CC");
numbers may carry thousands separators ("1,234.56"); units are normalised to base units
(seconds, bytes, bytes/second, hertz; ncu's Kbyte/Mbyte/Gbyte are powers of 1000).
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field

__all__ = [
    "KernelRecord",
    "Metric",
    "NcuCsvError",
    "SourceLine",
    "parse_ncu_csv",
    "parse_ncu_source_csv",
    "parse_value",
    "to_base_units",
]

_ID_COLUMNS = (
    "ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Kernel Time", "Context",
    "Stream", "Block Size", "Grid Size", "Device", "CC", "Section Name", "Metric Name",
    "Metric Unit", "Metric Value", "Rule Name", "Rule Type", "Rule Description",
    "Estimated Speedup Type", "Estimated Speedup",
)


class NcuCsvError(ValueError):
    """The text holds no ncu CSV table (or one with no launch in it)."""


@dataclass
class Metric:
    """One metric of one launch: the printed value and unit, and the base-unit number."""

    name: str
    unit: str
    raw: str  # as printed
    value: float | None  # in ``base_unit``; None if not a number ("(128, 1, 1)", "n/a")
    base_unit: str
    section: str | None = None


@dataclass
class KernelRecord:
    """One profiled kernel launch."""

    id: str
    kernel: str
    info: dict[str, str] = field(default_factory=dict)  # the identification columns
    metrics: dict[str, Metric] = field(default_factory=dict)

    def get(self, *names: str) -> Metric | None:
        """The first of ``names`` present (raw name or display name)."""
        for n in names:
            m = self.metrics.get(n)
            if m is not None:
                return m
        return None

    def value(self, *names: str) -> float | None:
        """Base-unit value of the first of ``names`` present with a numeric value."""
        for n in names:
            m = self.metrics.get(n)
            if m is not None and m.value is not None:
                return m.value
        return None


_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def parse_value(text: str) -> float | None:
    """ncu's printed number -> float; None if it is not one. Thousands separators (",", and
    the narrow spaces some locales print) are dropped; "n/a" and tuples stay non-numeric."""
    s = text.strip().replace("\u202f", "").replace("\u00a0", "")
    if "," in s and not s.startswith("("):
        s = s.replace(",", "")
    if not _NUM.match(s):
        return None
    v = float(s)
    return v if math.isfinite(v) else None


_PREFIX = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1.0, "K": 1e3, "k": 1e3, "M": 1e6, "G": 1e9,
           "T": 1e12, "P": 1e15}
# Base quantities ncu prefixes; "second" also appears as the denominator of rates.
_BASES = ("byte", "second", "hz", "cycle", "inst", "sector", "request", "warp", "thread",
          "block", "register", "flop")
_ALIASES = {"ns": "nsecond", "us": "usecond", "ms": "msecond", "s": "second", "b": "byte",
            "hertz": "hz"}


def _split_prefix(unit: str) -> tuple[float, str]:
    u = _ALIASES.get(unit, unit)
    low = u.lower()
    for base in _BASES:
        if low.endswith(base):
            pre = u[: len(u) - len(base)]
            if pre in _PREFIX:
                return _PREFIX[pre], base
    return 1.0, u


def to_base_units(value: float, unit: str) -> tuple[float, str]:
    """Scale ``value`` printed in ``unit`` to base units: "usecond" -> second, "Kbyte" ->
    byte, "Gbyte/second" -> byte/second, "cycle/nsecond" -> cycle/second, "Ghz" -> hz,
    "Kbyte/block" -> byte/block. Unknown units pass through unchanged."""
    unit = (unit or "").strip()
    if not unit or unit == "%":
        return value, unit
    num, _, den = unit.partition("/")
    f_num, b_num = _split_prefix(num)
    if not den:
        return value * f_num, b_num
    f_den, b_den = _split_prefix(den)
    return value * f_num / f_den, f"{b_num}/{b_den}"


def _metric(name: str, unit: str, raw: str, section: str | None) -> Metric:
    v = parse_value(raw)
    if v is None:
        return Metric(name, unit, raw, None, unit, section)
    bv, bu = to_base_units(v, unit)
    return Metric(name, unit, raw, bv, bu, section)


def _table_rows(text: str) -> list[list[str]]:
    """The CSV rows from the ncu header on; lines that are not CSV rows are dropped."""
    lines = text.splitlines()
    start = next(
        (i for i, ln in enumerate(lines)
         if ln.lstrip().startswith('"ID"') and '"Kernel Name"' in ln),
        None,
    )
    if start is None:
        raise NcuCsvError(
            "no ncu CSV table found (expected a header row starting with \"ID\" and naming "
            "\"Kernel Name\"; was ncu run with --csv?)"
        )
    body = [ln for ln in lines[start:] if ln.lstrip().startswith('"')]
    return [r for r in csv.reader(io.StringIO("\n".join(body))) if r]


def parse_ncu_csv(text: str) -> list[KernelRecord]:
    """Every launch in ncu's CSV output, in order. Raises :class:`NcuCsvError` if the text
    holds no table or the table no launch."""
    rows = _table_rows(text)
    header = [h.strip() for h in rows[0]]
    col = {h: i for i, h in enumerate(header)}
    records: dict[str, KernelRecord] = {}

    def record(row: list[str]) -> KernelRecord:
        rid = row[col["ID"]].strip()
        rec = records.get(rid)
        if rec is None:
            info = {h: row[i] for h, i in col.items()
                    if h in _ID_COLUMNS and i < len(row)
                    and h not in ("Section Name", "Metric Name", "Metric Unit", "Metric Value",
                                  "Rule Name", "Rule Type", "Rule Description",
                                  "Estimated Speedup Type", "Estimated Speedup")}
            rec = KernelRecord(rid, row[col["Kernel Name"]] if "Kernel Name" in col else "",
                               info)
            records[rid] = rec
        return rec

    if "Metric Name" in col and "Metric Value" in col:
        sec_i, unit_i = col.get("Section Name"), col.get("Metric Unit")
        # Metric rows stop after "Metric Value" (the rule columns are left off), rule rows have
        # no metric name: read what each row has, skip what is not a metric.
        need = max(col["ID"], col["Metric Name"], col["Metric Value"]) + 1
        for row in rows[1:]:
            if len(row) < need or row[: len(header)] == header:
                continue
            name = row[col["Metric Name"]].strip()
            if not name:
                continue
            rec = record(row)
            section = row[sec_i].strip() if sec_i is not None else None
            m = _metric(name, row[unit_i].strip() if unit_i is not None else "",
                        row[col["Metric Value"]], section or None)
            # A display name can repeat across sections ("Duration"); keep the first under the
            # bare name and every one under "Section/Name".
            rec.metrics.setdefault(name, m)
            if section:
                rec.metrics.setdefault(f"{section}/{name}", m)
    else:
        metric_cols = [(i, h) for i, h in enumerate(header) if h not in _ID_COLUMNS]
        units: dict[int, str] = {}
        for row in rows[1:]:
            if len(row) <= col["ID"] or row == header:
                continue
            row = row + [""] * (len(header) - len(row))
            if not row[col["ID"]].strip():  # the units row
                units = {i: row[i].strip() for i, _ in metric_cols}
                continue
            rec = record(row)
            for i, h in metric_cols:
                rec.metrics.setdefault(h, _metric(h, units.get(i, ""), row[i], None))
    if not records:
        raise NcuCsvError("the ncu CSV table holds no kernel launch")
    return list(records.values())


@dataclass
class SourceLine:
    """One SASS instruction of the source page: where the sampled warps were."""

    index: int  # position in the kernel's SASS (see parse_ncu_source_csv)
    address: str
    sass: str
    samples: int  # warp-state samples at this PC (all of them)
    not_issued: int  # of which the warp did not issue
    executed: int  # warp-level executions
    stalls: dict[str, int] = field(default_factory=dict)  # reason -> samples (all samples)


_SAMPLES = "Warp Stall Sampling (All Samples)"


def _count(row: list[str], i: int | None) -> int:
    if i is None or i >= len(row):
        return 0
    v = parse_value(row[i])
    return int(v) if v is not None else 0


def _sass_index(address: str, before: list[SourceLine]) -> int:
    # sm_70+ instructions are 16 bytes: the offset from the page's first row, so a trimmed page
    # keeps the real positions; one past the previous row where the address is not hex or does
    # not move forward, so positions always increase.
    if not before:
        return 0
    nxt = before[-1].index + 1
    try:
        idx = (int(address, 16) - int(before[0].address, 16)) // 16 + before[0].index
    except ValueError:
        return nxt
    return idx if idx >= nxt else nxt


def parse_ncu_source_csv(text: str) -> list[tuple[str, list[SourceLine]]]:
    """``ncu --import R --csv --page source --print-source sass`` -> one (kernel name, its
    SASS lines in order) per profiled launch, in the page's order (a kernel profiled twice
    appears twice). ``index`` counts 16-byte instructions from the launch's first row (the
    kernel's first instruction on an untrimmed page). Raises :class:`NcuCsvError` if the text
    holds no such table (ncu's own lines before it are skipped) or the table has no
    "Warp Stall Sampling (All Samples)" column."""
    out: list[tuple[str, list[SourceLine]]] = []
    name = None
    col: dict[str, int] = {}
    lines = [ln for ln in text.splitlines() if ln.lstrip().startswith('"')]
    for row in csv.reader(io.StringIO("\n".join(lines))):
        if not row:
            continue
        head = row[0].strip()
        if head == "Kernel Name":
            name = row[1].strip() if len(row) > 1 else ""
            col = {}
        elif head == "Address" and len(row) > 1 and row[1].strip() == "Source":
            col = {h.strip(): i for i, h in enumerate(row)}
            if _SAMPLES not in col:
                raise NcuCsvError(
                    f"the source page has no {_SAMPLES!r} column (was the report collected "
                    "with the SourceCounters section?)"
                )
            out.append((name or "", []))
        elif col:
            dest = out[-1][1]
            stalls = {}
            for h, i in col.items():
                if h.startswith("stall_") and "(Not Issued)" not in h:
                    n = _count(row, i)
                    if n:
                        stalls[h[len("stall_"):]] = n
            dest.append(SourceLine(
                index=_sass_index(row[0].strip(), dest),
                address=row[0].strip(),
                sass=row[col["Source"]].strip() if col["Source"] < len(row) else "",
                samples=_count(row, col[_SAMPLES]),
                not_issued=_count(row, col.get("Warp Stall Sampling (Not-issued Samples)")),
                executed=_count(row, col.get("Instructions Executed")),
                stalls=stalls,
            ))
    out = [(k, v) for k, v in out if v]
    if not out:
        raise NcuCsvError(
            "no ncu source table found (expected a header row starting with \"Address\", "
            "\"Source\"; was it printed with --page source --csv --print-source sass from a "
            "report with the SourceCounters section?)"
        )
    return out

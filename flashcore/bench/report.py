"""Writers: console table, JSON (every row + environment), README markdown, PNG plot.

The JSON is the record; markdown and PNG are views of it and can be re-made from it on any
machine (``flashcore bench --from-json results.json --plot``), so a GPU machine without
matplotlib loses nothing.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from .providers import PROVIDERS
from .runner import OK, BenchResult, Row
from .suites import Case

__all__ = [
    "SCHEMA",
    "format_console",
    "load_json",
    "markdown",
    "merge_results",
    "output_stem",
    "plot_layout",
    "result_to_json",
    "write_json",
    "write_markdown",
    "write_plot",
]

SCHEMA = "flashcore-bench/1"

# Short cell text for rows that have no number (markdown pivots).
_STATUS_CELL = {
    "unsupported": "–", "mismatch": "✗", "unfused-fallback": "fb", "error": "err",
    "skipped": "skip",
}
_LEGEND = ("– unsupported by that provider, ✗ wrong output (not timed), fb Flex fell back to "
           "its unfused path (not timed), err error, skip over the time guard")


def _provider_rank(name: str) -> int:
    return PROVIDERS.index(name) if name in PROVIDERS else len(PROVIDERS)


def _fmt(x: float | None, spec: str = ".1f", empty: str = "") -> str:
    return empty if x is None or not math.isfinite(x) else format(x, spec)


def _num(x: float | None, empty: str = "") -> str:
    """Adaptive precision: 1234, 123.4, 12.34, 0.00123 (CPU runs have tiny TFLOP/s)."""
    if x is None or not math.isfinite(x):
        return empty
    ax = abs(x)
    return f"{x:.0f}" if ax >= 1000 else f"{x:.1f}" if ax >= 10 else f"{x:.3g}"


# How the "GPU time" column was measured, by Timer.method.
_METHOD_TEXT = {
    "cuda-graph": "CUDA-graph replay (many calls per graph) with a cold L2 (rotating input "
                  "sets larger than the L2)",
    "cpu-wall": "CPU wall clock (--interpret: exercises the pipeline; the times mean nothing)",
}


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


def _finite(x):
    """JSON has no inf/nan: write them as strings (load_json turns them back)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _unfinite(x):
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):
        return float(x)
    if isinstance(x, dict):
        return {k: _unfinite(v) for k, v in x.items()}
    return x


def result_to_json(result: BenchResult) -> dict:
    return _finite({
        "schema": SCHEMA,
        "env": result.env,
        "settings": result.settings,
        "peak_tflops_bf16": result.peak_tflops,
        "rows": [r.to_dict() for r in result.rows],
    })


def write_json(result: BenchResult, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result_to_json(result), indent=1, allow_nan=False) + "\n")
    return path


def load_json(path: Path) -> BenchResult:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a flashcore bench result (schema {data.get('schema')!r},"
                         f" expected {SCHEMA!r})")
    return BenchResult(
        rows=[Row.from_dict(_unfinite(r)) for r in data["rows"]],
        env=data.get("env", {}), settings=data.get("settings", {}),
        peak_tflops=data.get("peak_tflops_bf16"),
    )


def merge_results(results: Sequence[BenchResult]) -> BenchResult:
    """One result from several runs on one GPU (e.g. suites run separately). A (case, provider)
    measured twice keeps the later run's row. The environment is the first run's, with every
    run's commit; the peak is kept only if all runs measured the same one (each row's % of
    peak was computed against its own run's peak), and each run is listed in
    ``settings["merged_from"]``."""
    if not results:
        raise ValueError("nothing to merge")
    gpus = {r.env.get("gpu") for r in results}
    if len(gpus) > 1:
        raise ValueError(f"results come from different devices {sorted(map(str, gpus))}; "
                         "one table must not mix cards")
    rows: dict[tuple[Case, str], Row] = {}
    for res in results:
        for row in res.rows:
            rows[(row.case, row.provider)] = row
    first = results[0]
    settings = dict(first.settings)
    env = dict(first.env)
    peak = first.peak_tflops
    if len(results) > 1:
        settings["merged_from"] = [
            {"date": r.env.get("date"), "git_commit": r.env.get("git_commit"),
             "peak_tflops_bf16": r.peak_tflops,
             "suites": sorted({row.case.suite for row in r.rows})}
            for r in results
        ]
        commits = list(dict.fromkeys(str(r.env.get("git_commit", "?"))[:7] for r in results))
        env["git_commit"] = "+".join(commits)
        if len({r.peak_tflops for r in results}) > 1:
            peak = None
        # One order note for the merged table: a single one if all runs agree, else "mixed".
        orders = {(r.settings.get("order", "registry"), r.settings.get("gap_s", 0.0) or 0.0)
                  for r in results}
        if len(orders) > 1:
            settings["order"], settings["gap_s"] = "mixed", 0.0
        if len({r.settings.get("rounds", 1) for r in results}) > 1:
            settings["rounds"] = "mixed"
        if len({r.settings.get("wall_rounds") for r in results}) > 1:
            settings.pop("wall_rounds", None)  # mixed: the plain text claims nothing more
    return BenchResult(list(rows.values()), env, settings, peak)


def output_stem(env: dict, tag: str = "") -> str:
    """``<gpu-short>-<YYYY-MM-DD>[-<tag>]``, e.g. ``h100-2026-11-25``."""
    stem = f"{env.get('gpu_short', 'gpu')}-{str(env.get('date', 'undated'))[:10]}"
    return f"{stem}-{tag}" if tag else stem


# ---------------------------------------------------------------------------------------------
# Console
# ---------------------------------------------------------------------------------------------


def _method(result: BenchResult) -> str:
    m = str(result.settings.get("timer", "?"))
    return _METHOD_TEXT.get(m, m)


def format_console(result: BenchResult) -> str:
    """Fixed-width table of every row; rows without a time show status and reason."""
    head = (f"{'case':<34} {'provider':<16} {'GPU us':>10} {'p10-p90 us':>17} {'wall us':>9} "
            f"{'TFLOP/s':>8} {'%peak':>6} {'xSDPA':>6} {'wall xSDPA':>10}")
    lines = [head, "-" * len(head)]
    prev = None
    for r in result.rows:
        label = r.case.label() if r.case != prev else ""
        prev = r.case
        if r.status == OK and r.gpu is not None:
            spread = f"{_num(r.gpu.p10_us)}-{_num(r.gpu.p90_us)}"
            lines.append(
                f"{label:<34} {r.provider:<16} {_num(r.gpu.median_us):>10} {spread:>17} "
                f"{_num(r.wall.median_us if r.wall else None):>9} {_num(r.tflops):>8} "
                f"{_num(r.pct_peak):>6} {_fmt(r.speedup_vs_sdpa, '.2f'):>6} "
                f"{_fmt(r.wall_speedup_vs_sdpa, '.2f'):>10}"
                + (f"  [{r.gpu.method}]" if r.gpu.method.startswith("cuda-events") else "")
            )
        else:
            err = ""
            if r.status == "mismatch" and r.max_err is not None and r.tol is not None:
                err = f" (err {r.max_err:.3g} > tol {r.tol:.3g})"
            lines.append(f"{label:<34} {r.provider:<16} {r.status}{err}: {r.reason[:110]}")
    s = result.settings
    lines += [
        "",
        f"GPU us: per call, median (p10-p90) of {s.get('reps', '?')} reps{_rounds_text(s)}; "
        f"{_method(result)}.",
        f"wall us: host time per eager call ({_wall_text(s)}), what a launch-bound loop "
        "pays per call.",
        f"%peak: of the bf16 matmul measured in this run ({_num(result.peak_tflops, 'n/a')} "
        "TFLOP/s). xSDPA: SDPA default's time / this time (> 1 is faster).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _env_line(result: BenchResult) -> str:
    e = result.env
    parts = [f"**{e.get('gpu', '?')}**"]
    if e.get("sm_count"):
        parts.append(f"{e['sm_count']} SMs")
    clocks = e.get("clocks")
    if isinstance(clocks, dict) and clocks.get("clocks.max.sm"):
        parts.append(f"max SM clock {clocks['clocks.max.sm']} MHz")
    if e.get("driver"):
        parts.append(f"driver {e['driver']}")
    parts.append(f"torch {e.get('torch', '?')}, triton {e.get('triton', '?')}, "
                 f"CUDA {e.get('cuda')}, cuDNN {e.get('cudnn')}")
    parts.append(f"commit {str(e.get('git_commit', '?'))[:40]}, {str(e.get('date', '?'))[:10]}")
    return "; ".join(parts)


def _causal(c: Case) -> str:
    return "causal" if c.causal else "non-causal"


def _list_table(rows: list[Row]) -> list[str]:
    shapes = {(r.case.b, r.case.hq, r.case.hkv, r.case.sq, r.case.sk, r.case.d, r.case.dtype)
              for r in rows}
    show_shape = len(shapes) > 1
    out = [("| Shape " if show_shape else "")
           + "| Mask | Provider | GPU µs | p10–p90 µs | Wall µs/call | TFLOP/s | % peak | × SDPA |",
           ("|---" if show_shape else "") + "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        shape = f"| {r.case.label().replace(' causal', '')} " if show_shape else ""
        if r.status == OK and r.gpu is not None:
            cells = [_num(r.gpu.median_us), f"{_num(r.gpu.p10_us)}–{_num(r.gpu.p90_us)}",
                     _num(r.wall.median_us if r.wall else None), _num(r.tflops),
                     _num(r.pct_peak), _fmt(r.speedup_vs_sdpa, ".2f")]
        else:
            cells = [r.status, "", "", "", "", ""]
        out.append(f"{shape}| {_causal(r.case)} | {r.provider} | " + " | ".join(cells) + " |")
    return out


def _cell(r: Row | None) -> str:
    if r is None:
        return ""
    if r.status == OK and r.tflops is not None:
        return f"{r.tflops:.0f}" if r.tflops >= 10 else _num(r.tflops)
    return _STATUS_CELL.get(r.status, r.status)


def _pivot_table(rows: list[Row], x: str) -> list[str]:
    """TFLOP/s with ``x`` ('sq' or 'd') across; one line per (mask, other shape, provider)."""
    xs = sorted({getattr(r.case, x) for r in rows})
    xname = {"sq": "S", "d": "D"}[x]

    def key(r: Row):
        c = r.case
        return (c.causal, c.d if x != "d" else 0, c.hq // c.hkv, _provider_rank(r.provider),
                r.provider)

    lines: dict[tuple, dict[int, Row]] = {}
    for r in sorted(rows, key=key):
        lines.setdefault(key(r), {})[getattr(r.case, x)] = r
    out = ["| Mask | " + ("D | " if x != "d" else "") + "Provider | "
           + " | ".join(f"{xname}={_k(v) if x == 'sq' else v}" for v in xs) + " |",
           "|---|" + ("---|" if x != "d" else "") + "---|" + "---:|" * len(xs)]
    for k, by_x in lines.items():
        causal, d, ratio, _, prov = k
        out.append(f"| {'causal' if causal else 'non-causal'} | " + (f"{d} | " if x != "d" else "")
                   + f"{prov} | " + " | ".join(_cell(by_x.get(v)) for v in xs) + " |")
    return out


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _suite_title(suite: str, rows: list[Row], x: str | None) -> str:
    c = rows[0].case
    if suite == "mission":
        title = f"mission: B{c.b} H{c.hq} S{c.sq} D{c.d} {c.dtype}"
    elif suite == "sweep":
        title = (f"sweep {c.dtype}: B·S = {c.b * c.sq} tokens, hidden {c.hq * c.d} "
                 "(H = hidden / D)")
    elif suite == "gqa":
        title = f"gqa {c.dtype}: Hq {c.hq}, Hkv {c.hkv}, D {c.d}, B·S = {c.b * c.sq} tokens"
    elif suite == "headdims":
        title = f"headdims {c.dtype}: B{c.b} H{c.hq} S{c.sq}"
    else:
        title = f"{suite} {c.dtype}"
    return title + (f", TFLOP/s by {'S' if x == 'sq' else 'D'}" if x else "")


def _wall_text(settings: dict) -> str:
    """How the eager wall time was taken (results before the interleaved wall rounds carry no
    ``wall_rounds`` key: each provider's rounds ran back to back)."""
    if settings.get("wall_rounds") == "interleaved":
        return ("median of the quietest of 5 rounds, the rounds interleaved with the case's "
                "other providers")
    return "median of the quietest of 5 rounds"


def _rounds_text(settings: dict) -> str:
    """How the repetitions were split: one block per provider, or interleaved rounds."""
    n = settings.get("rounds", 1)
    if n == "mixed":
        return " (one block per provider in some merged runs, interleaved rounds in others)"
    if not isinstance(n, int) or n <= 1:
        return ""
    return (f" ({n} rounds interleaved with the case's other providers, the order reversing "
            "every round)")


def _order_note(settings: dict) -> str:
    """The provider order and idle gap, when a run did not use the defaults."""
    order, gap = settings.get("order", "registry"), settings.get("gap_s", 0.0) or 0.0
    if order == "registry" and not gap:
        return ""
    ran = {"reverse": "in reverse registry order (SDPA last)",
           "alternate": "in registry order on odd cases and reversed on even ones",
           "mixed": "in different orders or with different idle gaps in the merged runs"}
    note = f" Providers ran {ran.get(order, 'in registry order (SDPA first)')}"
    return note + (f", with a {gap:g} s idle gap before each timed round." if gap else ".")


def _clock_note(rows: list[Row]) -> str:
    """Per provider, the SM clock NVML saw during the timed replays (median of the rows'
    medians, lowest and highest sample) and every clock-event reason: a timing is comparable
    only with the clock it ran at."""
    by_prov: dict[str, list[dict]] = {}
    for r in rows:
        clk = (r.gpu_state or {}).get("sm_clock_mhz")
        if clk:
            by_prov.setdefault(r.provider, []).append(r.gpu_state)
    if not by_prov:
        return ""
    parts = []
    reasons: set[str] = set()
    for prov, states in by_prov.items():
        med = statistics.median(s["sm_clock_mhz"]["median"] for s in states)
        lo = min(s["sm_clock_mhz"]["min"] for s in states)
        hi = max(s["sm_clock_mhz"]["max"] for s in states)
        parts.append(f"{prov} {med:.0f} MHz ({lo:.0f}-{hi:.0f})")
        for s in states:
            reasons.update(s.get("clock_reasons") or [])
    why = f"; clock-event reasons seen: {', '.join(sorted(reasons))}" if reasons else ""
    return (" SM clock during the timed replays (NVML, median over rows, lowest-highest "
            f"sample): {'; '.join(parts)}{why}.")


def markdown(result: BenchResult) -> str:
    """README section: environment line, then per suite a table (mission and custom shapes as
    a list with µs, wall µs, TFLOP/s, % peak, × SDPA; sweep/gqa as TFLOP/s by S, headdims by
    D, one table per dtype)."""
    out = [f"Measured on {_env_line(result)}.", ""]
    for run in result.settings.get("merged_from") or []:
        out.append(
            f"- suites {', '.join(run['suites'])}: commit {str(run['git_commit'])[:7]}, "
            f"bf16 matmul peak {_num(run['peak_tflops_bf16'], 'n/a')} TFLOP/s"
        )
    if result.settings.get("merged_from"):
        out.append("")
    out += [
        f"GPU time: median per call over {result.settings.get('reps', '?')} repetitions"
        f"{_rounds_text(result.settings)}, by {_method(result)}. Wall: host time per eager "
        f"call from Python ({_wall_text(result.settings)}). TFLOP/s "
        f"counts 4·B·H·Sq·Sk·D (half for causal). % peak: of the bf16 matmul measured in the "
        f"same run ({_num(result.peak_tflops, 'per run, above')} TFLOP/s). × SDPA: SDPA "
        "default's time / "
        f"this time (> 1 is faster). Every row's output was checked against the reference "
        f"before it was timed." + _order_note(result.settings) + _clock_note(result.rows),
    ]
    by_suite: dict[str, list[Row]] = {}
    for r in result.rows:
        by_suite.setdefault(r.case.suite, []).append(r)
    pivots_used = False
    for suite, rows in by_suite.items():
        for dtype in dict.fromkeys(r.case.dtype for r in rows):
            sub = [r for r in rows if r.case.dtype == dtype]
            x = ("sq" if len({r.case.sq for r in sub}) > 1
                 else "d" if len({r.case.d for r in sub}) > 1 else None)
            if suite == "mission" or x is None:
                x = None
                sub.sort(key=lambda r: (r.case.causal, _provider_rank(r.provider)))
                table = _list_table(sub)
            else:
                pivots_used = True
                table = _pivot_table(sub, x)
            out += ["", f"#### {_suite_title(suite, sub, x)}", "", *table]
    if pivots_used:
        out += ["", _LEGEND]
    return "\n".join(out) + "\n"


def write_markdown(result: BenchResult, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(result))
    return path


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def plot_layout(result: BenchResult) -> tuple[list, list, dict[tuple, list[Row]], bool]:
    """The PNG's panels: (row keys (dtype, causal), column keys (suite, D, GQA ratio), rows per
    (column key, row key), curves). With curves, only groups spanning several S are plotted
    (TFLOP/s vs S); without any (mission, one shape), every group as bars per provider."""
    groups: dict[tuple, list[Row]] = {}
    for r in result.rows:
        if r.status != OK or r.tflops is None:
            continue
        c = r.case
        groups.setdefault(((c.suite, c.d, c.hq // c.hkv), (c.dtype, c.causal)), []).append(r)
    curves = {k: v for k, v in groups.items() if len({r.case.sq for r in v}) > 1}
    if curves:
        groups = curves
    cols = list(dict.fromkeys(k[0] for k in groups))
    rws = list(dict.fromkeys(k[1] for k in groups))  # run order: fp16 before bf16
    return rws, cols, groups, bool(curves)


def write_plot(result: BenchResult, path: Path) -> bool:
    """PNG: TFLOP/s vs S, one panel per (suite and head dim) x (dtype, causal), one line per
    provider. Results without an S sweep (mission, one shape) get bars per provider instead.
    Returns False (nothing written) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    rws, cols, groups, curves = plot_layout(result)
    rws, cols = rws or [("", False)], cols or [("none", 0, 1)]  # nothing ran: an empty frame
    fig = Figure(figsize=(max(4.2 * len(cols), 8.0), 3.2 * len(rws) + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rws), len(cols), squeeze=False, sharey=True)
    colors = {p: f"C{i}" for i, p in enumerate(PROVIDERS)}
    handles: dict[str, object] = {}
    for i, rk in enumerate(rws):
        for j, ck in enumerate(cols):
            ax = axes[i][j]
            rows = groups.get((ck, rk))
            if not rows:
                ax.set_visible(False)
                continue
            (suite, d, ratio), (dtype, causal) = ck, rk
            provs = sorted({r.provider for r in rows}, key=_provider_rank)
            if curves:
                for prov in provs:
                    pts = sorted((r.case.sq, r.tflops) for r in rows if r.provider == prov)
                    (h,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                                   color=colors.get(prov), label=prov, markersize=3)
                    handles.setdefault(prov, h)
                xs = sorted({r.case.sq for r in rows})
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [_k(x) for x in xs])
                ax.minorticks_off()
                ax.set_xlabel("sequence length S", fontsize=8)
            else:
                vals = [max(r.tflops for r in rows if r.provider == p) for p in provs]
                bars = ax.bar(range(len(provs)), vals, color=[colors.get(p) for p in provs])
                for prov, bar in zip(provs, bars, strict=True):
                    handles.setdefault(prov, bar)
                ax.set_xticks(range(len(provs)), provs, rotation=30, ha="right")
            gqa = f" GQA {ratio}:1" if ratio > 1 else ""
            shape = "" if curves else f" S{rows[0].case.sq}"
            ax.set_title(f"{suite} D{d}{gqa}{shape} {dtype} "
                         f"{'causal' if causal else 'non-causal'}", fontsize=9)
            ax.set_ylabel("TFLOP/s", fontsize=8)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=7)
    # One y range for all panels, set once at the end: set_ylim(bottom=0) per panel would freeze
    # the shared axis at the first panel's data and clip the taller curves of the others.
    top = max((r.tflops for rows in groups.values() for r in rows if r.tflops), default=1.0)
    axes[0][0].set_ylim(0, top * 1.08)
    if handles and curves:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncol=min(len(handles), 7), fontsize=8)
    e = result.env
    fig.suptitle(f"FlashCore forward attention on {e.get('gpu', '?')}\n"
                 f"bf16 matmul peak {_num(result.peak_tflops, 'per run')} TFLOP/s (same run), "
                 f"{str(e.get('date', ''))[:10]}, commit {str(e.get('git_commit', ''))[:40]}",
                 fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True

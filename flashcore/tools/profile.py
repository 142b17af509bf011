"""``flashcore profile``: Nsight Compute report of exactly one FlashCore kernel launch.

Re-runs a small driver (:mod:`flashcore.tools.profile_driver`) under ``ncu``: the driver
warms the kernel up (compile, caches, clocks) and launches it once more; ncu profiles only
that last launch, selected by kernel name and ``--launch-skip <warmup> --launch-count 1``.
ncu never touches the card's clocks (``--clock-control none``: the numbers are those of the
card as it runs) and flushes caches before each replay pass (``--cache-control all``: cold L2).

Then reads the report back as CSV (``--page raw``), prints duration, SM and tensor-pipe
utilisation, DRAM throughput and bytes, occupancy, registers and shared memory, the top warp
stall reasons and the kernel's place on the roofline, and writes it all as JSON (with every
raw metric). ``--from-csv`` summarises an existing CSV instead (no GPU needed).

``--source N`` also collects ncu's SourceCounters section (PC sampling), reads the source page
back (``--page source --print-source sass``) and prints where the sampled warps were: the
stall mix of each region the SASS splits into at its ``setmaxnreg`` instructions (the
partitions of a warp-specialised kernel: producer, consumers) and the N hottest instructions.
A kernel-wide stall mix hides that: in the Hopper kernel the producer warp, which is meant to
wait, holds a third of the samples and most of the "long scoreboard" ones.
``--source-csv FILE`` summarises a saved source page of the same launch (with ``--from-csv``,
no GPU). The split at ``setmaxnreg`` is a heuristic on the code layout.

Exit status: 0 on success, 2 when ncu is missing, cannot read the counters, or profiled
nothing, or when a source view was asked for and could not be made (the JSON is written
then, with ``source_error``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..info import parse_shape
from .hardware import GpuSpec, gpu_spec_for
from .ncu import KernelRecord, NcuCsvError, SourceLine, parse_ncu_csv, parse_ncu_source_csv

__all__ = [
    "BASIC_METRICS",
    "KERNEL_NAMES",
    "NCU_FALLBACK_DIRS",
    "STALL_REASONS",
    "ProfileProblem",
    "add_arguments",
    "attention_flops",
    "build_import_command",
    "build_ncu_command",
    "build_source_import_command",
    "find_ncu",
    "format_source_summary",
    "main",
    "metric_list",
    "source_summary",
    "summarize",
]

# Entry points per backend: the Triton backend launches the Gluon Hopper kernel on sm_90 when
# its config says so, the tl.dot kernel otherwise.
KERNEL_NAMES = {"triton": ("_attn_fwd_kernel", "_attn_fwd_hopper_kernel"),
                "cuda": ("flashcore_attn_fwd",)}


def _kernel_regex(backend: str) -> str:
    return "regex:^(" + "|".join(KERNEL_NAMES[backend]) + ")"

# Warp stall reasons of the Kernel Profiling Guide (sm_70 and later), as
# smsp__average_warps_issue_stalled_<reason>_per_issue_active.ratio: the average number of
# cycles a warp spends stalled for that reason per issued instruction.
STALL_REASONS = (
    "barrier", "branch_resolving", "dispatch_stall", "drain", "imc_miss", "lg_throttle",
    "long_scoreboard", "math_pipe_throttle", "membar", "mio_throttle", "misc",
    "no_instruction", "not_selected", "selected", "short_scoreboard", "sleeping",
    "tex_throttle", "wait",
)
_STALL_FMT = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"

# Raw metric names the summary reads (the "basic" set: one short replay).
TENSOR_HMMA = "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
TENSOR_GMMA = "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"
BASIC_METRICS = (
    "gpu__time_duration.sum",
    "gpc__cycles_elapsed.avg.per_second",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "dram__bytes.sum.per_second",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "sm__maximum_warps_per_active_cycle_pct",
    "launch__registers_per_thread",
    "launch__shared_mem_per_block_static",
    "launch__shared_mem_per_block_dynamic",
    "launch__shared_mem_per_block_driver",
    "launch__block_size",
    "launch__grid_size",
    "launch__waves_per_multiprocessor",
    TENSOR_HMMA,
    "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
    *(_STALL_FMT.format(r) for r in STALL_REASONS),
)

# quantity -> candidate names: raw metric names first, then the details page's display names,
# so a CSV recorded with --page details reads as well.
_SOL = "GPU Speed Of Light Throughput/"
_Q: dict[str, tuple[str, ...]] = {
    "duration": ("gpu__time_duration.sum", _SOL + "Duration", "Duration"),
    "sm_frequency": ("gpc__cycles_elapsed.avg.per_second", _SOL + "SM Frequency",
                     "SM Frequency"),
    "sm_throughput_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed",
                          _SOL + "Compute (SM) Throughput", "Compute (SM) Throughput"),
    # "Memory Throughput" is also a byte/s metric of Memory Workload Analysis: section first.
    "memory_throughput_pct": ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
                              _SOL + "Memory Throughput"),
    "dram_throughput_pct": ("dram__throughput.avg.pct_of_peak_sustained_elapsed",
                            _SOL + "DRAM Throughput", "DRAM Throughput"),
    "dram_read": ("dram__bytes_read.sum",),
    "dram_write": ("dram__bytes_write.sum",),
    "dram_total": ("dram__bytes.sum",),
    "dram_bandwidth": ("dram__bytes.sum.per_second",),
    "achieved_occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active",
                               "Achieved Occupancy"),
    "theoretical_occupancy_pct": ("sm__maximum_warps_per_active_cycle_pct",
                                  "Theoretical Occupancy"),
    "registers_per_thread": ("launch__registers_per_thread", "Registers Per Thread"),
    "smem_static": ("launch__shared_mem_per_block_static", "Static Shared Memory Per Block"),
    "smem_dynamic": ("launch__shared_mem_per_block_dynamic", "Dynamic Shared Memory Per Block"),
    "smem_driver": ("launch__shared_mem_per_block_driver", "Driver Shared Memory Per Block"),
    "waves": ("launch__waves_per_multiprocessor", "Waves Per SM"),
    "fma_pipe_pct": ("sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",),
}


def metric_list(metrics: str = "basic", cc: tuple[int, int] = (9, 0)) -> list[str]:
    """Raw metrics to collect: BASIC_METRICS (plus the wgmma pipe on sm_90+, where it
    exists; naming it on an older card is an ncu error), plus any comma-separated extras."""
    out = list(BASIC_METRICS)
    if cc >= (9, 0):
        out.append(TENSOR_GMMA)
    if metrics not in ("basic", "full"):
        out += [m.strip() for m in metrics.split(",") if m.strip() and m.strip() not in out]
    return out


def build_ncu_command(
    shape: tuple[int, int, int, int, int, int],
    backend: str,
    dtype: str = "fp16",
    causal: bool = False,
    metrics: str = "basic",
    warmup: int = 3,
    report: str | Path = "flashcore-profile",
    info: str | Path | None = None,
    ncu: str = "ncu",
    python: str = sys.executable,
    cc: tuple[int, int] = (9, 0),
    source: bool = False,
) -> list[str]:
    """The ncu command that profiles the one launch after ``warmup`` and writes ``report``
    (.ncu-rep). ``metrics``: "basic" (BASIC_METRICS), "full" (ncu's full section set as well)
    or a comma list added to the basic set. ``shape``: (B, Hq, Sq, D, Hkv, Sk). ``source``:
    collect the SourceCounters section too (PC sampling per SASS instruction; the full set has
    it already)."""
    b, hq, sq, d, hkv, sk = shape
    cmd = [
        ncu,
        "--clock-control", "none",  # never lock or change the card's clocks
        "--cache-control", "all",  # flush caches before each replay pass: cold L2
        "--target-processes", "all",
        "--kernel-name", _kernel_regex(backend),
        "--launch-skip", str(warmup),
        "--launch-count", "1",
        "--export", str(report),
        "--force-overwrite",
    ]
    if metrics == "full":
        cmd += ["--set", "full"]
    elif source:
        cmd += ["--section", "SourceCounters"]
    cmd += ["--metrics", ",".join(metric_list(metrics, cc))]
    cmd += [
        python, "-m", "flashcore.tools.profile_driver",
        "--shape", f"{b},{hq},{sq},{d},{hkv},{sk}", "--backend", backend, "--dtype", dtype,
        "--warmup", str(warmup),
    ]
    if causal:
        cmd.append("--causal")
    if info is not None:
        cmd += ["--info", str(info)]
    return cmd


def _report_file(report: str | Path) -> str:
    # ncu --export adds the suffix; --import needs it.
    rep = str(report)
    return rep if rep.endswith(".ncu-rep") else rep + ".ncu-rep"


def build_import_command(report: str | Path, ncu: str = "ncu") -> list[str]:
    """The command that prints a saved report as CSV, one row per launch, base units."""
    return [ncu, "--import", _report_file(report), "--csv", "--page", "raw", "--print-units",
            "base"]


def build_source_import_command(report: str | Path, ncu: str = "ncu") -> list[str]:
    """The command that prints a saved report's source page: one CSV row per SASS instruction
    with its PC-sampling counts."""
    return [ncu, "--import", _report_file(report), "--csv", "--page", "source",
            "--print-source", "sass"]


# Where the CUDA toolkit puts ncu when it is not on PATH.
NCU_FALLBACK_DIRS = ("/usr/local/cuda/bin",)


def find_ncu(explicit: str | None = None) -> str | None:
    """ncu from --ncu, $NCU, PATH, $CUDA_HOME/bin or :data:`NCU_FALLBACK_DIRS`."""
    if explicit:
        return explicit if (os.path.isfile(explicit) or shutil.which(explicit)) else None
    for c in (os.environ.get("NCU"), shutil.which("ncu")):
        if c and (os.path.isfile(c) or shutil.which(c)):
            return c
    home = os.environ.get("CUDA_HOME")
    for d in ([str(Path(home, "bin"))] if home else []) + list(NCU_FALLBACK_DIRS):
        if os.access(Path(d, "ncu"), os.X_OK):
            return str(Path(d, "ncu"))
    return None


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileProblem:
    b: int
    hq: int
    sq: int
    d: int
    hkv: int
    sk: int
    dtype: str
    causal: bool

    @property
    def elem_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    def describe(self) -> str:
        return (f"{self.dtype} B={self.b} Hq={self.hq} Hkv={self.hkv} Sq={self.sq} "
                f"Sk={self.sk} D={self.d}{' causal' if self.causal else ''}")


def attention_flops(p: ProfileProblem) -> int:
    """Matmul FLOPs: 2 (QK^T and PV) x 2 (multiply-add) x D per visible (query, key) pair.
    Causal counts exactly the pairs top-left causal masking keeps (row i sees keys <= i)."""
    if not p.causal:
        pairs = p.sq * p.sk
    else:
        n = min(p.sq, p.sk)
        pairs = n * (n + 1) // 2 + max(p.sq - p.sk, 0) * p.sk
    return 4 * p.b * p.hq * p.d * pairs


def ideal_dram_bytes(p: ProfileProblem) -> int:
    """Read Q, K, V once and write O once: the least traffic any kernel can have. Measured
    DRAM bytes can come out a little below it: output still held in L2 (50 MB on H100) when
    the kernel ends has not been written back yet."""
    return p.elem_bytes * p.d * (2 * p.b * p.hq * p.sq + 2 * p.b * p.hkv * p.sk)


def _stalls(rec: KernelRecord) -> list[dict[str, Any]]:
    vals = {}
    for name, m in rec.metrics.items():
        if name.startswith("smsp__average_warps_issue_stalled_") and m.value is not None:
            reason = name[len("smsp__average_warps_issue_stalled_"):].split("_per_issue")[0]
            vals[reason] = m.value
    # "selected" is the cycle a warp issues, not a stall.
    stalls = {r: v for r, v in vals.items() if r != "selected"}
    total = sum(stalls.values())
    ranked = sorted(stalls.items(), key=lambda kv: kv[1], reverse=True)
    return [
        {"reason": r, "cycles_per_issue": v, "share": (v / total if total > 0 else None)}
        for r, v in ranked
    ]


def _tensor_pipe(rec: KernelRecord) -> dict[str, Any]:
    """The busier of the two tensor-pipe metrics ncu has on sm_90: ..._gmma_... (Hopper's
    warpgroup MMA, wgmma) and ..._hmma_... (mma.sync; on sm_80 the only one). Which instruction
    a kernel issues is in the gate's ``mma`` column. On the H100 recording in tests/data/tools
    the gmma metric read "n/a" while the hmma one showed a wgmma kernel busy (48.8 %), so the
    hmma metric is not taken to mean mma.sync."""
    hmma, gmma = rec.value(TENSOR_HMMA), rec.value(TENSOR_GMMA)
    out: dict[str, Any] = {"hmma_pct": hmma, "gmma_pct": gmma}
    if gmma is not None and (hmma is None or gmma >= hmma):
        out.update(pct=gmma, pipe="gmma", metric=TENSOR_GMMA)
    elif hmma is not None:
        out.update(pct=hmma, pipe="hmma", metric=TENSOR_HMMA)
    else:
        out.update(pct=None, pipe=None, metric=None)
    return out


def summarize(
    rec: KernelRecord, problem: ProfileProblem | None, spec: GpuSpec
) -> dict[str, Any]:
    """The report of one launch: the headline numbers, the top stalls and the roofline."""
    q = {k: rec.value(*names) for k, names in _Q.items()}
    dram = None
    if q["dram_read"] is not None and q["dram_write"] is not None:
        dram = q["dram_read"] + q["dram_write"]
    elif q["dram_total"] is not None:
        dram = q["dram_total"]
    smem = None
    if q["smem_static"] is not None or q["smem_dynamic"] is not None:
        smem = (q["smem_static"] or 0.0) + (q["smem_dynamic"] or 0.0)
    tensor = _tensor_pipe(rec)
    out: dict[str, Any] = {
        "kernel": rec.kernel,
        "launch_id": rec.id,
        "block_size": rec.info.get("Block Size"),
        "grid_size": rec.info.get("Grid Size"),
        "duration_s": q["duration"],
        "sm_frequency_hz": q["sm_frequency"],
        "sm_throughput_pct": q["sm_throughput_pct"],
        "memory_throughput_pct": q["memory_throughput_pct"],
        "tensor_pipe": tensor,
        "fma_pipe_pct": q["fma_pipe_pct"],
        "dram_throughput_pct": q["dram_throughput_pct"],
        "dram_bytes": dram,
        "dram_read_bytes": q["dram_read"],
        "dram_write_bytes": q["dram_write"],
        "dram_bandwidth_bytes_per_s": q["dram_bandwidth"],
        "achieved_occupancy_pct": q["achieved_occupancy_pct"],
        "theoretical_occupancy_pct": q["theoretical_occupancy_pct"],
        "registers_per_thread": q["registers_per_thread"],
        "smem_per_block_bytes": smem,
        "smem_static_bytes": q["smem_static"],
        "smem_dynamic_bytes": q["smem_dynamic"],
        "smem_driver_bytes": q["smem_driver"],
        "waves_per_sm": q["waves"],
        "stalls": _stalls(rec),
        "gpu_spec": {
            "name": spec.name, "dram_bytes_per_s": spec.dram_bytes_per_s,
            "tensor_fp16_flops": spec.tensor_fp16_flops, "tensor_tf32_flops":
            spec.tensor_tf32_flops, "fp32_flops": spec.fp32_flops, "source": spec.source,
        },
        "roofline": None,
    }
    if problem is not None:
        flops = attention_flops(problem)
        uses_tc = problem.dtype != "fp32" or bool(tensor["pct"])
        peak = spec.peak_flops(problem.dtype, uses_tc)
        roof: dict[str, Any] = {
            "flops": flops,
            "ideal_dram_bytes": ideal_dram_bytes(problem),
            "peak_flops": peak,
            "peak_kind": ("fp16/bf16 tensor" if problem.dtype != "fp32"
                          else "tf32 tensor" if uses_tc else "fp32 FMA"),
            "peak_dram_bytes_per_s": spec.dram_bytes_per_s,
            "ridge_flop_per_byte": peak / spec.dram_bytes_per_s,
        }
        if q["duration"]:
            roof["achieved_flops"] = flops / q["duration"]
            roof["pct_of_peak"] = 100.0 * roof["achieved_flops"] / peak
        if dram:
            ai = flops / dram
            attainable = min(peak, ai * spec.dram_bytes_per_s)
            roof.update(
                arithmetic_intensity=ai,
                bound="compute" if ai >= roof["ridge_flop_per_byte"] else "memory",
                attainable_flops=attainable,
                dram_vs_ideal=dram / roof["ideal_dram_bytes"],
            )
            if "achieved_flops" in roof:
                roof["pct_of_attainable"] = 100.0 * roof["achieved_flops"] / attainable
        out["roofline"] = roof
    return out


def _fmt(v: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def _setmaxnreg(sass: str) -> int | None:
    # "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xf0" -> 240; None for any other instruction.
    if "USETMAXREG" not in sass:
        return None
    try:
        return int(sass.replace(",", " ").split()[-1], 0)
    except ValueError:
        return None


def _mix(lines: list[SourceLine]) -> tuple[int, dict[str, int]]:
    total, reasons = 0, {}
    for ln in lines:
        total += ln.samples
        for r, n in ln.stalls.items():
            reasons[r] = reasons.get(r, 0) + n
    return total, reasons


def source_summary(lines: list[SourceLine], top: int = 20) -> dict[str, Any]:
    """Where the sampled warps were, from the source page of one launch.

    The SASS is split into regions at each ``setmaxnreg`` (USETMAXREG). A warp-specialised
    partition sets its register budget on entry and on exit, so in the Gluon Hopper kernel the
    producer's and each consumer's code are regions of their own, with short stretches of
    partition glue between them (a heuristic on the code layout, not ncu's attribution).

    Returns {"samples": total, "instructions": rows, "regions": [...], "top": [...]}; a region
    is {"first", "last" (SASS indices), "setmaxnreg" (the budget it starts with, None for the
    entry), "samples", "share" (of all samples), "reasons": [{"reason", "samples", "share" (of
    the region's, None without samples)}] most first}; ``top`` lists the ``top`` instructions
    with the most samples as {"index", "address", "sass", "samples", "not_issued", "share",
    "executed", "region" (position in "regions"), "reasons": {reason: samples}}.
    "selected" among the reasons is the warp issuing, not a stall."""
    total = sum(ln.samples for ln in lines)
    regions: list[dict[str, Any]] = []
    region_of: list[int] = []  # row position -> region
    start, regs = 0, None
    bounds = [i for i, ln in enumerate(lines) if _setmaxnreg(ln.sass) is not None]
    for cut in [*bounds, len(lines)]:
        if cut > start:
            n, reasons = _mix(lines[start:cut])
            ranked = sorted(reasons.items(), key=lambda kv: kv[1], reverse=True)
            region_of += [len(regions)] * (cut - start)
            regions.append({
                "first": lines[start].index, "last": lines[cut - 1].index, "setmaxnreg": regs,
                "samples": n, "share": n / total if total else None,
                "reasons": [{"reason": r, "samples": c, "share": c / n if n else None}
                            for r, c in ranked],
            })
        if cut < len(lines):
            start, regs = cut, _setmaxnreg(lines[cut].sass)
    hot = sorted(range(len(lines)), key=lambda i: lines[i].samples, reverse=True)[:max(top, 0)]
    return {
        "samples": total,
        "instructions": len(lines),
        "regions": regions,
        "top": [
            {"index": ln.index, "address": ln.address, "sass": ln.sass, "samples": ln.samples,
             "not_issued": ln.not_issued, "share": ln.samples / total if total else None,
             "executed": ln.executed, "region": region_of[i],
             "reasons": dict(sorted(ln.stalls.items(), key=lambda kv: kv[1], reverse=True))}
            for i in hot if (ln := lines[i]).samples
        ],
    }


def format_source_summary(s: dict[str, Any], min_share: float = 0.01) -> str:
    """Human-readable form of :func:`source_summary` (regions under ``min_share`` of the
    samples are left out)."""
    out = [f"  source view       {s['samples']} warp samples over {s['instructions']} SASS "
           "instructions ('selected': issuing, not stalled)"]
    if not s["samples"]:
        out.append("    no samples (was the SourceCounters section collected?)")
        return "\n".join(out)
    for reg in s["regions"]:
        if reg["share"] is None or reg["share"] < min_share:
            continue
        regs = "entry" if reg["setmaxnreg"] is None else f"setmaxnreg {reg['setmaxnreg']}"
        mix = ", ".join(f"{r['reason']} {100 * r['share']:.0f} %" for r in reg["reasons"][:5]
                        if r["share"] is not None)
        out.append(f"    SASS {reg['first']:>5}-{reg['last']:<5} {regs:<15}"
                   f"{100 * reg['share']:5.1f} %  {mix}")
    out.append("    hottest instructions (index, share of samples, executions, region)")
    for t in s["top"]:
        reg = s["regions"][t["region"]]
        where = f"{reg['first']}-{reg['last']}"
        why = ", ".join(f"{r} {100 * n / t['samples']:.0f} %"
                        for r, n in list(t["reasons"].items())[:2])
        out.append(f"    {t['index']:>5} {100 * t['share']:5.1f} % x{t['executed']:<8} "
                   f"[{where}] {t['sass'][:48]:<48} {why}")
    return "\n".join(out)


def format_summary(s: dict[str, Any], title: str) -> str:
    """Human-readable report of :func:`summarize`'s dict."""
    lines = [title]
    lines.append(
        f"  kernel            {s['kernel']}  grid {s['grid_size']}  block {s['block_size']}"
    )
    d = s["duration_s"]
    lines.append(f"  duration          {_fmt(None if d is None else d * 1e6, '.2f', ' us')}"
                 + (f"  (SM clock {s['sm_frequency_hz'] / 1e9:.2f} GHz)"
                    if s["sm_frequency_hz"] else ""))
    lines.append(f"  SM throughput     {_fmt(s['sm_throughput_pct'], '.1f', ' %')} of peak"
                 f"  (memory {_fmt(s['memory_throughput_pct'], '.1f', ' %')})")
    t = s["tensor_pipe"]
    pipe = (f"{_fmt(t['pct'], '.1f', ' %')} busy ({t['pipe']} pipe metric)" if t["pipe"]
            else "n/a (no tensor-pipe metric in this CSV)")
    other = []
    for name in ("hmma", "gmma"):
        if t["pipe"] and t["pipe"] != name:
            v = t[f"{name}_pct"]
            other.append(f"{name} " + ("n/a" if v is None else f"{v:.1f} %"))
    if s["fma_pipe_pct"] is not None:
        other.append(f"fma {s['fma_pipe_pct']:.1f} %")
    lines.append(f"  tensor pipe       {pipe}" + (f"  ({', '.join(other)})" if other else ""))
    dram, bw = s["dram_bytes"], s["dram_bandwidth_bytes_per_s"]
    lines.append(
        f"  DRAM              {_fmt(s['dram_throughput_pct'], '.1f', ' %')} of peak, "
        f"{_fmt(None if dram is None else dram / 1e6, '.2f', ' MB')}"
        + (f", {bw / 1e9:.0f} GB/s" if bw else "")
    )
    lines.append(f"  occupancy         achieved {_fmt(s['achieved_occupancy_pct'], '.1f', ' %')}"
                 f" (theoretical {_fmt(s['theoretical_occupancy_pct'], '.1f', ' %')})")
    regs = s["registers_per_thread"]
    lines.append(f"  registers         {_fmt(regs, '.0f')} per thread")
    sm = s["smem_per_block_bytes"]
    lines.append(
        f"  shared memory     {_fmt(None if sm is None else sm / 1024, '.1f', ' KiB')} per block"
        f" (static {_fmt(s['smem_static_bytes'], '.0f', ' B')}, dynamic "
        f"{_fmt(s['smem_dynamic_bytes'], '.0f', ' B')})"
    )
    lines.append("  top warp stalls   (cycles per issued instruction, share of all stalls)")
    if not s["stalls"]:
        lines.append("    n/a (no stall metrics in this CSV)")
    for st in s["stalls"][:5]:
        share = "" if st["share"] is None else f"  {100 * st['share']:4.1f} %"
        lines.append(f"    {st['reason']:<20}{st['cycles_per_issue']:7.2f}{share}")
    r = s["roofline"]
    if r:
        lines.append(f"  roofline          {r['flops'] / 1e9:.2f} GFLOP against "
                     f"{s['gpu_spec']['name']} peaks ({r['peak_flops'] / 1e12:.0f} TFLOP/s "
                     f"{r['peak_kind']}, {r['peak_dram_bytes_per_s'] / 1e12:.2f} TB/s; ridge "
                     f"{r['ridge_flop_per_byte']:.0f} FLOP/B)")
        if "achieved_flops" in r:
            lines.append(f"    achieved        {r['achieved_flops'] / 1e12:.1f} TFLOP/s = "
                         f"{r['pct_of_peak']:.1f} % of peak")
        if "arithmetic_intensity" in r:
            lines.append(
                f"    intensity       {r['arithmetic_intensity']:.0f} FLOP/B of DRAM traffic "
                f"-> {r['bound']}-bound; attainable {r['attainable_flops'] / 1e12:.0f} TFLOP/s"
                + (f", achieved {r['pct_of_attainable']:.1f} % of it"
                   if "pct_of_attainable" in r else "")
            )
            lines.append(f"    DRAM traffic    {r['dram_vs_ideal']:.2f}x the ideal (Q, K, V "
                         f"read once, O written once: {r['ideal_dram_bytes'] / 1e6:.2f} MB)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Running ncu
# ----------------------------------------------------------------------------------------------


class ProfileError(RuntimeError):
    """ncu could not produce a report; the message says why and what to do."""


_PERM_MARKERS = ("ERR_NVGPUCTRPERM", "permission to access NVIDIA GPU Performance Counters")


def check_ncu_output(text: str, returncode: int, kernel: str) -> None:
    """Raise ProfileError with a clear message for the known ways ncu fails."""
    if any(m in text for m in _PERM_MARKERS):
        raise ProfileError(
            "ncu cannot read the GPU performance counters (ERR_NVGPUCTRPERM): this user is not "
            "allowed to profile. Run as root / with CAP_SYS_ADMIN, or have an admin load the "
            "driver with NVreg_RestrictProfilingToAdminUsers=0 "
            "(https://developer.nvidia.com/ERR_NVGPUCTRPERM)."
        )
    errors = [ln for ln in text.splitlines() if ln.startswith("==ERROR==")]
    if errors:
        raise ProfileError("ncu reported errors:\n  " + "\n  ".join(errors))
    if "No kernels were profiled" in text:
        raise ProfileError(
            f"ncu profiled no kernel: no launch of {kernel!r} after the warm-up launches (is "
            "the backend dispatching a different kernel, or did the driver fail?). Output:\n"
            + _tail(text)
        )
    if returncode != 0:
        raise ProfileError(f"ncu exited with status {returncode}. Output:\n{_tail(text)}")


def _tail(text: str, n: int = 25) -> str:
    return "\n".join("    " + ln for ln in text.strip().splitlines()[-n:])


def device_cc() -> tuple[int, int]:
    """Compute capability of GPU 0 from nvidia-smi (no CUDA context in this process); (9, 0),
    FlashCore's target, if it cannot be read."""
    try:
        p = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader", "--id=0"],
            capture_output=True, text=True, timeout=30,
        )
        major, minor = p.stdout.strip().splitlines()[0].split(".")
        return int(major), int(minor)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return (9, 0)


def _import(cmd: list[str], kernel: str) -> str:
    """Run one ``ncu --import`` command and return what it printed (ProfileError if ncu
    reports a problem, TimeoutExpired after 10 minutes)."""
    print("$ " + " ".join(cmd), file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    check_ncu_output(r.stdout + "\n" + r.stderr, r.returncode, kernel)
    return r.stdout


def run_ncu(
    args: argparse.Namespace, ncu: str, out_dir: Path, stem: str
) -> tuple[str, dict, list[list[str]], str | None, str | None]:
    """Profile, then import the report as CSV: (csv text, driver info, the commands, the
    source page's CSV text, or None without ``--source`` or when its import failed, and that
    failure's message). The source page is also saved beside the report."""
    report = out_dir / stem
    info_path = out_dir / f"{stem}.driver.json"
    if info_path.exists():
        info_path.unlink()
    cmd = build_ncu_command(
        args.shape, args.backend, args.dtype, args.causal, args.metrics, args.warmup, report,
        info_path, ncu, cc=device_cc(), source=bool(args.source),
    )
    imp = build_import_command(report, ncu)
    print("$ " + " ".join(cmd), file=sys.stderr)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        raise ProfileError(f"ncu did not finish within {args.timeout} s") from e
    kernel = " or ".join(KERNEL_NAMES[args.backend])
    check_ncu_output(p.stdout + "\n" + p.stderr, p.returncode, kernel)
    raw = _import(imp, kernel)
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    commands = [cmd, imp]
    source, error = None, None
    if args.source:
        # Best effort: the main report stands without it.
        src = build_source_import_command(report, ncu)
        commands.append(src)
        try:
            source = _import(src, kernel)
            (out_dir / f"{stem}.source.csv").write_text(source)
        except (ProfileError, subprocess.TimeoutExpired, OSError) as e:
            error = f"the source page could not be imported: {e}"
    return raw, info, commands, source, error


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", type=parse_shape, required=True, help="B,Hq,Sq,D[,Hkv[,Sk]]")
    p.add_argument("--backend", choices=("triton", "cuda"), required=True)
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--metrics", default="basic",
                   help="basic (default), full (ncu's full set too) or a comma list of raw "
                        "metric names added to the basic set")
    p.add_argument("--warmup", type=int, default=3, help="launches before the profiled one")
    p.add_argument("--json", metavar="OUT", type=Path,
                   help="JSON report (default: .out/profile/<name>.json)")
    p.add_argument("--out-dir", type=Path, default=Path(".out/profile"),
                   help="where the .ncu-rep report and default JSON go")
    p.add_argument("--ncu", metavar="PATH", help="ncu executable (default: $NCU, PATH)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the ncu run")
    p.add_argument("--from-csv", type=Path, metavar="FILE",
                   help="summarise an existing ncu CSV instead of running ncu (no GPU)")
    p.add_argument("--gpu", metavar="NAME",
                   help="card for the roofline peaks when the CSV does not say (e.g. 'H100 SXM')")
    p.add_argument("--source", type=int, default=0, metavar="N",
                   help="also collect ncu's source counters (PC sampling) and print each "
                        "warp-specialised partition's stall mix and the N hottest SASS "
                        "instructions (with --source-csv: how many to list, default 20)")
    p.add_argument("--source-csv", type=Path, metavar="FILE",
                   help="with --from-csv: a saved source page (ncu --page source --csv "
                        "--print-source sass) of the same launch to summarise as well")


def _kernel_base(name: str) -> str:
    # ncu names a launch by its signature on some pages ("k(int, float *)"): the name alone.
    return name.split("(")[0].strip()


def main(args: argparse.Namespace) -> int:
    b, hq, sq, d, hkv, sk = args.shape
    problem = ProfileProblem(b, hq, sq, d, hkv, sk, args.dtype, args.causal)
    stem = (f"{args.backend}-{args.dtype}-{b}x{hq}x{sq}x{d}"
            + (f"-kv{hkv}x{sk}" if (hkv, sk) != (hq, sq) else "")
            + ("-causal" if args.causal else ""))
    info: dict[str, Any] = {}
    commands: list[list[str]] = []
    source_text, source_error, source_page = None, None, None
    if args.source < 0:
        print(f"flashcore profile: --source {args.source}: give the number of instructions to "
              "list, at least 1 (leave it out for no source view)", file=sys.stderr)
        return 2
    if args.source and args.from_csv is not None and args.source_csv is None:
        print(f"flashcore profile: --source {args.source} with --from-csv {args.from_csv}: "
              "also give the saved source page (--source-csv FILE)", file=sys.stderr)
        return 2
    if args.source_csv is not None and args.from_csv is None:
        print(f"flashcore profile: --source-csv {args.source_csv} summarises a saved source "
              "page and needs --from-csv with the same launch's raw page (to profile afresh, "
              "use --source N)", file=sys.stderr)
        return 2
    try:
        if args.from_csv is not None:
            text = args.from_csv.read_text()
        else:
            ncu = find_ncu(args.ncu)
            if ncu is None:
                print(
                    "flashcore profile: ncu (Nsight Compute CLI) not found"
                    + (f" at {args.ncu!r}" if args.ncu else " on PATH, in $NCU, "
                       "$CUDA_HOME/bin or " + ", ".join(NCU_FALLBACK_DIRS))
                    + ". Install Nsight Compute (it ships with the CUDA toolkit) or pass "
                    "--ncu /path/to/ncu.", file=sys.stderr,
                )
                return 2
            args.out_dir.mkdir(parents=True, exist_ok=True)
            text, info, commands, source_text, source_error = run_ncu(
                args, ncu, args.out_dir, stem)
            if source_text is not None:
                source_page = str(args.out_dir / f"{stem}.source.csv")
        records = parse_ncu_csv(text)
    except (ProfileError, NcuCsvError, OSError) as e:
        where = f"--from-csv {args.from_csv}: " if args.from_csv is not None else ""
        print(f"flashcore profile: {where}{e}", file=sys.stderr)
        return 2
    if args.source_csv is not None:
        try:
            source_text = args.source_csv.read_text()
        except OSError as e:
            print(f"flashcore profile: --source-csv {args.source_csv}: {e}", file=sys.stderr)
            return 2
        source_page = str(args.source_csv)
    names = KERNEL_NAMES[args.backend]
    name = " or ".join(names)
    mine = [r for r in records if _kernel_base(r.kernel).startswith(names)]
    if not mine:
        seen = ", ".join(sorted({r.kernel for r in records}))
        print(f"flashcore profile: the CSV has no launch of {name!r} (it has: {seen})",
              file=sys.stderr)
        return 2
    rec = mine[-1]
    # The card: as named on the command line, else as the driver saw it, else as ncu's raw
    # page names it.
    named = rec.get("device__attribute_display_name")
    device = args.gpu or info.get("device") or (named.raw.strip() if named else None)
    spec, matched = gpu_spec_for(device)
    summary = summarize(rec, problem, spec)
    title = (f"flashcore profile: {args.backend} {problem.describe()} on "
             f"{device or 'an unnamed GPU'}"
             + ("" if matched else f" (peaks assumed: {spec.name})"))
    sel = info.get("selection")
    if sel:
        title += f"\n  config            {sel.get('config_short')} ({sel.get('source')})"
    print(format_summary(summary, title))
    source = None
    if source_text is not None:
        # The page's launch of the kernel summarised above (the last, as for the raw page).
        base = _kernel_base(rec.kernel)
        try:
            pages = parse_ncu_source_csv(source_text)
            same = [lines for k, lines in pages if _kernel_base(k) == base]
            if not same:
                raise NcuCsvError(f"no launch of {base!r} (it has: "
                                  + ", ".join(repr(k) for k, _ in pages) + ")")
            source = source_summary(same[-1], args.source or 20)
            print(format_source_summary(source))
        except NcuCsvError as e:
            source_error = f"source page {source_page}: {e}"
    if source_error:
        print(f"flashcore profile: {source_error}", file=sys.stderr)
    doc = {
        "tool": "flashcore profile",
        "problem": problem.__dict__,
        "backend": args.backend,
        "environment": info,
        "gpu_spec_matched": matched,
        "ncu_commands": commands,
        "source_csv": str(args.from_csv) if args.from_csv else None,
        "summary": summary,
        "source": source,
        "source_page_csv": source_page,
        "source_error": source_error,
        "metrics": {
            k: {"value": m.value, "unit": m.base_unit, "raw": m.raw, "raw_unit": m.unit}
            for k, m in rec.metrics.items()
        },
    }
    out = args.json or (args.out_dir / f"{stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    # The report is written either way; a source view that was asked for and failed is an
    # error of the run.
    return 2 if source_error else 0

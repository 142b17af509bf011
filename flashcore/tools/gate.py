"""``flashcore gate``: the ptxas resource gate. No GPU needed.

Compiles every kernel variant dispatch can select (:mod:`flashcore.tools.variants`) on the CPU
and checks what ptxas reports against the budgets in :mod:`flashcore.tools.budgets`:

- Triton: ahead of time for an explicit ``GPUTarget`` (sm_90a); the PTX goes through the ptxas
  Triton itself uses (the one bundled in the wheel) with ``-v``. The gate replaces Triton's
  cubin stage with that call, so ptxas runs once per kernel and its log is the one read.
- CUDA C++: ``nvcc -cubin -arch=sm_XX -Xptxas -v`` with the backend's -D defines, for sm_80
  and sm_90.

Prints a table; exits 1 naming every kernel and the budget it broke (or the compile that
failed, or a log with nothing to parse: that is never a pass), 2 if it cannot run at all
(compiler missing, backend source missing), 0 when everything is within budget.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import budgets as B
from .ptxas import (
    FunctionResources,
    PtxasParseError,
    find_nvcc,
    parse_ptxas_log,
    run_nvcc,
    run_ptxas,
    triton_ptxas_path,
)
from .variants import (
    CUDA_ARCHS,
    CudaJob,
    GateItem,
    GateSetupError,
    TritonJob,
    cuda_fixture_items,
    cuda_items,
    triton_items,
    triton_space_items,
)

__all__ = ["CompileOutput", "Row", "add_arguments", "compile_job", "config_verdict",
           "format_table", "main", "make_config_gate", "run_gate"]


# ----------------------------------------------------------------------------------------------
# Compiling (runs in worker processes: everything here is picklable and top level)
# ----------------------------------------------------------------------------------------------


@dataclass
class CompileOutput:
    ok: bool
    log: str  # ptxas -v output ("" if the compile failed before ptxas)
    error: str | None
    command: list[str]
    dynamic_smem: int  # bytes the launcher requests on top of ptxas's static smem
    mma: str  # "wgmma" | "mma.sync" | "none" (FMA dot) | "-" (not inspected)
    seconds: float
    # Warps the compiled kernel launches with, if the compiler says (Triton's warp
    # specialisation can add producer warps to the config's num_warps); 0: the config's.
    num_warps: int = 0


@contextlib.contextmanager
def _captured_fd2() -> Iterator[Callable[[], str]]:
    """Send file descriptor 2 to a temp file while compiling: Triton's MLIR passes print
    whole IR dumps there on failure. Yields a function returning what was written."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lambda: (f.seek(0), f.read().decode(errors="replace"))[1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _error_lines(text: str, n: int = 6) -> str:
    """The lines of a compiler dump that say what went wrong (not the IR itself)."""
    lines = [ln.strip() for ln in text.splitlines() if re.search(r"error|note:", ln)]
    return "\n".join(lines[:n])


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "none"


def _compile_triton(job: TritonJob, keep: Path | None) -> CompileOutput:
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    from ..backends.triton.fwd import compile_fwd

    t0 = time.perf_counter()
    seen: dict[str, Any] = {}

    def hook(backend, stages, options, language, capability) -> None:
        arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
        extra = [] if options.enable_fp_fusion else ["--fmad=false"]
        if options.ptx_options:
            extra += options.ptx_options.split()
        ptxas = triton_ptxas_path(capability)

        def cubin_stage(src: str, metadata: dict) -> bytes:
            cubin, log, cmd = run_ptxas(src, arch, ptxas, extra, keep=keep)
            seen.update(log=log, cmd=cmd)
            return cubin

        stages["cubin"] = cubin_stage

    try:
        # A private, throw-away cache: a cache hit would skip ptxas (no log), and the gate must
        # not depend on, or write into, the user's ~/.triton/cache.
        with (
            _captured_fd2() as dump,
            tempfile.TemporaryDirectory(prefix="flashcore-gate-triton-") as cache,
            knobs.runtime.scope(), knobs.compilation.scope(), knobs.cache.scope(),
        ):
            knobs.cache.dir = cache
            knobs.compilation.always_compile = True
            knobs.runtime.add_stages_inspection_hook = hook
            try:
                kernel = compile_fwd(job.spec, target=GPUTarget("cuda", job.cc, 32))
            except Exception as e:
                detail = _error_lines(dump())
                raise RuntimeError(f"{type(e).__name__}: {e}"
                                   + (f"\n{detail}" if detail else "")) from e
    except Exception as e:  # noqa: BLE001 - any compile failure is reported as that kernel's
        return CompileOutput(
            False, seen.get("log", ""), str(e), seen.get("cmd", []), 0, "-",
            time.perf_counter() - t0,
        )
    if "log" not in seen:
        return CompileOutput(
            False, "", "Triton never ran the gate's ptxas stage (stage hook not honoured by "
            "this Triton version?)", [], 0, "-", time.perf_counter() - t0,
        )
    return CompileOutput(
        True, seen["log"], None, seen["cmd"], int(kernel.metadata.shared),
        _mma_kind(kernel.asm.get("ptx", "")), time.perf_counter() - t0,
        int(getattr(kernel.metadata, "num_warps", 0) or 0),
    )


def _compile_cuda(job: CudaJob, nvcc: str, keep: Path | None) -> CompileOutput:
    t0 = time.perf_counter()
    try:
        rc, log, cmd = run_nvcc(job.source, list(job.defines), job.arch, nvcc, list(job.flags),
                                keep=keep)
    except (OSError, subprocess.SubprocessError) as e:
        return CompileOutput(False, "", f"{type(e).__name__}: {e}", [], 0, "-",
                             time.perf_counter() - t0)
    err = None if rc == 0 else f"nvcc exited {rc}:\n{log.strip()}"
    return CompileOutput(rc == 0, log, err, cmd, job.dynamic_smem, "-", time.perf_counter() - t0)


def compile_job(
    job: TritonJob | CudaJob, nvcc: str | None = None, keep: Path | None = None
) -> CompileOutput:
    """Compile one job and capture ptxas -v; never raises (a failure is in the output).
    ``keep``: a directory to leave the PTX / cubin / log in, for reproducing by hand."""
    if isinstance(job, TritonJob):
        return _compile_triton(job, keep)
    if nvcc is None:
        return CompileOutput(False, "", "nvcc not found", [], 0, "-", 0.0)
    return _compile_cuda(job, nvcc, keep)


# (backend, head_dim, dtype, causal, cc, config) -> verdict. The gate compiles for a fixed
# problem of the class (sequence lengths and batch are runtime values), so a verdict holds for
# every shape of the class: one tuning run reuses it across its problems.
_VERDICTS: dict[tuple, bool] = {}


def config_verdict(
    backend: str, head_dim: int, dtype: str, causal: bool, cc: int, cfg: Any
) -> bool:
    """The resource gate's verdict on one config of a problem class: compile it (and, for a
    TMA config, the layout fallback the launcher would use) and check ptxas's report against
    the budgets. Memoised per process; a top-level function so worker processes can run it."""
    key = (backend, int(head_dim), dtype, bool(causal), int(cc), cfg)
    ok = _VERDICTS.get(key)
    if ok is None:
        from ..backends.triton.config import tma_fallback
        from .ptxas import find_nvcc
        from .variants import Problem, _triton_item, cuda_item

        p = Problem(dtype, head_dim, causal, 1, 8, 8, 4096, 4096)
        if backend == "triton":
            cfgs = [cfg] + ([tma_fallback(cfg, head_dim)] if getattr(cfg, "tma", 0) else [])
            its = [_triton_item(p, c, cc, "tuner") for c in cfgs]
        else:
            its = [cuda_item(p, cfg, f"sm_{cc}", "tuner")]
        nvcc = find_nvcc()
        ok = all(
            r.ok for it in its
            for r in rows_for(it, compile_job(it.job, nvcc), B.BudgetOverrides())
        )
        _VERDICTS[key] = ok
    return ok


def make_config_gate(
    backend: str, *, head_dim: int, dtype: str, causal: bool, cc: int = 90
) -> Callable[[Any], bool]:
    """The resource gate as a predicate for EvoTuner: reject a config whose compiled kernel
    breaks a budget before the candidate gets any GPU time (see :func:`config_verdict`)."""

    def gate(cfg: Any) -> bool:
        return config_verdict(backend, head_dim, dtype, causal, cc, cfg)

    return gate


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


# ----------------------------------------------------------------------------------------------
# Checking
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One kernel (or non-inlined device function) of one compiled variant, checked."""

    item: GateItem
    function: str
    registers: int | None
    spill_stores: int
    spill_loads: int
    stack: int
    smem_static: int
    smem_dynamic: int
    mma: str
    budget: B.Budget
    breaches: list[B.Breach] = field(default_factory=list)
    num_warps: int = 0  # as launched (0: the config's)
    error: str | None = None
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)

    @property
    def smem(self) -> int:
        return self.smem_static + self.smem_dynamic

    @property
    def ok(self) -> bool:
        return self.error is None and not self.breaches

    @property
    def blocks_per_sm(self) -> int | None:
        """Theoretical resident blocks per SM (registers, shared memory, warp slots)."""
        if self.registers is None:
            return None
        return B.resident_blocks(32 * (self.num_warps or self.item.num_warps), self.registers,
                                 self.smem, self.item.cc)

    def verdict(self) -> str:
        if self.error is not None:
            return "ERROR"
        if self.breaches:
            return "FAIL " + ",".join(b.budget for b in self.breaches)
        return "ok"

    def to_dict(self) -> dict[str, Any]:
        it = self.item
        return {
            "backend": it.backend, "arch": it.arch, "config": it.config,
            "variant": it.variant, "head_dim": it.head_dim,
            "num_warps": self.num_warps or it.num_warps,
            "function": self.function, "registers": self.registers,
            "spill_stores": self.spill_stores, "spill_loads": self.spill_loads,
            "stack": self.stack, "smem_static": self.smem_static,
            "smem_dynamic": self.smem_dynamic, "smem": self.smem, "mma": self.mma,
            "blocks_per_sm": self.blocks_per_sm, "budget": self.budget.to_dict(),
            "breaches": [
                {"budget": b.budget, "value": b.value, "limit": b.limit, "unit": b.unit}
                for b in self.breaches
            ],
            "error": self.error, "verdict": self.verdict(), "ok": self.ok,
            "compile_s": round(self.seconds, 2), "command": self.command,
            "selected_by": it.origins,
        }


def _warps(item: GateItem, out: CompileOutput) -> int:
    return out.num_warps or item.num_warps


def rows_for(item: GateItem, out: CompileOutput, overrides: B.BudgetOverrides) -> list[Row]:
    """Parse one compile's ptxas log and check each kernel in it against its budget."""
    try:
        budget = B.budget_for(item.backend, item.config, item.num_warps, item.cc,
                              item.head_dim, overrides, threads=32 * _warps(item, out))
    except KeyError as e:  # an architecture with no declared limits
        budget = B.Budget(0, 0, 0, 0, 0, 0, "no limits declared")
        return [Row(item, item.kernel or "?", None, 0, 0, 0, 0, 0, out.mma, budget,
                    error=str(e.args[0]), seconds=out.seconds, command=out.command)]

    def error_row(msg: str) -> Row:
        return Row(item, item.kernel or "?", None, 0, 0, 0, 0, 0, out.mma, budget, error=msg,
                   seconds=out.seconds, command=out.command)

    if not out.ok:
        return [error_row(f"compile failed: {out.error}")]
    try:
        funcs = parse_ptxas_log(out.log)
    except PtxasParseError as e:
        return [error_row(f"could not parse ptxas -v output: {e}")]
    entries = [f for f in funcs if f.entry]
    if item.kernel is not None:
        entries = [f for f in entries if f.name == item.kernel]
        if not entries:
            names = ", ".join(f.name for f in funcs if f.entry)
            return [error_row(f"ptxas -v reported no entry {item.kernel!r} (saw: {names})")]
    rows = []
    for f in [*entries, *(f for f in funcs if not f.entry)]:
        rows.append(_row(item, f, out, budget))
    return rows


def _row(item: GateItem, f: FunctionResources, out: CompileOutput, budget: B.Budget) -> Row:
    dyn = out.dynamic_smem if f.entry else 0
    row = Row(
        item=item, function=f.name if f.entry else f"{f.name} (device function)",
        registers=f.registers if f.entry else None, spill_stores=f.spill_stores,
        spill_loads=f.spill_loads, stack=f.stack, smem_static=f.smem_static, smem_dynamic=dyn,
        mma=out.mma, budget=budget, seconds=out.seconds, command=out.command,
        num_warps=_warps(item, out),
    )
    row.breaches = B.check(budget, row.registers, row.spill_stores, row.spill_loads, row.stack,
                           row.smem)
    return row


def _worker_init() -> None:
    os.environ["TRITON_INTERPRET"] = "0"


def _cost(item: GateItem) -> tuple:
    """Rough compile-time order, longest first, so the pool's tail is short: fp32 (FMA dots,
    spill-prone, ptxas-heavy) and wide heads take longest."""
    if isinstance(item.job, TritonJob):
        s = item.job.spec
        return (s.dtype == "fp32", s.head_dim, s.config.block_m * s.config.block_n)
    return (False, item.head_dim or 0, 0)


def run_gate(
    items: list[GateItem],
    jobs: int = 1,
    overrides: B.BudgetOverrides | None = None,
    progress: bool = False,
    keep: Path | None = None,
) -> list[Row]:
    """Compile and check every item; rows in the items' order. ``keep``: directory where each
    variant's PTX / cubin / compiler log is left (one subdirectory per variant)."""
    overrides = overrides or B.BudgetOverrides()
    nvcc = find_nvcc() if any(isinstance(i.job, CudaJob) for i in items) else None
    if nvcc is None and any(isinstance(i.job, CudaJob) for i in items):
        raise GateSetupError(
            "nvcc not found (looked at $NVCC, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): the "
            "CUDA backend cannot be gated. Install the CUDA toolkit or use --backend triton."
        )
    order = sorted(range(len(items)), key=lambda i: _cost(items[i]), reverse=True)
    outs: dict[int, CompileOutput] = {}
    t0 = time.perf_counter()

    def keep_for(i: int) -> Path | None:
        return None if keep is None else keep / _slug(items[i].label)

    def report(i: int) -> None:
        if progress:
            o = outs[i]
            print(f"[{len(outs):>3}/{len(items)}] {o.seconds:6.1f}s  {items[i].label}"
                  f"{'' if o.ok else '  (compile failed)'}", file=sys.stderr, flush=True)

    # Always in fresh worker processes (spawn, not fork), even for one job: no inherited
    # torch/Triton state or threads, and Triton's interpreter switched off before the kernel
    # module is imported (TRITON_INTERPRET=1, as the CPU test suite sets it, would make
    # @triton.jit functions uncompilable).
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=max(1, min(jobs, len(items))), mp_context=ctx, initializer=_worker_init
    ) as ex:
        futs = {ex.submit(compile_job, items[i].job, nvcc, keep_for(i)): i for i in order}
        for fut in as_completed(futs):
            i = futs[fut]
            try:
                outs[i] = fut.result()
            except Exception as e:  # noqa: BLE001 - a crashed worker fails that variant
                outs[i] = CompileOutput(False, "", f"compile worker died: {type(e).__name__}: "
                                        f"{e}", [], 0, "-", 0.0)
            report(i)
    if progress:
        print(f"compiled {len(items)} variants in {time.perf_counter() - t0:.1f}s "
              f"with {max(1, jobs)} job(s)", file=sys.stderr)
    rows: list[Row] = []
    for i, item in enumerate(items):
        rows.extend(rows_for(item, outs[i], overrides))
    return rows


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

_COLUMNS = ("backend", "arch", "config", "variant", "kernel", "regs/max", "spill st/ld",
            "stack", "smem KiB/max", "blk/SM", "mma", "verdict")


def _cells(r: Row) -> tuple[str, ...]:
    it = r.item
    regs = "-" if r.registers is None else f"{r.registers}/{r.budget.max_registers}"
    smem = f"{r.smem / 1024:.1f}/{r.budget.max_smem_bytes / 1024:.0f}"
    blk = r.blocks_per_sm
    blk_s = "-" if blk is None else f"{blk}" + ("" if blk >= r.budget.blocks_per_sm else "<")
    err = r.error is not None
    return (
        it.backend, it.arch, it.config, it.variant, r.function,
        "-" if err else regs, "-" if err else f"{r.spill_stores}/{r.spill_loads}",
        "-" if err else str(r.stack), "-" if err else smem, "-" if err else blk_s, r.mma,
        r.verdict(),
    )


def format_table(rows: list[Row]) -> str:
    """The gate's table: one line per kernel. ``blk/SM`` is the theoretical occupancy the
    registers and shared memory allow; ``<`` marks one below the config's declared target."""
    cells = [_COLUMNS, *(_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def breach_lines(rows: list[Row]) -> list[str]:
    """One line per failing kernel, naming the variant and every budget it broke."""
    out = []
    for r in rows:
        where = f"{r.item.label} [{r.function}]"
        if r.error is not None:
            out.append(f"ERROR {where}: {r.error}")
        if r.breaches:
            parts = [
                str(b) + (f" ({r.budget.why})" if b.budget == "registers" else "")
                for b in r.breaches
            ]
            out.append(f"FAIL {where}: " + "; ".join(parts))
    return out


def _tool_versions(need_nvcc: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        import triton

        out["triton"] = triton.__version__
        p = subprocess.run([triton_ptxas_path(), "--version"], capture_output=True, text=True)
        out["ptxas"] = (p.stdout.strip().splitlines() or ["?"])[-1]
    except Exception as e:  # noqa: BLE001 - informational only
        out["ptxas"] = f"unavailable ({type(e).__name__})"
    nvcc = find_nvcc() if need_nvcc else None
    if nvcc:
        p = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
        out["nvcc"] = (p.stdout.strip().splitlines() or ["?"])[-1]
    return out


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _cuda_variant(text: str) -> tuple[str, list[str]]:
    name, sep, defines = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"--cuda-variant must be NAME=DEFINES (e.g. 'clean=-DMODE=0'), got {text!r}"
        )
    return name, defines.split()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("triton", "cuda", "all"), default="all")
    p.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1,
                   help="parallel compiles (default: all cores)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--filter", metavar="REGEX",
                   help="only variants whose 'backend arch config variant' matches")
    p.add_argument("--list", action="store_true", help="list the variants; compile nothing")
    p.add_argument("--tables", metavar="DIR", type=Path,
                   help="tuning tables directory (default: the shipped one)")
    p.add_argument("--search-space", action="store_true",
                   help="check every config of the Triton search space instead of the ones "
                        "dispatch selects (to prune the tuner's space; narrow it with --filter)")
    p.add_argument("--verbose", "-v", action="store_true", help="progress per compile")
    p.add_argument("--keep", metavar="DIR", type=Path,
                   help="leave each variant's PTX, cubin and compiler log under DIR (to "
                        "reproduce a failure by hand)")
    g = p.add_argument_group("budget overrides (testing and experiments)")
    g.add_argument("--max-registers", type=int, metavar="N")
    g.add_argument("--max-spill-bytes", type=int, metavar="N")
    g.add_argument("--max-stack-bytes", type=int, metavar="N")
    g.add_argument("--max-smem-bytes", type=int, metavar="N")
    c = p.add_argument_group("gate another CUDA source (replaces the CUDA backend's variants)")
    c.add_argument("--cuda-source", type=Path, metavar="FILE.cu")
    c.add_argument("--cuda-variant", type=_cuda_variant, action="append", default=[],
                   metavar="NAME=DEFINES", help="repeatable; defines separated by spaces")
    c.add_argument("--cuda-arch", action="append", metavar="sm_XX",
                   help=f"repeatable (default: {' '.join(CUDA_ARCHS)})")


def _enumerate(args: argparse.Namespace, notes: list[str]) -> list[GateItem]:
    items: list[GateItem] = []
    if args.search_space:
        if args.backend != "triton":
            raise GateSetupError("--search-space is implemented for --backend triton only")
        items += triton_space_items()
    elif args.backend in ("triton", "all"):
        items += triton_items(args.tables, notes)
    if args.backend in ("cuda", "all"):
        archs = tuple(args.cuda_arch or CUDA_ARCHS)
        if args.cuda_source is not None:
            items += cuda_fixture_items(args.cuda_source, args.cuda_variant, archs)
        else:
            items += cuda_items(args.tables, notes, archs)
    if args.filter:
        rx = re.compile(args.filter)
        items = [i for i in items if rx.search(i.label)]
    return items


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    notes: list[str] = []
    try:
        items = _enumerate(args, notes)
    except GateSetupError as e:
        print(f"flashcore gate: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}")
    if not items:
        print("flashcore gate: nothing to check (no variant matched)", file=sys.stderr)
        return 2
    by_backend = {b: sum(1 for i in items if i.backend == b) for b in ("triton", "cuda")}
    print("gate: " + ", ".join(f"{n} {b} variant(s)" for b, n in by_backend.items() if n))
    if args.list:
        for it in items:
            print(f"{it.label:<48} selected by {len(it.origins)}: {it.origins[0]}"
                  + (" ..." if len(it.origins) > 1 else ""))
        return 0
    overrides = B.BudgetOverrides(args.max_registers, args.max_spill_bytes,
                                  args.max_stack_bytes, args.max_smem_bytes)
    try:
        rows = run_gate(items, args.jobs, overrides, progress=args.verbose, keep=args.keep)
    except GateSetupError as e:
        print(f"flashcore gate: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    bad = breach_lines(rows)
    n_bad = sum(1 for r in rows if not r.ok)
    elapsed = time.perf_counter() - t0
    if args.json:
        doc = {
            "tool": "flashcore gate",
            "passed": not bad,
            "elapsed_s": round(elapsed, 1),
            "tools": _tool_versions(any(isinstance(i.job, CudaJob) for i in items)),
            "limits": {
                "max_spill_store_bytes": B.MAX_SPILL_STORE_BYTES,
                "max_spill_load_bytes": B.MAX_SPILL_LOAD_BYTES,
                "max_stack_bytes": B.MAX_STACK_BYTES,
                "occupancy_targets": [t.__dict__ for t in B.OCCUPANCY_TARGETS],
                "overrides": overrides.__dict__,
            },
            "notes": notes,
            "rows": [r.to_dict() for r in rows],
            "breaches": bad,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if bad:
        print(f"\ngate FAILED: {n_bad} of {len(rows)} kernels break a budget or did not "
              f"compile ({elapsed:.0f}s)")
        for line in bad:
            print(line)
        if args.keep is not None:
            print(f"PTX, cubins and compiler logs (with the exact command) are under {args.keep}")
        else:
            print("rerun with --filter REGEX --keep DIR to keep the PTX and the exact command")
        return 1
    print(f"\ngate passed: {len(rows)} kernels within budget ({elapsed:.0f}s)")
    return 0

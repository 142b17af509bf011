"""Run ptxas / nvcc with ``-v`` and parse what they report per kernel.

ptxas -v prints, per function and per target architecture::

    ptxas info    : Compiling entry function '_attn_fwd_kernel' for 'sm_90a'
    ptxas info    : Function properties for _attn_fwd_kernel
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 244 registers, used 1 barriers, 4096 bytes smem, 376 bytes cmem[0]

Device functions that were not inlined get a "Function properties" block without a
"Compiling entry function" line. The parser is strict where it matters: an entry function with
no register count, or a log with no entry function at all, is an error, never a pass.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "FunctionResources",
    "PtxasParseError",
    "find_nvcc",
    "parse_ptxas_log",
    "run_nvcc",
    "run_ptxas",
    "triton_ptxas_path",
]


class PtxasParseError(ValueError):
    """The ptxas -v output did not contain what a kernel's resource check needs."""


@dataclass
class FunctionResources:
    """What ptxas -v reported for one function on one architecture."""

    name: str
    arch: str | None  # "sm_90a"; None if the log never said
    entry: bool  # a __global__ kernel (False: a device function that was not inlined)
    registers: int | None = None
    barriers: int | None = None
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0
    cumulative_stack: int = 0
    smem_static: int = 0
    cmem: int = 0  # constant bank 0 bytes (kernel parameters), informational

    @property
    def stack(self) -> int:
        """Stack bytes the kernel needs: its own frame, or with callees if ptxas said so."""
        return max(self.stack_frame, self.cumulative_stack)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stack"] = self.stack
        return d


_PREFIX = r"^\s*ptxas\s+info\s*:\s*"
_RE_ENTRY = re.compile(_PREFIX + r"Compiling entry function '([^']+)' for '([^']+)'")
_RE_PROPS = re.compile(_PREFIX + r"Function properties for (\S+)")
_RE_USED = re.compile(_PREFIX + r"Used (\d+) registers(.*)$")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame")
_RE_SPILL_ST = re.compile(r"(\d+) bytes spill stores")
_RE_SPILL_LD = re.compile(r"(\d+) bytes spill loads")
_RE_BARRIERS = re.compile(r"used (\d+) barriers")
_RE_CUMSTACK = re.compile(r"(\d+) bytes cumulative stack size")
_RE_SMEM = re.compile(r"(\d+) bytes smem")
_RE_CMEM0 = re.compile(r"(\d+) bytes cmem\[0\]")
# "ptxas warning : Registers are spilled to local memory in function 'f', 8 bytes spill
# stores, 8 bytes spill loads" (with -warn-spills): counted only if no properties block was
# seen for that function.
_RE_WARN_SPILL = re.compile(r"spilled to local memory in function '([^']+)'")


def parse_ptxas_log(text: str) -> list[FunctionResources]:
    """Every function ptxas -v reported, in order. Raises :class:`PtxasParseError` if an entry
    function has no "Used N registers" line or if the text has no ptxas info at all."""
    out: list[FunctionResources] = []
    current_entry: FunctionResources | None = None
    current_arch: str | None = None
    props_target: FunctionResources | None = None  # the function the next stats line is for
    saw_info = False
    for raw in text.splitlines():
        line = raw.rstrip()
        if re.match(_PREFIX, line):
            saw_info = True
        m = _RE_ENTRY.match(line)
        if m:
            current_arch = m.group(2)
            current_entry = FunctionResources(m.group(1), current_arch, entry=True)
            out.append(current_entry)
            props_target = None
            continue
        m = _RE_PROPS.match(line)
        if m:
            name = m.group(1)
            if current_entry is not None and current_entry.name == name:
                props_target = current_entry
            else:
                props_target = FunctionResources(name, current_arch, entry=False)
                out.append(props_target)
            continue
        if props_target is not None and "bytes stack frame" in line:
            props_target.stack_frame = _int(_RE_FRAME, line)
            props_target.spill_stores = _int(_RE_SPILL_ST, line)
            props_target.spill_loads = _int(_RE_SPILL_LD, line)
            props_target = None
            continue
        m = _RE_USED.match(line)
        if m:
            if current_entry is None:
                raise PtxasParseError(f"'Used N registers' before any entry function: {line!r}")
            rest = m.group(2)
            current_entry.registers = int(m.group(1))
            bar = _RE_BARRIERS.search(rest)
            current_entry.barriers = int(bar.group(1)) if bar else None
            current_entry.cumulative_stack = _int(_RE_CUMSTACK, rest)
            current_entry.smem_static = _int(_RE_SMEM, rest)
            current_entry.cmem = _int(_RE_CMEM0, rest)
            continue
        m = _RE_WARN_SPILL.search(line)
        if m:
            fn = next((f for f in reversed(out) if f.name == m.group(1)), None)
            if fn is not None and fn.spill_stores == 0 and fn.spill_loads == 0:
                fn.spill_stores = _int(_RE_SPILL_ST, line)
                fn.spill_loads = _int(_RE_SPILL_LD, line)
    if not saw_info:
        raise PtxasParseError("no 'ptxas info' line: was ptxas run with -v?")
    missing = [f"{f.name} ({f.arch})" for f in out if f.entry and f.registers is None]
    if missing:
        raise PtxasParseError("no register count for entry function(s): " + ", ".join(missing))
    if not any(f.entry for f in out):
        raise PtxasParseError("ptxas -v reported no entry function (no kernel was compiled)")
    return out


def _int(rx: re.Pattern, s: str) -> int:
    m = rx.search(s)
    return int(m.group(1)) if m else 0


# ----------------------------------------------------------------------------------------------
# Running the tools
# ----------------------------------------------------------------------------------------------


def triton_ptxas_path(cc: int = 90) -> str:
    """The ptxas Triton itself uses for ``cc`` (the one bundled in the wheel unless
    TRITON_PTXAS_PATH says otherwise)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cc).path


def _workdir(keep: Path | None, prefix: str):
    """A temp dir, or ``keep`` (created, kept) so a failure can be reproduced by hand."""
    if keep is None:
        return tempfile.TemporaryDirectory(prefix=prefix)
    keep.mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(str(keep))


def run_ptxas(
    ptx: str,
    arch: str,
    ptxas: str,
    extra: list[str] | None = None,
    timeout: float = 600.0,
    keep: Path | None = None,
) -> tuple[bytes, str, list[str]]:
    """Assemble ``ptx`` for ``arch`` ("sm_90a") with -v. Returns (cubin, log, command).

    Flags mirror Triton's own ptxas call (-lineinfo; --fmad=false and ptx_options come in
    ``extra``), so the cubin is the one Triton would have built. With ``keep``, the PTX, cubin
    and log stay in that directory. Raises RuntimeError with the log if ptxas fails.
    """
    with _workdir(keep, "flashcore-ptxas-") as tmp:
        src = Path(tmp, "kernel.ptx")
        dst = Path(tmp, "kernel.cubin")
        src.write_text(ptx)
        cmd = [ptxas, "-lineinfo", *(extra or []), "-v", f"--gpu-name={arch}", str(src)]
        cmd += ["-o", str(dst)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        log = p.stderr + p.stdout
        if keep is not None:
            Path(tmp, "ptxas.log").write_text(" ".join(cmd) + "\n" + log)
        if p.returncode != 0:
            raise RuntimeError(f"ptxas failed (exit {p.returncode}):\n{log}")
        return dst.read_bytes(), log, cmd


def find_nvcc() -> str | None:
    """nvcc from $NVCC, PATH, $CUDA_HOME/bin or /usr/local/cuda/bin; None if none exists."""
    cands = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(str(Path(home, "bin", "nvcc")))
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def run_nvcc(
    source: str | Path,
    defines: list[str],
    arch: str,
    nvcc: str,
    flags: list[str] | None = None,
    timeout: float = 600.0,
    keep: Path | None = None,
) -> tuple[int, str, list[str]]:
    """Compile ``source`` to a cubin for ``arch`` ("sm_80") with ``-Xptxas -v``.

    Returns (exit code, compiler output, command); the cubin is discarded unless ``keep``.
    """
    with _workdir(keep, "flashcore-nvcc-") as tmp:
        cmd = [nvcc, "-cubin", f"-arch={arch}", "-Xptxas", "-v", *(flags or []), *defines]
        cmd += ["-o", str(Path(tmp, "kernel.cubin")), str(source)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        log = p.stderr + p.stdout
        if keep is not None:
            Path(tmp, "nvcc.log").write_text(" ".join(cmd) + "\n" + log)
        return p.returncode, log, cmd

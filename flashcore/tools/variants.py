"""What the gate compiles: every kernel variant dispatch can select, for every backend.

"Selectable" is the union of
(a) the analytic heuristic (``flashcore.tuning.dispatch.heuristic_config``) over a grid of
    problems that covers each dtype, each head-dim class and both of its branches (few
    programs -> smaller tiles, many programs -> big tiles), causal on and off; and
(b) every entry of the shipped tuning tables that dispatch would accept (well formed and
    inside the current config space).

A compiled *variant* is more than a config: the Triton kernel is specialised on dtype, head
dim, causal, LSE, scale sign and on properties of its integer arguments (16-divisible, equal to
1). The gate builds each variant exactly as the launcher would for a representative problem
and deduplicates by the compiled variant, so a config chosen by many problems compiles once.

Representative choices (one compiled variant per problem class, the common case):
- contiguous BHSD q/k/v/out, 16 query heads (GQA group from the table key, else 1), sequence
  lengths that are multiples of 16: the specialisation a typical LLM / ViT call gets;
  odd lengths only drop divisibility hints of Sq/Sk, which do not change register pressure;
- ``return_lse=False`` and a positive scale (``attention``'s defaults);
- for a TMA config, also the same config without TMA: the launcher falls back to it for
  strides or pointers the copy engine cannot take (compiled with the same specialisation);
- Triton compiled for sm_90a, where FlashCore is tuned; CUDA C++ for sm_80 and sm_90 (table
  entries only for their table's architecture).
"""

from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hardware import DEFAULT_GPU

__all__ = [
    "CUDA_ARCHS",
    "CUDA_DTYPES",
    "HEURISTIC_REGIMES",
    "TRITON_CC",
    "TRITON_DTYPES",
    "TRITON_HEAD_DIMS",
    "CudaJob",
    "GateItem",
    "GateSetupError",
    "Problem",
    "TritonJob",
    "cuda_fixture_items",
    "cuda_items",
    "triton_items",
    "triton_space_items",
]

TRITON_DTYPES = ("fp16", "bf16", "fp32")
# Every BLOCK_D class (16, 32, 64, 128, 256) and the padded head dims (BLOCK_D > D) that
# models use: 40 (-> 64), 80 and 96 (-> 128), 192 (-> 256).
TRITON_HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128, 192, 256)
CUDA_DTYPES = ("fp16", "bf16")
TRITON_CC = 90
CUDA_ARCHS = ("sm_80", "sm_90")
# (name, batch, query heads, sequence length). With 132 SMs, "small" gives the heuristic fewer
# programs than SMs (1 * 16 * ceil(256 / 128) = 32 < 132: it shrinks the tile) and "large" many
# more (8 * 16 * 2048 / 128 = 2048): both branches fire. Same head count and 16-divisible
# lengths in both, so a config both pick is one compiled variant.
HEURISTIC_REGIMES = (("small", 1, 16, 256), ("large", 8, 16, 2048))
_HEURISTIC_GPU = ("gate", "9.0")  # ProblemKey gpu/cc for heuristic lookups (no table matches)
# The SM count whose grids the gate compiles for (H100 / H200 SXM): it decides which launches
# balance their last wave stream-K style (config.stream_k), a kernel variant of its own.
GATE_NUM_SMS = 132


class GateSetupError(RuntimeError):
    """The gate cannot enumerate or build what it was asked to check (missing backend source,
    missing compiler, unreadable inputs): never a pass."""


@dataclass(frozen=True)
class Problem:
    """One attention call, as far as dispatch and specialisation care."""

    dtype: str
    head_dim: int
    causal: bool
    b: int
    hq: int
    hkv: int
    sq: int
    sk: int

    def describe(self) -> str:
        c = " causal" if self.causal else ""
        g = f" gqa{self.hq // self.hkv}" if self.hq != self.hkv else ""
        return f"{self.dtype} B={self.b} H={self.hq} S={self.sq}x{self.sk} D={self.head_dim}{c}{g}"


@dataclass(frozen=True)
class TritonJob:
    """One Triton compile: a KernelSpec (config + specialisation) for one target."""

    spec: Any  # flashcore.backends.triton.fwd.KernelSpec (frozen, hashable, picklable)
    cc: int


@dataclass(frozen=True)
class CudaJob:
    """One nvcc compile of a CUDA C++ source with -D defines for one architecture."""

    source: str
    source_sha: str  # part of the identity: two sources never dedupe into one job
    defines: tuple[str, ...]
    arch: str  # "sm_80"
    flags: tuple[str, ...] = ()
    # Dynamic shared memory the launcher requests at launch (ptxas sees only static smem).
    dynamic_smem: int = 0


@dataclass
class GateItem:
    """One compiled variant to check, and every reason dispatch can select it."""

    backend: str
    config: str  # the config's short() string
    num_warps: int
    head_dim: int | None
    variant: str  # what specialises it beyond the config, e.g. "fp16 d64 causal"
    arch: str  # "sm_90a"
    cc: int
    kernel: str | None  # entry function expected in the ptxas log; None: every entry
    job: TritonJob | CudaJob
    origins: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.backend} {self.arch} {self.config} {self.variant}"


def _merge(items: dict[Any, GateItem], item: GateItem) -> None:
    """Deduplicate by compiled variant (the job), keeping every origin."""
    have = items.get(item.job)
    if have is None:
        items[item.job] = item
    else:
        have.origins.extend(o for o in item.origins if o not in have.origins)


def _cc_of(cc: str) -> int:
    """ProblemKey cc "9.0" -> 90."""
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", str(cc))
    if not m:
        raise GateSetupError(f"cannot read compute capability {cc!r} (expected like '9.0')")
    return int(m.group(1)) * 10 + int(m.group(2))


def _cc_of_arch(arch: str) -> int:
    """"sm_90a" -> 90."""
    m = re.fullmatch(r"sm_(\d+)[a-z]?", arch)
    if not m:
        raise GateSetupError(f"cannot read architecture {arch!r} (expected like 'sm_90')")
    return int(m.group(1))


def _heuristic_problems(dtypes: tuple[str, ...], head_dims: tuple[int, ...]) -> list[Problem]:
    out = []
    for dt in dtypes:
        for d in head_dims:
            for causal in (False, True):
                for _name, b, h, s in HEURISTIC_REGIMES:
                    out.append(Problem(dt, d, causal, b, h, h, s, s))
    return out


def _heuristic(backend: str, p: Problem, cc: str | None = None) -> Any:
    from ..tuning.dispatch import heuristic_config
    from ..tuning.key import ProblemKey

    gpu = _HEURISTIC_GPU if cc is None else (_HEURISTIC_GPU[0], cc)
    key = ProblemKey.make(
        *gpu, backend, p.dtype, p.head_dim, p.causal, p.hq // p.hkv, p.sq, p.sk, p.b * p.hq,
    )
    return heuristic_config(key, p.b * p.hq, p.sq, p.sk, DEFAULT_GPU.sms)


def _table_problems(backend: str, directory: Path | None, notes: list[str]):
    """(problem, config, cc, origin) for each table entry dispatch would accept."""
    from ..tuning import tables as tables_mod
    from ..tuning.cache import entry_problem
    from ..tuning.key import ProblemKey
    from ..tuning.space import space_for

    d = directory if directory is not None else tables_mod.tables_dir()
    if not d.is_dir():
        notes.append(f"no tuning tables at {d}: heuristic configs only")
        return
    found = sorted(d.glob("*.json"))
    tables = tables_mod.load_tables(d)
    if len(tables) < len(found):
        notes.append(
            f"{len(found) - len(tables)} table file(s) in {d} are unreadable; dispatch ignores "
            "them too"
        )
    for t in tables:
        for key_str, entry in t.entries.items():
            where = f"table {t.name} {key_str}"
            try:
                key = ProblemKey.from_str(key_str)
            except (KeyError, ValueError) as e:
                notes.append(f"{where}: unreadable key ({e}); dispatch never matches it")
                continue
            if entry_problem(entry) is not None or entry.get("backend") != backend:
                continue
            space = space_for(backend, key.head_dim, key.dtype)
            try:
                cfg = space.from_dict(entry["config"])
            except (KeyError, TypeError, ValueError):
                cfg = None
            if cfg is None or not space.contains(cfg):
                notes.append(f"{where}: config {entry['config']} rejected by dispatch; skipped")
                continue
            # A representative problem in the key's buckets (see the module docstring).
            hkv = 16
            hq = hkv * key.gqa
            b = max(1, key.bh // hq)
            p = Problem(key.dtype, key.head_dim, key.causal, b, hq, hkv, key.sq, key.sk)
            yield p, cfg, _cc_of(key.cc), f"{t.name}: {key_str}"


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------


def triton_spec(p: Problem, cfg: Any, stream_k_on: bool | None = None) -> Any:
    """The KernelSpec the launcher compiles for problem ``p`` with ``cfg`` (contiguous BHSD
    tensors from torch's allocator: every pointer 16-byte aligned). ``stream_k_on``: whether
    the opt-in stream-K last wave is on (None: as ``FLASHCORE_STREAM_K`` says)."""
    from ..backends.triton.config import cross_tile, hopper_grid, stream_k
    from ..backends.triton.fwd import KernelSpec, _int_flags

    def bhsd(h: int, s: int) -> tuple[int, int, int, int]:
        return (h * s * p.head_dim, s * p.head_dim, p.head_dim, 1)

    q, kv = bhsd(p.hq, p.sq), bhsd(p.hkv, p.sk)
    ints = (*q, *kv, *kv, *q, p.hq, p.sq, p.sk, p.hq // p.hkv, 0)
    return KernelSpec(
        config=cfg, dtype=p.dtype, head_dim=p.head_dim, is_causal=p.causal, store_lse=False,
        pos_scale=True, int_flags=_int_flags(ints), ptr_aligned=(True,) * 5,
        cross_tile=cross_tile(cfg, p.head_dim, p.causal, p.sk),
        stream_k=bool(cfg.hopper) and stream_k(
            cfg, p.head_dim, p.causal, p.sk,
            hopper_grid(cfg, p.b, p.hq, p.sq, p.causal, GATE_NUM_SMS)[0], GATE_NUM_SMS,
            stream_k_on),
    )


def _triton_item(p: Problem, cfg: Any, cc: int, origin: str,
                 stream_k_on: bool | None = None) -> GateItem:
    c = " causal" if p.causal else ""
    g = f" gqa{p.hq // p.hkv}" if p.hq != p.hkv else ""
    spec = triton_spec(p, cfg, stream_k_on)
    # The cross-tile pipeline is a separate kernel of the same config (causal: short keys only).
    x = (" cross-tile" if spec.cross_tile else "") + (" stream-K" if spec.stream_k else "")
    return GateItem(
        backend="triton", config=cfg.short(), num_warps=cfg.num_warps, head_dim=p.head_dim,
        variant=f"{p.dtype} d{p.head_dim}{c}{g}{x}", arch=f"sm_{cc}{'a' if cc >= 90 else ''}",
        cc=cc, kernel="_attn_fwd_hopper_kernel" if cfg.hopper else "_attn_fwd_kernel",
        job=TritonJob(spec, cc),
        origins=[origin],
    )


def triton_items(
    tables: Path | None = None,
    notes: list[str] | None = None,
    dtypes: tuple[str, ...] = TRITON_DTYPES,
    head_dims: tuple[int, ...] = TRITON_HEAD_DIMS,
) -> list[GateItem]:
    """Every Triton variant dispatch can select, deduplicated, heuristic ones first."""
    notes = notes if notes is not None else []
    items: dict[Any, GateItem] = {}
    for p in _heuristic_problems(dtypes, head_dims):
        cfg = _heuristic("triton", p)
        for c, why in _with_tma_fallback(cfg, p.head_dim):
            _merge_with_stream_k(items, p, c, TRITON_CC, f"heuristic{why}: {p.describe()}")
    for p, cfg, cc, origin in _table_problems("triton", tables, notes):
        for c, why in _with_tma_fallback(cfg, p.head_dim):
            _merge_with_stream_k(items, p, c, cc, origin + why)
    return list(items.values())


def _merge_with_stream_k(items: dict[Any, GateItem], p: Problem, cfg: Any, cc: int,
                         origin: str) -> None:
    """The variant dispatch launches by default, and for a config the opt-in stream-K last
    wave (``FLASHCORE_STREAM_K=1``) can take at the problem's head dim, its stream-K variant
    too (it must pass the gate before anyone turns it on): the kernel does not depend on the
    lengths, so it is checked whenever some non-causal length and grid would select it."""
    from ..backends.triton.config import STREAM_K_MIN_BLOCKS, stream_k

    _merge(items, _triton_item(p, cfg, cc, origin, stream_k_on=False))
    if not getattr(cfg, "hopper", 0) or p.causal:
        return
    keys = cfg.block_n * STREAM_K_MIN_BLOCKS
    if stream_k(cfg, p.head_dim, False, keys, 2 * GATE_NUM_SMS + 1, GATE_NUM_SMS, True):
        h = 2 * GATE_NUM_SMS + 1  # one row block a head: 265 tiles, a short last wave
        sk = Problem(p.dtype, p.head_dim, False, 1, h, h, cfg.block_m * (cfg.num_warps // 4),
                     keys)
        _merge(items, _triton_item(sk, cfg, cc, origin + " (FLASHCORE_STREAM_K=1)",
                                   stream_k_on=True))


def _with_tma_fallback(cfg: Any, head_dim: int) -> list[tuple[Any, str]]:
    """The config, and for a TMA config also the one the launcher falls back to when a call's
    strides or pointers cannot go through the copy engine (TritonFwdPlan uses the same
    ``tma_fallback``)."""
    from ..backends.triton.config import tma_fallback

    out = [(cfg, "")]
    if getattr(cfg, "tma", 0):
        out.append((tma_fallback(cfg, head_dim), " (TMA fallback layout)"))
    return out


def triton_space_items(
    dtypes: tuple[str, ...] = TRITON_DTYPES, head_dims: tuple[int, ...] = TRITON_HEAD_DIMS
) -> list[GateItem]:
    """Every config of the Triton search space (the tuner's, after its prune predicate) for
    each dtype, head dim and causal flag: what the tuner may try, not what dispatch selects.
    For pruning configs that spill before tuning; far more compiles than the gate's default."""
    from ..backends.triton.config import search_space

    _name, b, h, s = HEURISTIC_REGIMES[-1]
    items: dict[Any, GateItem] = {}
    for dt in dtypes:
        for d in head_dims:
            for cfg in search_space(d, 4 if dt == "fp32" else 2):
                for causal in (False, True):
                    p = Problem(dt, d, causal, b, h, h, s, s)
                    _merge(items, _triton_item(p, cfg, TRITON_CC, "search space"))
    return list(items.values())


# ----------------------------------------------------------------------------------------------
# CUDA C++
# ----------------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _cuda_compiler():
    try:
        compiler = importlib.import_module("flashcore.backends.cuda.compiler")
    except ImportError as e:
        raise GateSetupError(
            "cannot gate the CUDA backend: flashcore.backends.cuda.compiler is not importable "
            f"({e}); it must provide kernel_source_path() and compile_defines(). Use "
            "--backend triton to gate Triton only."
        ) from e
    for name in ("kernel_source_path", "compile_defines"):
        if not callable(getattr(compiler, name, None)):
            raise GateSetupError(f"flashcore.backends.cuda.compiler has no {name}()")
    return compiler


def _cuda_item(
    compiler: Any, source: Path, sha: str, flags: tuple[str, ...], p: Problem, cfg: Any,
    arch: str, origin: str,
) -> GateItem:
    from ..backends.cuda import config as cuda_config

    defines = tuple(compiler.compile_defines(cfg, p.dtype, p.head_dim, p.causal))
    # What the launcher (backends/cuda/fwd.py) requests as dynamic shared memory.
    smem = int(cuda_config.smem_bytes(cfg, p.head_dim))
    c = " causal" if p.causal else ""
    return GateItem(
        backend="cuda", config=cfg.short(), num_warps=cfg.num_warps, head_dim=p.head_dim,
        variant=f"{p.dtype} d{p.head_dim}{c}", arch=arch, cc=_cc_of_arch(arch),
        kernel="flashcore_attn_fwd",
        job=CudaJob(str(source), sha, defines, arch, flags, smem), origins=[origin],
    )


def cuda_item(p: Problem, cfg: Any, arch: str, origin: str) -> GateItem:
    """One CUDA C++ variant, as the runtime would compile it (the tuner's gate uses this)."""
    compiler = _cuda_compiler()
    source = Path(compiler.kernel_source_path())
    flags_fn = getattr(compiler, "gate_nvcc_flags", None)
    flags = tuple(flags_fn()) if callable(flags_fn) else ("-std=c++17",)
    return _cuda_item(compiler, source, _sha(source), flags, p, cfg, arch, origin)


def cuda_items(
    tables: Path | None = None,
    notes: list[str] | None = None,
    archs: tuple[str, ...] = CUDA_ARCHS,
) -> list[GateItem]:
    """Every CUDA C++ variant dispatch can select: heuristic configs for each of ``archs``,
    table entries for their table's architecture."""
    from ..backends.cuda import config as cuda_config

    notes = notes if notes is not None else []
    compiler = _cuda_compiler()
    source = Path(compiler.kernel_source_path())
    if not source.is_file():
        raise GateSetupError(f"CUDA kernel source {source} does not exist")
    sha = _sha(source)
    # The runtime compiles with NVRTC "-std=c++17" plus the defines; the backend can name other
    # flags for nvcc to mirror its own options through gate_nvcc_flags().
    flags_fn = getattr(compiler, "gate_nvcc_flags", None)
    flags = tuple(flags_fn()) if callable(flags_fn) else ("-std=c++17",)

    def item(p: Problem, cfg: Any, arch: str, origin: str) -> GateItem:
        return _cuda_item(compiler, source, sha, flags, p, cfg, arch, origin)

    items: dict[Any, GateItem] = {}
    heads = tuple(cuda_config.SUPPORTED_HEAD_DIMS)
    for p in _heuristic_problems(CUDA_DTYPES, heads):
        for arch in archs:
            # The heuristic sizes shared memory to the architecture (sm_80: 163 KiB).
            cc = _cc_of_arch(arch)
            cfg = _heuristic("cuda", p, f"{cc // 10}.{cc % 10}")
            _merge(items, item(p, cfg, arch, f"heuristic: {p.describe()}"))
    for p, cfg, cc, origin in _table_problems("cuda", tables, notes):
        _merge(items, item(p, cfg, f"sm_{cc}", origin))
    return list(items.values())


def cuda_fixture_items(
    source: Path, variants: list[tuple[str, list[str]]], archs: tuple[str, ...] = CUDA_ARCHS
) -> list[GateItem]:
    """Items for an arbitrary .cu file: one per (name, defines) and architecture, every entry
    function checked. For fixtures and for gating an experimental kernel before it ships;
    budgets are those of a 4-warp CUDA config."""
    if not source.is_file():
        raise GateSetupError(f"--cuda-source {source} does not exist")
    sha = _sha(source)
    out: dict[Any, GateItem] = {}
    for name, defines in variants or [("default", [])]:
        for arch in archs:
            _merge(out, GateItem(
                backend="cuda", config=name, num_warps=4, head_dim=None,
                variant=" ".join(defines) or "-", arch=arch, cc=_cc_of_arch(arch),
                kernel=None, job=CudaJob(str(source), sha, tuple(defines), arch),
                origins=[f"--cuda-source {source}"],
            ))
    return list(out.values())

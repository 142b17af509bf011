"""Run-time compilation of fwd.cu with NVRTC (through cuda.core), with an on-disk cubin cache.

Cubins are keyed by a hash of the source, the -D configuration, the target arch, the NVRTC
version and the options; a cache entry is written atomically (temp file + rename) under a file
lock, so concurrent processes never see a torn file. Nothing here is imported by
``import flashcore``: cuda.core is needed only when the CUDA backend is first used.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from .config import CudaFwdConfig

__all__ = [
    "CudaBackendUnavailable",
    "cache_dir",
    "compile_cubin",
    "compile_defines",
    "include_dirs",
    "kernel_source_path",
]

KERNEL_NAME = "flashcore_attn_fwd"
PROBE_NAME = "flashcore_wmma_layout_probe"
A_PROBE_NAME = "flashcore_wmma_a_probe"


class CudaBackendUnavailable(RuntimeError):
    """cuda.core / NVRTC / the CUDA headers are missing: the CUDA backend cannot compile."""


def kernel_source_path() -> Path:
    return Path(__file__).with_name("fwd.cu")


def compile_defines(
    cfg: CudaFwdConfig, dtype: str, head_dim: int, is_causal: bool, p_regs: bool = True
) -> list[str]:
    """The -D flags that select one kernel variant (shared by NVRTC here and nvcc in the gate).
    ``p_regs`` False stages P through shared memory (for a GPU whose WMMA operand layout fails
    fwd.cu's probe)."""
    return [
        f"-DFC_NUM_WARPS={cfg.num_warps}",
        f"-DFC_BLOCK_N={cfg.block_n}",
        f"-DFC_STAGES={cfg.stages}",
        f"-DFC_HEAD_DIM={head_dim}",
        f"-DFC_BF16={int(dtype == 'bf16')}",
        f"-DFC_CAUSAL={int(is_causal)}",
        f"-DFC_KV_GROUPS={cfg.kv_groups}",
        f"-DFC_P_REGS={int(p_regs)}",
    ]


def cache_dir() -> Path:
    """$FLASHCORE_CACHE_DIR/cubin, else ~/.cache/flashcore/cubin."""
    root = os.environ.get("FLASHCORE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "flashcore"
    )
    return Path(root) / "cubin"


def include_dirs() -> list[str]:
    """CUDA's include dir and, on CUDA 13, CCCL's (cuda/pipeline moved under include/cccl)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        inc = Path(root) / "include"
        if (inc / "cuda_fp16.h").exists():
            dirs = [str(inc)]
            if (inc / "cccl").is_dir():
                dirs.insert(0, str(inc / "cccl"))
            return dirs
    raise CudaBackendUnavailable(
        "backend='cuda': CUDA headers (cuda_fp16.h, cuda/pipeline) not found under $CUDA_HOME, "
        "$CUDA_PATH or /usr/local/cuda; install the CUDA toolkit headers or use backend='triton'"
    )


@lru_cache(maxsize=1)
def _nvrtc_version() -> str:
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise CudaBackendUnavailable(
            "backend='cuda' needs cuda.core and cuda.bindings (NVRTC): pip install cuda-core "
            f"cuda-bindings, or use backend='triton' ({e})"
        ) from e
    err, major, minor = nvrtc.nvrtcVersion()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CudaBackendUnavailable(f"backend='cuda': nvrtcVersion failed: {err}")
    return f"{major}.{minor}"


def _options(defines: list[str], arch: str) -> list[str]:
    return [f"-arch={arch}", "-std=c++17", *defines]


def compile_cubin(defines: list[str], arch: str) -> bytes:
    """NVRTC-compile fwd.cu with ``defines`` for ``arch`` (e.g. "sm_90"), cached on disk."""
    src = kernel_source_path().read_text()
    opts = _options(defines, arch)
    key = hashlib.sha256(
        "\0".join([src, *opts, _nvrtc_version(), *include_dirs()]).encode()
    ).hexdigest()[:32]
    d = cache_dir()
    path = d / f"{key}.cubin"
    if path.exists():
        return path.read_bytes()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():  # another process compiled it while we waited
            return path.read_bytes()
        cubin = _nvrtc_compile(src, defines, arch)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        os.replace(tmp, path)
    return cubin


def _nvrtc_compile(src: str, defines: list[str], arch: str) -> bytes:
    try:
        from cuda.core import Program, ProgramOptions
    except ImportError:
        try:
            from cuda.core.experimental import Program, ProgramOptions
        except ImportError as e:
            raise CudaBackendUnavailable(
                "backend='cuda' needs cuda.core (pip install cuda-core), or use "
                f"backend='triton' ({e})"
            ) from e
    macros = []
    for d in defines:
        name, _, val = d[2:].partition("=")
        macros.append((name, val))
    opts = ProgramOptions(
        name="flashcore_fwd.cu", arch=arch, std="c++17", include_path=include_dirs(),
        define_macro=macros,
    )
    try:
        obj = Program(src, code_type="c++", options=opts).compile("cubin")
    except Exception as e:  # NVRTC's log is in the message
        raise RuntimeError(
            f"NVRTC failed to compile fwd.cu ({' '.join(defines)}, {arch}):\n{e}"
        ) from e
    code = obj.code
    return bytes(code) if not isinstance(code, bytes) else code

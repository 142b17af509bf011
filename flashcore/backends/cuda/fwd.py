"""Launcher of the CUDA C++ forward kernel (fwd.cu): load, configure, launch on torch's stream.

Compilation is NVRTC through cuda.core (compiler.py); loading and launching go through
cuda.bindings' driver API, with every call's status checked. The first module loaded per
device and dtype runs the kernel's two WMMA layout probes: the accumulator layout the softmax
relies on (a mismatch refuses to run) and the matrix_a layout that lets P stay in registers (a
mismatch switches to the FC_P_REGS=0 build, which stages P through shared memory).
"""

from __future__ import annotations

import ctypes
import warnings

import torch

from .compiler import (
    A_PROBE_NAME,
    KERNEL_NAME,
    PROBE_NAME,
    CudaBackendUnavailable,
    compile_cubin,
    compile_defines,
)
from .config import CudaFwdConfig, smem_bytes, unsupported_reasons

__all__ = ["CudaFwdPlan", "attention_fwd"]

_LOG2E = 1.4426950408889634
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise CudaBackendUnavailable(
            f"backend='cuda' needs cuda.bindings (pip install cuda-bindings) ({e}); "
            "or use backend='triton'"
        ) from e
    return driver


def _check(result, what: str):
    """cuda.bindings returns (CUresult, *values): raise on anything but success."""
    driver = _driver()
    err, *vals = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        label = name.decode() if name else str(err)
        raise RuntimeError(f"flashcore cuda backend: {what} failed: {label}")
    return vals[0] if len(vals) == 1 else vals


# (defines, device index) -> CUmodule
_MODULES: dict[tuple, object] = {}
# (device index, dtype) -> whether P's WMMA operand can be built from the S registers
_P_REGS: dict[tuple[int, str], bool] = {}


def _module(defines: tuple[str, ...], dev: int):
    module = _MODULES.get((defines, dev))
    if module is None:
        driver = _driver()
        cap = torch.cuda.get_device_capability(dev)
        cubin = compile_cubin(list(defines), f"sm_{cap[0]}{cap[1]}")
        with torch.cuda.device(dev):
            torch.cuda.init()
            torch.cuda.synchronize()  # makes torch's primary context current on this thread
            module = _check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
        _MODULES[(defines, dev)] = module
    return module


def _load(config: CudaFwdConfig, dtype: str, head_dim: int, causal: bool, dev: int):
    """(CUfunction, dynamic smem bytes) of this kernel variant on device ``dev``."""
    key = (dev, dtype)
    p_regs = _P_REGS.get(key, True)
    module = _module(tuple(compile_defines(config, dtype, head_dim, causal, p_regs)), dev)
    if key not in _P_REGS:
        _probe_accumulator(module, dev)
        p_regs = _P_REGS[key] = _probe_operand(module, dev)
        if not p_regs:
            warnings.warn(
                "flashcore cuda backend: this GPU's WMMA matrix_a layout does not match the "
                "accumulator's; P goes through shared memory (slower)", stacklevel=3,
            )
            module = _module(tuple(compile_defines(config, dtype, head_dim, causal, False)), dev)
    driver = _driver()
    smem = smem_bytes(config, head_dim, p_regs)
    limit = torch.cuda.get_device_properties(dev).shared_memory_per_block_optin
    if smem > limit:
        raise ValueError(
            f"backend='cuda': config {config.short()} needs {smem} bytes of shared memory per "
            f"block at head_dim={head_dim}; this GPU allows {limit} (fewer stages, a smaller "
            "block_n or fewer kv_groups fit"
            + ("" if p_regs else "; P goes through shared memory on this GPU") + ")"
        )
    with torch.cuda.device(dev):
        fn = _check(
            driver.cuModuleGetFunction(module, KERNEL_NAME.encode()), "cuModuleGetFunction"
        )
        _check(
            driver.cuFuncSetAttribute(
                fn, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem,
            ),
            "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)",
        )
    return fn, smem


def _run_probe(module, dev: int, name: str, n: int) -> torch.Tensor:
    driver = _driver()
    probe = _check(driver.cuModuleGetFunction(module, name.encode()), "cuModuleGetFunction")
    out = torch.zeros(32 * n, dtype=torch.int32, device=f"cuda:{dev}")
    stream = driver.CUstream(torch.cuda.current_stream(dev).cuda_stream)
    args = ((out.data_ptr(),), (ctypes.c_void_p,))
    _check(driver.cuLaunchKernel(probe, 1, 1, 1, 32, 1, 1, 0, stream, args, 0), f"{name} launch")
    torch.cuda.synchronize(dev)
    return out


def _probe_accumulator(module, dev: int) -> None:
    """The kernel reads WMMA accumulator elements by (row, col); refuse to run if this GPU's
    layout differs from the one it assumes (sm_80/sm_90's)."""
    out = _run_probe(module, dev, PROBE_NAME, 8)
    if not bool(out.all()):
        raise RuntimeError(
            "flashcore cuda backend: this GPU's WMMA accumulator layout differs from the one "
            f"fwd.cu assumes ({int((out == 0).sum())} of 256 elements); use backend='triton'"
        )


def _probe_operand(module, dev: int) -> bool:
    """Whether every matrix_a element sits in the lane (and at the element FC_PA_MAP names)
    of the accumulator element with the same (row, col)."""
    return bool(_run_probe(module, dev, A_PROBE_NAME, 16).all())


_ARG_TYPES = (
    (ctypes.c_void_p,) * 5 + (ctypes.c_longlong,) * 12 + (ctypes.c_int,) * 6 + (ctypes.c_float,)
)


def _alloc_out(q: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def _alloc_lse(b: int, h: int, s: int, device: torch.device) -> torch.Tensor:
    return torch.empty((b, h, s), device=device, dtype=torch.float32)


class CudaFwdPlan:
    """Launch of fwd.cu for inputs shaped and strided like the ones given (see TritonFwdPlan)."""

    def __init__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
        is_causal: bool, causal_off: int, return_lse: bool, config: CudaFwdConfig,
    ) -> None:
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        self.shape = (b, hq, sq)
        self.return_lse = return_lse
        self.device = q.device
        self.dev = q.device.index or 0  # CUDA tensors always carry their index
        self.variant = (config, _DTYPES[q.dtype], d, bool(is_causal))
        self.smem = 0  # known once loaded (depends on the probe)
        self.block = 32 * config.num_warps
        self.grid = (-(-sq // config.block_m), b * hq)
        out_stride = torch.empty_like(q, device="meta").stride()
        if out_stride[3] != 1 or any(s % 8 for s in out_stride[:3]):
            raise ValueError(f"backend='cuda': unsupported output strides {out_stride}")
        self.ints = (
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out_stride[:3],
            hq, sq, sk, hq // hkv, causal_off, int(return_lse),
        )
        self.qk_scale = scale * _LOG2E
        self.fn = None
        # Set by backend="auto": builds the plan to use for misaligned pointers (else: raise).
        self.misaligned_fallback = None
        self._fallback_plan = None

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (q.data_ptr() | k.data_ptr() | v.data_ptr()) % 16:
            # The plan was validated for these strides; a new view may still start unaligned.
            if self.misaligned_fallback is not None:
                if self._fallback_plan is None:
                    self._fallback_plan = self.misaligned_fallback()
                return self._fallback_plan(q, k, v, out)
            reasons = "\n  - ".join(unsupported_reasons(q, k, v))
            raise ValueError(f"flashcore.attention: invalid arguments:\n  - {reasons}")
        if self.fn is None:
            self.fn, self.smem = _load(*self.variant, self.dev)
        if out is None:
            out = _alloc_out(q)
        b, hq, sq = self.shape
        lse = _alloc_lse(b, hq, sq, self.device) if self.return_lse else out
        args = (
            (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
             *self.ints, self.qk_scale),
            _ARG_TYPES,
        )
        driver = _driver()
        stream = driver.CUstream(torch.cuda.current_stream(self.dev).cuda_stream)
        _check(
            driver.cuLaunchKernel(
                self.fn, self.grid[0], self.grid[1], 1, self.block, 1, 1, self.smem, stream,
                args, 0,
            ),
            "cuLaunchKernel(flashcore_attn_fwd)",
        )
        return out, (lse if self.return_lse else None)


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, is_causal: bool,
    causal_off: int, return_lse: bool, config: CudaFwdConfig, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch on validated inputs (builds a one-off :class:`CudaFwdPlan`)."""
    plan = CudaFwdPlan(
        q, k, v, scale=scale, is_causal=is_causal, causal_off=causal_off,
        return_lse=return_lse, config=config,
    )
    return plan(q, k, v, out)

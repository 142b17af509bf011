"""Launcher of the CUDA C++ forward kernel (fwd.cu): load, configure, launch on torch's stream.

Compilation is NVRTC through cuda.core (compiler.py); loading and launching go through
cuda.bindings' driver API, with every call's status checked. Each loaded module is first
checked with the WMMA accumulator-layout probe the kernel relies on.
"""

from __future__ import annotations

import ctypes

import torch

from .compiler import (
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


# (defines, device index) -> CUfunction
_FUNCTIONS: dict[tuple, object] = {}
_PROBED: set[int] = set()


def _load(defines: tuple[str, ...], dev: int, smem: int):
    fn = _FUNCTIONS.get((defines, dev))
    if fn is not None:
        return fn
    driver = _driver()
    cap = torch.cuda.get_device_capability(dev)
    arch = f"sm_{cap[0]}{cap[1]}"
    cubin = compile_cubin(list(defines), arch)
    with torch.cuda.device(dev):
        torch.cuda.init()
        torch.cuda.synchronize()  # makes torch's primary context current on this thread
        module = _check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
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
        if dev not in _PROBED:
            _probe_layout(module, dev)
            _PROBED.add(dev)
    _FUNCTIONS[(defines, dev)] = fn
    return fn


def _probe_layout(module, dev: int) -> None:
    """The kernel reads WMMA accumulator elements by (row, col); refuse to run if this GPU's
    layout differs from the one it assumes (sm_80/sm_90's)."""
    driver = _driver()
    probe = _check(driver.cuModuleGetFunction(module, PROBE_NAME.encode()), "cuModuleGetFunction")
    out = torch.zeros(32 * 8, dtype=torch.int32, device=f"cuda:{dev}")
    stream = driver.CUstream(torch.cuda.current_stream(dev).cuda_stream)
    args = ((out.data_ptr(),), (ctypes.c_void_p,))
    _check(driver.cuLaunchKernel(probe, 1, 1, 1, 32, 1, 1, 0, stream, args, 0), "probe launch")
    torch.cuda.synchronize(dev)
    if not bool(out.all()):
        raise RuntimeError(
            "flashcore cuda backend: this GPU's WMMA accumulator layout differs from the one "
            f"fwd.cu assumes ({int((out == 0).sum())} of 256 elements); use backend='triton'"
        )


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
        self.defines = tuple(compile_defines(config, _DTYPES[q.dtype], d, is_causal))
        self.smem = smem_bytes(config, d)
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
            self.fn = _load(self.defines, self.dev, self.smem)
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

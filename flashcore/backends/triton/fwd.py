"""Triton forward attention: the kernel and its launcher.

One program computes ``BLOCK_M`` query rows of one (batch, head) against all keys it may see,
with the online softmax of FlashAttention-2 in the exp2 domain (softmax scale folded into one
FMA). Keys are walked in two loops: blocks every row sees in full (no masks at all), then the
ragged rest (sequence tail and the causal diagonal) with masks. Any strides: each tensor is
addressed through its own (batch, head, seq, dim) strides, so BSHD views cost no copy.

The launcher compiles each (config, dtype, specialisation) once with an explicit signature and
then launches the compiled kernel directly: no per-call argument binding or cache hashing,
which is most of Triton's ~20 us of host overhead per call at small shapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from .config import TritonFwdConfig, block_d_for, hopper_fallback, tma_fallback

__all__ = [
    "attention_fwd", "compile_fwd", "kernel_signature", "KernelSpec", "TritonFwdPlan", "INTERPRET",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    # DOT_UPCAST is set only under the interpreter, whose dot multiplies bf16's raw bits
    # (triton 3.6); the operands are already rounded to the input dtype, so upcasting them
    # computes the same products the tensor cores do.
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _attn_fwd_tile(
    acc, l_i, m_i, q,
    k_ptrs, v_ptrs, k_desc, v_desc, stride_ks, stride_vs,
    offs_m, offs_n, offs_d,
    lo, hi, Sk, causal_off, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, POS_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    k_ptrs += lo * stride_ks
    v_ptrs += lo * stride_vs
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        if MASKED:
            key_ok = (start_n + offs_n) < Sk
        if USE_TMA:
            # The copy engine zero-fills rows past Sk and columns past HEAD_DIM.
            k = k_desc.load([start_n, 0]).T
            v = v_desc.load([start_n, 0])
        elif MASKED:
            if BLOCK_D == HEAD_DIM:
                k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
            else:
                d_ok = offs_d < HEAD_DIM
                k = tl.load(k_ptrs, mask=key_ok[None, :] & d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            if BLOCK_D == HEAD_DIM:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                d_ok = offs_d < HEAD_DIM
                k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        qk = _dot(q, k, None, DOT_PRECISION, DOT_UPCAST)
        if MASKED:
            ok = key_ok[None, :]
            if IS_CAUSAL:
                ok = ok & ((start_n + offs_n)[None, :] <= (offs_m + causal_off)[:, None])
            s = tl.where(ok, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps m = -inf; subtract 0 so exp2 gives 0, not nan.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])
        else:
            if POS_SCALE:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                m_sub = m_new
                p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
            else:
                s = qk * qk_scale
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_sub = m_new
                p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    Hq, Sq, Sk, GROUP, causal_off, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr, POS_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        # Causal rows further down see more keys: start those first so the tail is short.
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = pid_bh // Hq
    off_h = pid_bh % Hq
    off_hk = off_h // GROUP
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    o_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM

    q_ptrs = q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    if USE_TMA:
        # Per-(batch, head) 2-D views [S, HEAD_DIM]; the host checked 16-byte strides/bases.
        q_desc = tl.make_tensor_descriptor(
            q_base, shape=[Sq, HEAD_DIM], strides=[stride_qs, 1], block_shape=[BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(
            k_base, shape=[Sk, HEAD_DIM], strides=[stride_ks, 1], block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(
            v_base, shape=[Sk, HEAD_DIM], strides=[stride_vs, 1], block_shape=[BLOCK_N, BLOCK_D])
        q = q_desc.load([start_m, 0])
    else:
        k_desc = None
        v_desc = None
        if BLOCK_D == HEAD_DIM:
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # K is read transposed ([BLOCK_D, BLOCK_N]) so Q @ K needs no in-register transpose.
    k_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys [0, full_hi) are visible to every row of this block; [full_hi, hi) need masks.
    if IS_CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_off, 0), Sk)
        full_hi = tl.minimum(tl.maximum(start_m + causal_off + 1, 0), Sk)
    else:
        hi = Sk
        full_hi = Sk
    full_hi = (full_hi // BLOCK_N) * BLOCK_N

    acc, l_i, m_i = _attn_fwd_tile(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, k_desc, v_desc, stride_ks, stride_vs,
        offs_m, offs_n, offs_d, 0, full_hi, Sk, causal_off, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, IS_CAUSAL, POS_SCALE, DOT_PRECISION, DOT_UPCAST,
        USE_TMA, WARP_SPECIALIZE,
    )
    acc, l_i, m_i = _attn_fwd_tile(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, k_desc, v_desc, stride_ks, stride_vs,
        offs_m, offs_n, offs_d, full_hi, hi, Sk, causal_off, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, POS_SCALE, DOT_PRECISION, DOT_UPCAST,
        USE_TMA, False,
    )

    # Rows with no visible key (bottom-right causal, Sq > Sk) end with l = 0: output 0, lse -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    if USE_TMA:
        o_desc = tl.make_tensor_descriptor(
            o_base, shape=[Sq, HEAD_DIM], strides=[stride_os, 1], block_shape=[BLOCK_M, BLOCK_D])
        o_desc.store([start_m, 0], out.to(O.dtype.element_ty))
    elif BLOCK_D == HEAD_DIM:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        log2_l = tl.math.log2(tl.where(empty, 1.0, l_i))
        lse = tl.where(empty, float("-inf"), (m_i + log2_l) * 0.6931471805599453)
        tl.store(LSE + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_PTR_NAMES = ("Q", "K", "V", "O", "LSE")
_INT_NAMES = tuple(
    f"stride_{t}{a}" for t in "qkvo" for a in "bhsd"
) + ("Hq", "Sq", "Sk", "GROUP", "causal_off")
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class KernelSpec:
    """Everything that selects one compiled variant of the kernel."""

    config: TritonFwdConfig
    dtype: str  # "fp16" | "bf16" | "fp32"
    head_dim: int
    is_causal: bool
    store_lse: bool
    pos_scale: bool
    # Per int argument (in _INT_NAMES order): 64-bit, divisible by 16, equal to 1. A unit
    # stride must become a compile-time 1: without it Triton cannot prove rows contiguous, and
    # neither vectorises the loads nor pipelines them through cp.async.
    int_flags: tuple[tuple[bool, bool, bool], ...]
    ptr_aligned: tuple[bool, ...]  # per pointer argument: 16-byte aligned
    cross_tile: bool = False  # Gluon kernel only: config.cross_tile for the problem
    stream_k: bool = False  # Gluon kernel only: config.stream_k for the problem

    def constexprs(self) -> dict[str, object]:
        return {
            "HEAD_DIM": self.head_dim,
            "BLOCK_D": block_d_for(self.head_dim),
            "BLOCK_M": self.config.block_m,
            "BLOCK_N": self.config.block_n,
            "IS_CAUSAL": self.is_causal,
            "STORE_LSE": self.store_lse,
            "POS_SCALE": self.pos_scale,
            "DOT_PRECISION": "ieee" if self.dtype == "fp32" else "tf32",
            "DOT_UPCAST": False,
            "USE_TMA": bool(self.config.tma),
            "WARP_SPECIALIZE": bool(self.config.ws),
        }


def kernel_signature(spec: KernelSpec) -> tuple[dict[str, str], dict[tuple[int, ...], list]]:
    """Explicit Triton signature and attributes (alignment hints) for one kernel variant."""
    names = _attn_fwd_kernel.arg_names
    sig: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(_PTR_NAMES):
        sig[name] = "*fp32" if name == "LSE" else f"*{spec.dtype}"
        if spec.ptr_aligned[i]:
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    for (is64, div16, one), name in zip(spec.int_flags, _INT_NAMES, strict=True):
        if one:
            sig[name] = "constexpr"
            continue
        sig[name] = "i64" if is64 else "i32"
        if div16:
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    sig["qk_scale"] = "fp32"
    for name in spec.constexprs():
        sig[name] = "constexpr"
    return sig, attrs


def compile_fwd(spec: KernelSpec, target=None):
    """Compile one variant ahead of time. ``target`` defaults to the current GPU; pass a
    ``triton.backends.compiler.GPUTarget`` to compile without one (the resource gate does)."""
    if spec.config.hopper:
        from .fwd_hopper import compile_hopper

        return compile_hopper(spec, target)
    sig, attrs = kernel_signature(spec)
    constexprs = dict(spec.constexprs())
    constexprs.update({n: 1 for f, n in zip(spec.int_flags, _INT_NAMES, strict=True) if f[2]})
    src = triton.compiler.ASTSource(
        fn=_attn_fwd_kernel, signature=sig, constexprs=constexprs, attrs=attrs
    )
    opts = {"num_warps": spec.config.num_warps, "num_stages": spec.config.num_stages}
    return triton.compile(src, target=target, options=opts)


_COMPILED: dict[tuple, object] = {}


# Output allocators, module-level so tests can swap in NaN-filled ones (poisoned outputs).
def _alloc_out(q: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def _alloc_lse(b: int, h: int, s: int, device: torch.device) -> torch.Tensor:
    return torch.empty((b, h, s), device=device, dtype=torch.float32)


def _scratch_alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # torch's caching allocator returns 512-byte aligned blocks, more than TMA's 128.
    return torch.empty(size, dtype=torch.uint8, device="cuda")


def _int_flags(vals: tuple[int, ...]) -> tuple[tuple[bool, bool, bool], ...]:
    return tuple((not (-(2**31) <= v < 2**31), v % 16 == 0, v == 1) for v in vals)


# The current stream as a raw handle: torch.cuda.current_stream() builds a Python Stream object
# per call (~1 us); this is the accessor Triton's own launcher uses.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


class TritonFwdPlan:
    """Everything about a launch that depends only on shapes, strides, dtype and options,
    computed once; calling the plan allocates the outputs and launches.

    api.attention caches one plan per (shapes, strides, dtype, options): the per-call host
    work is then the 16-byte alignment test of the pointers, the output allocation and the
    launch. Call a plan only with tensors shaped and strided like those it was made for, and an
    ``out`` (if given) strided like ``torch.empty_like(q)``: the launch arguments are cached by
    pointer alone.
    """

    def __init__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
        is_causal: bool, causal_off: int, return_lse: bool, config: TritonFwdConfig,
    ) -> None:
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        self.shape = (b, hq, sq)
        self.return_lse = return_lse
        # Output strides are those _alloc_out gives (q's layout when q is dense).
        out_stride = torch.empty_like(q, device="meta").stride()
        # Tensor descriptors need unit last-dim strides and 16-byte multiples elsewhere.
        vec = 16 // q.element_size()
        strides = (q.stride(), k.stride(), v.stride(), out_stride)
        self.tma_strides_ok = all(s[3] == 1 and not any(x % vec for x in s[:3]) for s in strides)
        # The Gluon Hopper kernel runs the problem when it can; this plan (a tl.dot config)
        # stays ready for calls whose pointers are not 16-byte aligned.
        self.hopper = None
        if config.hopper:
            from .fwd_hopper import HopperFwdPlan, hopper_unsupported

            # Its unmasked softmax takes the row max before scaling: needs scale > 0.
            why = "interpreter" if INTERPRET else hopper_unsupported(
                q.device, q.dtype, d, self.tma_strides_ok)
            if why is None and scale > 0:
                self.hopper = HopperFwdPlan(
                    q, k, scale=scale, is_causal=is_causal, causal_off=causal_off,
                    return_lse=return_lse, config=config)
            config = hopper_fallback(config, d)
        self.config = config
        self.ints = (*q.stride(), *k.stride(), *v.stride(), *out_stride,
                     hq, sq, sk, hq // hkv, causal_off)
        self.qk_scale = scale * _LOG2E
        self.grid = (triton.cdiv(sq, config.block_m), b * hq, 1)
        self.device = q.device
        self.dev_index = q.device.index if q.device.index is not None else 0
        self.spec_args = dict(
            dtype=_TRITON_DTYPE[q.dtype], head_dim=d, is_causal=is_causal,
            store_lse=return_lse, pos_scale=scale > 0, int_flags=_int_flags(self.ints),
        )
        self.kernels: dict[tuple[bool, bool, bool], tuple[object, bool]] = {}

    def _kernel(self, align: tuple[bool, bool, bool]) -> tuple[object, bool]:
        cfg = self.config
        if cfg.tma and not (self.tma_strides_ok and all(align)):
            cfg = tma_fallback(cfg, self.spec_args["head_dim"])  # no copy engine for this layout
        # out and lse come from torch's caching allocator: always 512-byte aligned.
        spec = KernelSpec(config=cfg, **self.spec_args, ptr_aligned=(*align, True, True))
        key = (spec, self.dev_index)
        kernel = _COMPILED.get(key)
        if kernel is None:
            with torch.cuda.device(self.dev_index):
                kernel = compile_fwd(spec)
                kernel._init_handles()
            _COMPILED[key] = kernel
        launcher = kernel.run
        scratch = kernel.metadata.global_scratch_size * self.grid[0] * self.grid[1]
        # Triton 3.6's C launch entry point, without the Python wrapper around it (~1 us).
        fast = launcher if (
            getattr(launcher, "profile_scratch_size", 1) == 0 and hasattr(launcher, "launch")
        ) else None
        entry = (kernel, scratch, fast)
        self.kernels[align] = entry
        return entry

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if out is None:
            out = _alloc_out(q)
        b, hq, sq = self.shape
        lse = _alloc_lse(b, hq, sq, self.device) if self.return_lse else out
        if INTERPRET:
            return self._interpret(q, k, v, out, lse)
        qp, kp, vp, op = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
        if self.hopper is not None and not (qp | kp | vp | op) & 15:
            # Tensors strided as this plan's (its contract): the pointers key the launch.
            self.hopper.run(q, k, v, out, lse, (qp, kp, vp, op, lse.data_ptr()))
            return out, (lse if self.return_lse else None)
        align = (qp % 16 == 0, kp % 16 == 0, vp % 16 == 0)
        kernel, scratch, fast = self.kernels.get(align) or self._kernel(align)
        # Every parameter in order, constexprs included (the launcher skips them).
        args = (
            kernel.packed_metadata, None, None, None, qp, kp, vp, op, lse.data_ptr(),
            *self.ints, self.qk_scale, *_CONSTEXPR_PLACEHOLDERS,
        )
        stream = _raw_stream(self.dev_index)
        if fast is not None:
            # Tensor descriptors built in the kernel live in a per-launch global scratch buffer.
            buf = torch.empty(scratch, dtype=torch.uint8, device=self.device) if scratch else None
            gx, gy, gz = self.grid
            fast.launch(gx, gy, gz, stream, kernel.function, fast.launch_cooperative_grid,
                        fast.launch_pdl, buf, None, *args)
        else:
            gx, gy, gz = self.grid
            token = _allocation._allocator.set(_scratch_alloc) if scratch else None
            try:
                kernel.run(gx, gy, gz, stream, kernel.function, *args)
            finally:
                if token is not None:
                    _allocation._allocator.reset(token)
        return out, (lse if self.return_lse else None)

    def _interpret(self, q, k, v, out, lse):
        cfg, sa = self.config, self.spec_args
        _attn_fwd_kernel[self.grid](
            q, k, v, out, lse, *self.ints, self.qk_scale,
            HEAD_DIM=sa["head_dim"], BLOCK_D=block_d_for(sa["head_dim"]), BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, IS_CAUSAL=sa["is_causal"], STORE_LSE=self.return_lse,
            POS_SCALE=sa["pos_scale"], DOT_PRECISION="ieee" if sa["dtype"] == "fp32" else "tf32",
            DOT_UPCAST=sa["dtype"] == "bf16", USE_TMA=bool(cfg.tma), WARP_SPECIALIZE=False,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out, (lse if self.return_lse else None)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    is_causal: bool,
    causal_off: int,
    return_lse: bool,
    config: TritonFwdConfig,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel on validated inputs (builds a one-off :class:`TritonFwdPlan`).

    q: [B, Hq, Sq, D], k/v: [B, Hkv, Sk, D], any strides. Returns (out [B, Hq, Sq, D] with q's
    memory layout, lse [B, Hq, Sq] fp32 or None).
    """
    plan = TritonFwdPlan(
        q, k, v, scale=scale, is_causal=is_causal, causal_off=causal_off,
        return_lse=return_lse, config=config,
    )
    return plan(q, k, v, out)


_CONSTEXPR_PLACEHOLDERS = (None,) * 11

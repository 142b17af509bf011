"""Public entry point: argument validation, backend dispatch and the torch.library custom op.

``attention`` is a drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (forward
only). In eager mode it calls the implementation directly: the custom op's Python dispatch
costs several microseconds per call, which at small shapes is as long as the kernel. Under
``torch.compile`` it goes through the registered op (``torch.ops.flashcore.attention_fwd``),
which has a fake implementation, so graphs trace with ``fullgraph=True``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .reference import attention_reference, causal_offset

__all__ = [
    "attention",
    "FlashCoreArgumentError",
    "BACKENDS",
    "CAUSAL_ALIGNS",
    "SUPPORTED_DTYPES",
    "select",
    "select_for",
]

BACKENDS = ("auto", "triton", "cuda", "reference")
CAUSAL_ALIGNS = ("top_left", "bottom_right")
SUPPORTED_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


class FlashCoreArgumentError(ValueError, TypeError):
    """Bad arguments to :func:`attention`. Subclasses both ValueError and TypeError, so either
    ``except`` clause catches it; the message lists every problem found, not just the first."""


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device})"
    return f"{type(t).__name__} {t!r}"


def _validate(
    query: Any, key: Any, value: Any, attn_mask: Any, dropout_p: Any, is_causal: Any, scale: Any,
    enable_gqa: Any, causal_align: Any, return_lse: Any, backend: Any,
) -> None:
    if attn_mask is not None:
        raise NotImplementedError(
            "flashcore.attention: attn_mask is not supported yet (got "
            f"{_describe(attn_mask)}); use is_causal=True for causal masking, or "
            "torch.nn.functional.scaled_dot_product_attention for arbitrary masks"
        )
    if isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool) and dropout_p > 0:
        raise NotImplementedError(
            f"flashcore.attention: dropout_p={dropout_p} is not supported yet; only 0.0 is "
            "(FlashCore is an inference/forward kernel for now)"
        )
    errs: list[str] = []
    tensors = {"query": query, "key": key, "value": value}
    ok = True
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            errs.append(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            ok = False
        elif t.dim() != 4:
            errs.append(
                f"{name} must be 4-D [B, H, S, D], got {t.dim()}-D with shape {tuple(t.shape)}"
            )
            ok = False
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or dropout_p < 0:
        errs.append(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not isinstance(is_causal, bool):
        errs.append(f"is_causal must be a bool, got {is_causal!r}")
    if scale is not None and (
        not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale)
    ):
        errs.append(f"scale must be None or a finite float, got {scale!r}")
    if not isinstance(enable_gqa, bool):
        errs.append(f"enable_gqa must be a bool, got {enable_gqa!r}")
    if causal_align not in CAUSAL_ALIGNS:
        errs.append(f"causal_align must be one of {CAUSAL_ALIGNS}, got {causal_align!r}")
    if not isinstance(return_lse, bool):
        errs.append(f"return_lse must be a bool, got {return_lse!r}")
    if backend not in BACKENDS:
        errs.append(f"backend must be one of {BACKENDS}, got {backend!r}")
    if ok:
        q, k, v = query, key, value
        dts = {n: t.dtype for n, t in tensors.items()}
        for n, dt in dts.items():
            if dt not in SUPPORTED_DTYPES:
                errs.append(
                    f"{n}.dtype must be one of float16, bfloat16, float32, got {dt}"
                )
        if len(set(dts.values())) > 1:
            errs.append(
                "query, key and value must share one dtype, got "
                + ", ".join(f"{n}={dt}" for n, dt in dts.items())
            )
        devs = {n: t.device for n, t in tensors.items()}
        if len(set(devs.values())) > 1:
            errs.append(
                "query, key and value must be on one device, got "
                + ", ".join(f"{n}={d}" for n, d in devs.items())
            )
        b, hq, sq, d = q.shape
        if k.shape[0] != b or v.shape[0] != b:
            errs.append(
                f"batch sizes differ: query {b}, key {k.shape[0]}, value {v.shape[0]}"
            )
        if k.shape[1] != v.shape[1]:
            errs.append(f"key and value head counts differ: key {k.shape[1]}, value {v.shape[1]}")
        if k.shape[2] != v.shape[2]:
            errs.append(
                f"key and value sequence lengths differ: key {k.shape[2]}, value {v.shape[2]}"
            )
        if k.shape[3] != d or v.shape[3] != d:
            errs.append(
                f"head dims differ: query {d}, key {k.shape[3]}, value {v.shape[3]}; "
                "FlashCore needs one head dim for all three"
            )
        if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d % 8 == 0):
            errs.append(
                f"head dim D={d} is not supported: FlashCore supports multiples of 8 from "
                f"{MIN_HEAD_DIM} to {MAX_HEAD_DIM}"
            )
        for n, t in tensors.items():
            if 0 in t.shape:
                errs.append(
                    f"{n} has an empty dimension, shape {tuple(t.shape)}; every size must be >= 1"
                )
        hkv = k.shape[1]
        if hkv > 0 and hq % hkv != 0:
            errs.append(
                f"query heads Hq={hq} must be a multiple of key/value heads Hkv={hkv}"
            )
        elif hkv != hq and enable_gqa is False:
            errs.append(
                f"query heads Hq={hq} != key/value heads Hkv={hkv}: pass enable_gqa=True for "
                "grouped-query attention"
            )
        if backend in ("triton", "cuda") and q.device.type == "cpu" and not (
            backend == "triton" and _interpret()
        ):
            hint = (
                "backend='triton' runs on CPU only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing flashcore)"
                if backend == "triton"
                else "backend='cuda' needs CUDA tensors"
            )
            errs.append(f"query is on {q.device}: {hint}; backend='auto' runs the reference on CPU")
        if backend == "cuda" and not errs:
            from .backends.cuda.config import unsupported_reasons

            errs.extend(unsupported_reasons(q, k, v))
    if errs:
        raise FlashCoreArgumentError(
            "flashcore.attention: invalid arguments:\n  - " + "\n  - ".join(errs)
        )


_DEVICE_INFO: dict[int, tuple[str, str, int]] = {}


def _device_info(dev: torch.device) -> tuple[str, str, int]:
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    info = _DEVICE_INFO.get(idx)
    if info is None:
        p = torch.cuda.get_device_properties(idx)
        info = (p.name, f"{p.major}.{p.minor}", p.multi_processor_count)
        _DEVICE_INFO[idx] = info
    return info


_SELECTIONS: dict[tuple, Any] = {}
# Launch plans of validated CUDA calls (see attention); bounded so shape churn cannot grow it.
_PLANS: dict[tuple, Any] = {}
_MAX_PLANS = 1024


def select(q: torch.Tensor, k: torch.Tensor, is_causal: bool, backend: str):
    """The :class:`flashcore.tuning.dispatch.Selection` (backend, config, why) for these inputs.

    Memoised per problem: after the first call the lookup is one dict access.
    """
    b, hq, sq, d = q.shape
    return select_for(q.device, q.dtype, b, hq, k.shape[1], sq, k.shape[2], d, is_causal, backend)


def select_for(
    device: torch.device, dtype: torch.dtype, b: int, hq: int, hkv: int, sq: int, sk: int,
    d: int, is_causal: bool, backend: str,
):
    """:func:`select` from shapes alone (``flashcore info --shape`` has no tensors)."""
    memo = (device.type, device.index, dtype, d, is_causal, hq // hkv, sq, sk, b * hq, backend)
    sel = _SELECTIONS.get(memo)
    if sel is None:
        from .tuning.dispatch import select_config
        from .tuning.key import ProblemKey

        if device.type == "cuda":
            gpu, cc, sms = _device_info(device)
        else:
            gpu, cc, sms = "cpu", "0.0", 132
        key = ProblemKey.make(
            gpu, cc, backend, SUPPORTED_DTYPES[dtype], d, is_causal, hq // hkv, sq, sk, b * hq
        )
        sel = select_config(key, b * hq, sq, sk, sms)
        _SELECTIONS[memo] = sel
    return sel


def _make_plan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool,
    causal_align: str, return_lse: bool, backend: str, config: Any = None,
):
    """A callable ``(q, k, v) -> (out, lse | None)`` for inputs shaped and strided like these.

    ``config`` overrides dispatch (the tuner and the bench use it)."""
    auto_fallback = None
    if backend == "auto":
        if q.device.type != "cuda":
            backend = "reference"
        else:
            # User cache, then shipped table, then heuristic; either GPU backend may win.
            sel = select(q, k, is_causal, "auto")
            if sel.backend == "cuda":
                from .backends.cuda.config import unsupported_reasons

                if unsupported_reasons(q, k, v):  # strides/alignment a table cannot see
                    sel = select(q, k, is_causal, "triton")
                else:
                    # A later call with these strides may still start unaligned: "auto" then
                    # runs Triton instead of raising as backend="cuda" does.
                    def auto_fallback():
                        return _make_plan(
                            q, k, v, scale, is_causal, causal_align, return_lse, "triton"
                        )
            backend = sel.backend
            if config is None:
                config = sel.config
    if backend == "reference":
        compute = torch.float64 if q.dtype == torch.float32 else torch.float32

        def reference_plan(q, k, v):
            ref_out, ref_lse = attention_reference(
                q, k, v, is_causal=is_causal, scale=scale, causal_align=causal_align,
                compute_dtype=compute,
            )
            out = torch.empty_like(q)
            out.copy_(ref_out)
            return out, (ref_lse.float() if return_lse else None)

        return reference_plan
    off = causal_offset(q.shape[2], k.shape[2], causal_align) if is_causal else 0
    if config is None:
        config = select(q, k, is_causal, backend).config
    if backend == "triton":
        from .backends.triton.fwd import TritonFwdPlan as Plan
    else:
        from .backends.cuda.fwd import CudaFwdPlan as Plan
    plan = Plan(
        q, k, v, scale=scale, is_causal=is_causal, causal_off=off, return_lse=return_lse,
        config=config,
    )
    if auto_fallback is not None:
        plan.misaligned_fallback = auto_fallback
    return plan


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool,
    causal_align: str, return_lse: bool, backend: str, config: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run one backend on validated inputs, with no plan caching (tuner, bench, custom op)."""
    plan = _make_plan(q, k, v, scale, is_causal, causal_align, return_lse, backend, config)
    return plan(q, k, v)


@torch.library.custom_op("flashcore::attention_fwd", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool,
    causal_align: str, return_lse: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _forward(q, k, v, scale, is_causal, causal_align, return_lse, backend)
    if lse is None:
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


@_attention_op.register_fake
def _attention_op_fake(q, k, v, scale, is_causal, causal_align, return_lse, backend):
    out = torch.empty_like(q)
    shape = (q.shape[0], q.shape[1], q.shape[2]) if return_lse else (0,)
    return out, q.new_empty(shape, dtype=torch.float32)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    causal_align: str = "top_left",
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused scaled-dot-product attention, called like SDPA.

    Args:
        query: [B, Hq, Sq, D]; key, value: [B, Hkv, Sk, D]. Any strides (a BSHD tensor seen
            through ``.transpose(1, 2)`` costs no copy). fp16/bf16 (fp32 accumulation) or fp32.
            D: a multiple of 8 from 16 to 256.
        attn_mask, dropout_p: not supported yet (NotImplementedError unless None / 0.0).
        is_causal: causal mask; diagonal placed by ``causal_align``.
        scale: softmax scale, default 1/sqrt(D).
        enable_gqa: allow Hq to be a multiple of Hkv (grouped-query attention, no K/V copies).
        causal_align: "top_left" (SDPA's convention: row i sees keys j <= i) or "bottom_right"
            (FlashAttention's KV-cache convention: row i sees keys j <= i + Sk - Sq).
        return_lse: also return the natural-log log-sum-exp of each row, fp32 [B, Hq, Sq].
        backend: "auto" (user tuning cache, shipped table, then heuristic; the reference on
            CPU), "triton", "cuda" or "reference".

    Returns:
        out [B, Hq, Sq, D] in the input dtype and in query's memory layout; with
        ``return_lse=True`` the tuple (out, lse). Rows with no key to attend to (bottom-right
        causal with Sq > Sk) give out 0 and lse -inf.
    """
    plan = pkey = None
    if not torch.compiler.is_compiling() and getattr(query, "is_cuda", False):
        # Fast path: everything validation and dispatch look at, as one hashable key. A hit
        # means these exact arguments were validated before and skips straight to the launch.
        try:
            # Device as (is_cuda, index): cheaper than hashing torch.device. get_device() alone
            # would not do: it gives other accelerators (xpu, mps) their own index too.
            pkey = (
                query.shape, key.shape, value.shape, query.stride(), key.stride(),
                value.stride(), query.dtype, key.dtype, value.dtype, query.get_device(),
                key.get_device(), value.get_device(), key.is_cuda, value.is_cuda, is_causal,
                scale, enable_gqa, causal_align, return_lse, backend, dropout_p,
                attn_mask is None,
            )
            plan = _PLANS.get(pkey)
        except (AttributeError, TypeError):
            pkey = None
    if plan is None:
        _validate(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
            causal_align, return_lse, backend,
        )
    if torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
    ):
        raise NotImplementedError(
            "flashcore.attention: backward is not implemented yet; call it under "
            "torch.no_grad() / torch.inference_mode(), or detach the inputs"
        )
    if plan is None:
        sc = float(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        if torch.compiler.is_compiling():
            out, lse = torch.ops.flashcore.attention_fwd(
                query, key, value, sc, is_causal, causal_align, return_lse, backend
            )
            return (out, lse) if return_lse else out
        plan = _make_plan(query, key, value, sc, is_causal, causal_align, return_lse, backend)
        if pkey is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[pkey] = plan
    out, lse = plan(query, key, value)
    return (out, lse) if return_lse else out

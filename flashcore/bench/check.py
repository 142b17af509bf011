"""Correctness gate run before any timing: each provider's output against the reference.

Large problems are checked on a random subset of query rows (the first and last always
included) with :func:`flashcore.reference.attention_reference`'s ``rows=``, at O(rows * Sk)
cost. The pass rule is the one of DESIGN.md (FlashAttention's test rule) with an atol:

    max |out - ref| <= 2 * max |ref_lowp - ref| + ATOL_EPS[dtype] * max |ref|

``ref`` is the reference in fp32; ``ref_lowp`` is the same reference computed in the input
dtype (what PyTorch's plain math gets in fp16/bf16), so the bound scales with how hard the
problem is numerically. The atol term is 4 units of the dtype's epsilon (fp16 2^-10, bf16 2^-7)
of the largest output: 3.9e-3 * max|ref| for fp16, 3.1e-2 * max|ref| for bf16. A NaN or Inf in
the output where the reference is finite always fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flashcore.reference import attention_reference

__all__ = ["ATOL_EPS", "CheckResult", "Reference", "compare", "make_reference", "sample_rows"]

# 4 * machine epsilon of the input dtype, relative to max |ref| (see the module docstring).
ATOL_EPS = {torch.float16: 4 * 2.0**-10, torch.bfloat16: 4 * 2.0**-7, torch.float32: 4 * 2.0**-23}


def sample_rows(sq: int, n: int, seed: int = 0) -> torch.Tensor:
    """int64 [min(n, sq)] sorted distinct query rows: 0, sq - 1 and random others."""
    if sq <= n:
        return torch.arange(sq)
    gen = torch.Generator().manual_seed(seed)
    inner = torch.randperm(sq - 2, generator=gen)[: max(n - 2, 0)] + 1
    return torch.cat([torch.tensor([0, sq - 1]), inner]).sort().values


@dataclass
class Reference:
    """The expected output on ``rows`` of input set 0: ``out`` fp32 [B, Hq, R, D]."""

    rows: torch.Tensor  # int64 [R], on the inputs' device
    out: torch.Tensor
    tol: float  # the pass threshold on max |out - ref| for this case


def make_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, rows: torch.Tensor
) -> Reference:
    """Reference (fp32) and tolerance for q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] on ``rows``."""
    rows = rows.to(q.device)
    ref, _ = attention_reference(
        q, k, v, is_causal=is_causal, causal_align="top_left", compute_dtype=torch.float32,
        rows=rows,
    )
    lowp, _ = attention_reference(
        q, k, v, is_causal=is_causal, causal_align="top_left", compute_dtype=q.dtype, rows=rows,
    )
    lowp_err = (lowp.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    tol = 2.0 * lowp_err + ATOL_EPS[q.dtype] * scale
    return Reference(rows=rows, out=ref, tol=tol)


@dataclass
class CheckResult:
    ok: bool
    max_err: float  # inf when the output has NaN/Inf where the reference has none
    tol: float
    detail: str  # where the worst element is, on failure


def compare(out: torch.Tensor, ref: Reference) -> CheckResult:
    """Check a provider's full output [B, Hq, Sq, D] against ``ref`` on its rows."""
    got = out[:, :, ref.rows].float()
    if got.shape != ref.out.shape:
        return CheckResult(False, math.inf, ref.tol,
                           f"output shape {tuple(out.shape)} does not match the reference")
    bad = ~torch.isfinite(got) & torch.isfinite(ref.out)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        return CheckResult(False, math.inf, ref.tol,
                           f"non-finite output {got[idx].item()} at {_where(idx, ref)}")
    diff = (got - ref.out).abs()
    err = diff.max().item()
    if err <= ref.tol:
        return CheckResult(True, err, ref.tol, "")
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return CheckResult(
        False, err, ref.tol,
        f"max error {err:.3g} > tol {ref.tol:.3g} at {_where(idx, ref)}: got "
        f"{got[idx].item():.5g}, reference {ref.out[idx].item():.5g}",
    )


def _where(idx: tuple[int, ...], ref: Reference) -> str:
    b, h, r, d = idx
    return f"[b={b}, h={h}, row={int(ref.rows[r])}, d={d}]"

"""The oracle: plain PyTorch attention in fp32 or fp64. Runs anywhere, including the CPU.

Every kernel in FlashCore is checked against :func:`attention_reference`. It materialises the
full score matrix, so keep the shapes small (it is O(Sq * Sk) memory per head).
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_reference", "causal_offset"]


def causal_offset(sq: int, sk: int, causal_align: str) -> int:
    """Key offset of the causal diagonal: row ``i`` may attend to keys ``j <= i + offset``.

    ``top_left`` (SDPA's convention) aligns the diagonal with the top-left corner (offset 0);
    ``bottom_right`` (FlashAttention's KV-cache convention) with the bottom-right corner
    (offset ``sk - sq``).
    """
    return 0 if causal_align == "top_left" else sk - sq


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    causal_align: str = "top_left",
    compute_dtype: torch.dtype = torch.float64,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention, computed in ``compute_dtype``.

    Args:
        q: [B, Hq, Sq, D]
        k: [B, Hkv, Sk, D] with Hq a multiple of Hkv (grouped-query attention).
        v: [B, Hkv, Sk, D]
        rows: optional int64 [R] query row indices: compute only those rows (causal positions
            kept), so large problems can be checked at O(R * Sk) cost.

    Returns:
        (out [B, Hq, Sq or R, D] in ``compute_dtype``, lse [B, Hq, Sq or R] natural-log
        log-sum-exp in ``compute_dtype``). Rows with no key to attend to give out 0 and lse -inf.
    """
    b, hq, sq, d = q.shape
    row_pos = torch.arange(sq, device=q.device) if rows is None else rows.to(q.device)
    if rows is not None:
        q = q[:, :, row_pos]
    hkv, sk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    if hkv != hq:
        kc = kc.repeat_interleave(hq // hkv, dim=1)
        vc = vc.repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if is_causal:
        off = causal_offset(sq, sk, causal_align)
        cols = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(cols > row_pos[:, None] + off, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # exp(s - lse) is 0 everywhere on a fully masked row (lse = -inf gives nan): zero those rows.
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    p = p.masked_fill(empty[..., None], 0.0)
    out = torch.matmul(p, vc)
    return out, lse

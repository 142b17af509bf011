"""Test helpers: input factories and the pass rule of DESIGN.md."""

from __future__ import annotations

import torch

from flashcore.reference import attention_reference

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Small absolute slack on top of 2x PyTorch's own low-precision error (FlashAttention's rule).
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-5}


def make_qkv(
    b: int, hq: int, hkv: int, sq: int, sk: int, d: int, dtype: torch.dtype, device: str,
    layout: str = "bhsd", seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random normal q [b, hq, sq, d], k/v [b, hkv, sk, d] in the requested memory layout.

    layout: "bhsd" contiguous; "bshd" a contiguous [B, S, H, D] tensor seen through
    .transpose(1, 2); "offset" a view starting 1 element into a larger buffer, with padded rows
    (misaligned start, row stride not a multiple of 16).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)

    def one(h: int, s: int) -> torch.Tensor:
        # Convert before taking views: .to() of a non-dense view would make it contiguous.
        if layout == "bhsd":
            return torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)
        if layout == "bshd":
            t = torch.randn(b, s, h, d, generator=g).to(device=device, dtype=dtype)
            return t.transpose(1, 2)
        if layout == "offset":
            buf = torch.randn(b * h * s * (d + 3) + 1, generator=g).to(device=device, dtype=dtype)
            return buf[1:].view(b, h, s, d + 3)[..., :d]
        raise ValueError(layout)

    return one(hq, sq), one(hkv, sk), one(hkv, sk)


def check_attention(
    out: torch.Tensor, lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, *, is_causal: bool, causal_align: str, scale: float | None = None,
) -> None:
    """Assert the pass rule: max |out - ref64| <= 2 * max |torch_lowp - ref64| + atol.

    NaN/Inf anywhere the reference is finite fails; empty rows must be exactly 0 / -inf.
    """
    ref, ref_lse = attention_reference(
        q.cpu(), k.cpu(), v.cpu(), is_causal=is_causal, scale=scale, causal_align=causal_align
    )
    low, low_lse = attention_reference(
        q.cpu(), k.cpu(), v.cpu(), is_causal=is_causal, scale=scale, causal_align=causal_align,
        compute_dtype=q.dtype,
    )
    o = out.detach().cpu().double()
    assert out.shape == q.shape, f"shape {tuple(out.shape)} != {tuple(q.shape)}"
    assert out.dtype == q.dtype, f"dtype {out.dtype} != {q.dtype}"
    bad = ~torch.isfinite(o)
    assert not bad.any(), (
        f"{int(bad.sum())} non-finite outputs, first at {tuple(bad.nonzero()[0].tolist())}"
    )
    err = (o - ref).abs()
    tol = 2 * (low.double() - ref).abs().max().item() + ATOL[q.dtype]
    if err.max().item() > tol:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"max error {err.max().item():.3e} > tol {tol:.3e} at index {idx}: "
            f"got {o[idx].item():.6f}, reference {ref[idx].item():.6f}"
        )
    if lse is None:
        return
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    l64 = lse.detach().cpu().double()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(l64), empty), "lse -inf pattern differs from reference"
    assert (o[empty] == 0).all(), "rows with no visible key must be exactly 0"
    if (~empty).any():
        lerr = (l64 - ref_lse)[~empty].abs()
        assert torch.isfinite(lerr).all(), "non-finite lse on a row with visible keys"
        ltol = 2 * (low_lse.double() - ref_lse)[~empty].abs().max().item() + 1e-3
        assert lerr.max().item() <= ltol, f"lse error {lerr.max().item():.3e} > {ltol:.3e}"

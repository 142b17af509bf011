"""Every bad input gets a clear error naming the argument, the value given and what works."""

from __future__ import annotations

import pytest
import torch

import flashcore
from flashcore import FlashCoreArgumentError


def qkv(b=1, hq=2, hkv=2, sq=8, sk=8, d=16, dtype=torch.float16):
    return (
        torch.randn(b, hq, sq, d, dtype=dtype),
        torch.randn(b, hkv, sk, d, dtype=dtype),
        torch.randn(b, hkv, sk, d, dtype=dtype),
    )


def raises(match: str, *args, **kwargs) -> str:
    with pytest.raises(FlashCoreArgumentError, match=match) as ei:
        flashcore.attention(*args, **kwargs)
    return str(ei.value)


def test_error_is_value_and_type_error():
    assert issubclass(FlashCoreArgumentError, ValueError)
    assert issubclass(FlashCoreArgumentError, TypeError)


def test_not_a_tensor():
    q, k, v = qkv()
    raises(r"key must be a torch.Tensor, got list", q, [1, 2], v)


def test_wrong_rank():
    q, k, v = qkv()
    raises(r"query must be 4-D \[B, H, S, D\], got 3-D with shape \(2, 8, 16\)", q[0], k, v)


def test_unsupported_dtype():
    q, k, v = (t.double() for t in qkv())
    raises(r"query.dtype must be one of float16, bfloat16, float32, got torch.float64", q, k, v)


def test_mixed_dtypes():
    q, k, v = qkv()
    raises(r"must share one dtype, got query=torch.float16, key=torch.bfloat16", q, k.bfloat16(), v)


def test_mixed_devices():
    q, k, v = qkv()
    k = k.to("meta")
    raises(r"must be on one device, got query=cpu, key=meta, value=cpu", q, k, v)


def test_head_dim_mismatch():
    q, k, v = qkv()
    raises(r"head dims differ: query 16, key 24, value 16", q, torch.randn(1, 2, 8, 24).half(), v)


@pytest.mark.parametrize("d", [8, 20, 264, 36])
def test_unsupported_head_dim(d):
    q, k, v = qkv(d=d)
    raises(rf"head dim D={d} is not supported: FlashCore supports multiples of 8 from 16 to 256",
           q, k, v)


def test_heads_not_multiple():
    q, k, v = qkv(hq=6, hkv=4)
    raises(r"query heads Hq=6 must be a multiple of key/value heads Hkv=4", q, k, v,
           enable_gqa=True)


def test_gqa_needs_flag():
    q, k, v = qkv(hq=4, hkv=2)
    raises(r"pass enable_gqa=True", q, k, v)


def test_unknown_backend():
    q, k, v = qkv()
    raises(r"backend must be one of \('auto', 'triton', 'cuda', 'reference'\), got 'tpu'",
           q, k, v, backend="tpu")


def test_unknown_causal_align():
    q, k, v = qkv()
    raises(r"causal_align must be one of \('top_left', 'bottom_right'\), got 'middle'",
           q, k, v, causal_align="middle")


def test_batch_and_seq_mismatch():
    q, k, v = qkv()
    raises(r"batch sizes differ: query 1, key 2, value 1", q, torch.randn(2, 2, 8, 16).half(), v)
    raises(r"key and value sequence lengths differ: key 8, value 9", q, k,
           torch.randn(1, 2, 9, 16).half())


def test_empty_dimension():
    q, k, v = qkv(sq=0)
    raises(r"query has an empty dimension, shape \(1, 2, 0, 16\)", q, k, v)


def test_bad_scalars():
    q, k, v = qkv()
    raises(r"scale must be None or a finite float, got nan", q, k, v, scale=float("nan"))
    raises(r"is_causal must be a bool, got 'yes'", q, k, v, is_causal="yes")
    raises(r"dropout_p must be a float in \[0, 1\), got -0.5", q, k, v, dropout_p=-0.5)


def test_every_reason_collected():
    """One call with three problems reports all three, not just the first."""
    q, k, v = qkv(hq=6, hkv=4, d=20)
    msg = raises(r"invalid arguments", q, k, v, causal_align="x", backend="y", enable_gqa=True)
    for part in ("causal_align must be", "backend must be", "head dim D=20", "Hq=6"):
        assert part in msg, f"missing {part!r} in:\n{msg}"


def test_mask_and_dropout_not_implemented():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="attn_mask is not supported yet"):
        flashcore.attention(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match=r"dropout_p=0.1 is not supported yet"):
        flashcore.attention(q, k, v, dropout_p=0.1)


def test_backward_not_implemented():
    q, k, v = qkv(dtype=torch.float32)
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="backward is not implemented yet"):
        flashcore.attention(q, k, v)
    with torch.no_grad():
        flashcore.attention(q, k, v)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    raises(r"query is on cpu: backend='triton' runs on CPU only under the Triton interpreter",
           q, k, v, backend="triton")


def test_cuda_backend_on_cpu():
    q, k, v = qkv()
    raises(r"backend='cuda' needs CUDA tensors", q, k, v, backend="cuda")


def test_cuda_backend_subset_reasons():
    from flashcore.backends.cuda.config import unsupported_reasons

    q, k, v = qkv(d=40, dtype=torch.float32)
    reasons = unsupported_reasons(q, k, v)
    assert any("supports float16 and bfloat16, got torch.float32" in r for r in reasons)
    assert any("head dims (64, 128), got D=40" in r for r in reasons)
    assert all("backend='triton'" in r for r in reasons)
    q, k, v = qkv(d=64)
    assert unsupported_reasons(q, k, v) == []
    odd = torch.randn(1, 2, 8, 65, dtype=torch.float16)[..., 1:]
    assert any("16-byte" in r for r in unsupported_reasons(odd, k, v))

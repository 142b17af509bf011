"""Correctness of the Triton forward kernel against the fp64 reference.

On CPU the kernel runs through Triton's interpreter (conftest sets TRITON_INTERPRET=1), with
shapes kept small; on a GPU the same tests run compiled, with the larger shapes too.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA
from helpers import DTYPES, check_attention, make_qkv

import flashcore

# Every output buffer the kernel gets starts as NaN: unwritten elements fail.
pytestmark = pytest.mark.usefixtures("poison_triton")


def run(q, k, v, *, causal_align="top_left", is_causal=False, scale=None):
    return flashcore.attention(
        q, k, v, is_causal=is_causal, scale=scale, enable_gqa=True, causal_align=causal_align,
        return_lse=True, backend="triton",
    )


CAUSAL = [(False, "top_left"), (True, "top_left"), (True, "bottom_right")]
CAUSAL_IDS = ["full", "causal-tl", "causal-br"]


# Every supported head-dim class, every dtype. Large D keeps S small on the CPU interpreter.
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("d", [16, 40, 64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("causal", CAUSAL[:2], ids=CAUSAL_IDS[:2])
def test_head_dims_dtypes(d, dtype, causal, device):
    s = 113 if (HAS_CUDA or d <= 128) else 33
    q, k, v = make_qkv(1, 2, 2, s, s, d, DTYPES[dtype], device, seed=d)
    out, lse = run(q, k, v, is_causal=causal[0], causal_align=causal[1])
    check_attention(out, lse, q, k, v, is_causal=causal[0], causal_align=causal[1])


SEQS = [(1, 1), (17, 17), (113, 113), (203, 203), (1, 203), (17, 113), (113, 17), (203, 64)]
SEQS_GPU = [(799, 799), (1024, 1024), (2048, 333), (333, 2048), (4099, 4099)]


@pytest.mark.parametrize("sq,sk", SEQS + (SEQS_GPU if HAS_CUDA else []))
@pytest.mark.parametrize("causal", CAUSAL, ids=CAUSAL_IDS)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_sequence_lengths(sq, sk, causal, layout, device):
    q, k, v = make_qkv(2, 2, 2, sq, sk, 64, torch.float16, device, layout=layout, seed=sq + sk)
    out, lse = run(q, k, v, is_causal=causal[0], causal_align=causal[1])
    check_attention(out, lse, q, k, v, is_causal=causal[0], causal_align=causal[1])
    assert out.stride() == q.stride(), "output must keep the query's memory layout"


@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
@pytest.mark.parametrize("causal", CAUSAL, ids=CAUSAL_IDS)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gqa(ratio, causal, dtype, device):
    hkv = 2 if HAS_CUDA else 1
    q, k, v = make_qkv(1, hkv * ratio, hkv, 77, 129, 64, DTYPES[dtype], device, seed=ratio)
    out, lse = run(q, k, v, is_causal=causal[0], causal_align=causal[1])
    check_attention(out, lse, q, k, v, is_causal=causal[0], causal_align=causal[1])


@pytest.mark.parametrize("d", [64, 80])
def test_misaligned_and_padded_strides(d, device):
    """A view 1 element into a buffer with padded rows: no 16-byte alignment anywhere."""
    q, k, v = make_qkv(1, 2, 2, 65, 97, d, torch.float16, device, layout="offset")
    assert q.data_ptr() % 16 != 0 and not q.is_contiguous()
    out, lse = run(q, k, v, is_causal=True)
    check_attention(out, lse, q, k, v, is_causal=True, causal_align="top_left")


def test_mixed_layouts(device):
    """q BSHD-strided, k contiguous, v offset: each tensor is addressed through its own strides."""
    q, _, _ = make_qkv(2, 4, 2, 50, 70, 64, torch.bfloat16, device, layout="bshd", seed=1)
    _, k, _ = make_qkv(2, 4, 2, 50, 70, 64, torch.bfloat16, device, layout="bhsd", seed=2)
    _, _, v = make_qkv(2, 4, 2, 50, 70, 64, torch.bfloat16, device, layout="offset", seed=3)
    out, lse = run(q, k, v, is_causal=True, causal_align="bottom_right")
    check_attention(out, lse, q, k, v, is_causal=True, causal_align="bottom_right")


@pytest.mark.parametrize("sq,sk", [(64, 16), (100, 37), (5, 1)])
def test_rows_without_keys(sq, sk, device):
    """Bottom-right causal with Sq > Sk: the first Sq - Sk rows see nothing -> 0 and -inf."""
    q, k, v = make_qkv(1, 2, 2, sq, sk, 32, torch.float16, device)
    out, lse = run(q, k, v, is_causal=True, causal_align="bottom_right")
    empty = sq - sk
    assert (out[:, :, :empty] == 0).all()
    assert torch.isneginf(lse[:, :, :empty]).all()
    check_attention(out, lse, q, k, v, is_causal=True, causal_align="bottom_right")


@pytest.mark.parametrize("scale", [0.3, 1.0, -0.5, 0.0])
def test_scale(scale, device):
    q, k, v = make_qkv(1, 2, 2, 40, 40, 64, torch.float16, device)
    out, lse = run(q, k, v, scale=scale)
    check_attention(out, lse, q, k, v, is_causal=False, causal_align="top_left", scale=scale)


def test_return_lse_false_matches(device):
    q, k, v = make_qkv(1, 2, 2, 70, 70, 64, torch.float16, device)
    out1 = flashcore.attention(q, k, v, is_causal=True, backend="triton")
    out2, _ = run(q, k, v, is_causal=True)
    assert isinstance(out1, torch.Tensor)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)


def test_matches_sdpa_default_args(device):
    """Same positional signature and defaults as SDPA."""
    q, k, v = make_qkv(1, 3, 3, 33, 33, 64, torch.float32, device)
    ours = flashcore.attention(q, k, v, None, 0.0, True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, None, 0.0, True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_auto_backend(device):
    q, k, v = make_qkv(1, 2, 2, 33, 33, 64, torch.float16, device)
    out, lse = flashcore.attention(q, k, v, return_lse=True)
    check_attention(out, lse, q, k, v, is_causal=False, causal_align="top_left")


def test_reference_backend_keeps_layout():
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16, torch.float16, "cpu", layout="bshd")
    out = flashcore.attention(q, k, v, backend="reference")
    assert out.stride() == q.stride()
    check_attention(out, None, q, k, v, is_causal=False, causal_align="top_left")


def test_default_scale_is_inverse_sqrt_d(device):
    q, k, v = make_qkv(1, 1, 1, 20, 20, 96, torch.float32, device)
    a = flashcore.attention(q, k, v, backend="triton")
    b = flashcore.attention(q, k, v, scale=1 / math.sqrt(96), backend="triton")
    torch.testing.assert_close(a, b, rtol=0, atol=0)

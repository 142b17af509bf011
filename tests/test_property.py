"""Property test: random small shapes, strides, dtypes and masks all match the reference."""

from __future__ import annotations

from helpers import DTYPES, check_attention, make_qkv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashcore


@settings(
    max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    ratio=st.sampled_from([1, 2, 3]),
    sq=st.integers(1, 90),
    sk=st.integers(1, 90),
    d=st.sampled_from([16, 24, 32, 48, 64, 72, 128]),
    dtype=st.sampled_from(list(DTYPES)),
    causal=st.sampled_from([None, "top_left", "bottom_right"]),
    layout=st.sampled_from(["bhsd", "bshd", "offset"]),
    seed=st.integers(0, 2**16),
)
def test_random_problems(b, hkv, ratio, sq, sk, d, dtype, causal, layout, seed, device):
    q, k, v = make_qkv(b, hkv * ratio, hkv, sq, sk, d, DTYPES[dtype], device, layout, seed)
    out, lse = flashcore.attention(
        q, k, v, is_causal=causal is not None, enable_gqa=True,
        causal_align=causal or "top_left", return_lse=True, backend="triton",
    )
    torch_out_layout_ok = out.shape == q.shape
    assert torch_out_layout_ok
    check_attention(out, lse, q, k, v, is_causal=causal is not None,
                    causal_align=causal or "top_left")

"""The torch.library custom op: opcheck, torch.compile(fullgraph=True), CUDA graph capture."""

from __future__ import annotations

import pytest
import torch
from helpers import check_attention, make_qkv

import flashcore


def _args(device, dtype=torch.float16):
    q, k, v = make_qkv(1, 4, 2, 40, 56, 64, dtype, device, layout="bshd")
    return q, k, v


@pytest.mark.parametrize("return_lse", [False, True])
def test_opcheck(return_lse, device):
    q, k, v = _args(device)
    backend = "triton" if device == "cuda" else "reference"
    torch.library.opcheck(
        torch.ops.flashcore.attention_fwd.default,
        (q, k, v, 0.125, True, "bottom_right", return_lse, backend),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_compile_fullgraph_cpu():
    """Traces through the op's fake implementation with no graph break (CPU: reference path)."""
    q, k, v = _args("cpu", torch.float32)

    def f(q, k, v):
        o, lse = flashcore.attention(q, k, v, is_causal=True, enable_gqa=True, return_lse=True)
        return o * 2, lse

    o, lse = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    check_attention(o / 2, lse, q, k, v, is_causal=True, causal_align="top_left")


@pytest.mark.gpu
def test_compile_fullgraph_inductor():
    q, k, v = _args("cuda")

    def f(q, k, v):
        return flashcore.attention(q, k, v, is_causal=True, enable_gqa=True) + 1

    out = torch.compile(f, fullgraph=True)(q, k, v)
    check_attention(out - 1, None, q, k, v, is_causal=True, causal_align="top_left")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture(backend):
    """Capture and replay: no host sync on the call path, and replays see new input values."""
    q, k, v = _args("cuda")
    q = q.contiguous()
    flashcore.attention(q, k, v, enable_gqa=True, backend=backend)  # compile outside capture
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g):
        out = flashcore.attention(q, k, v, enable_gqa=True, backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    for seed in (1, 2):
        q2, k2, v2 = make_qkv(1, 4, 2, 40, 56, 64, torch.float16, "cuda", seed=seed)
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        check_attention(out, None, q, k, v, is_causal=False, causal_align="top_left")

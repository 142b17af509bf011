"""The CUDA C++ backend (fwd.cu): compiles cleanly everywhere (CI), correct on the GPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch
from helpers import check_attention, make_qkv

import flashcore
from flashcore.backends.cuda.compiler import compile_defines, kernel_source_path
from flashcore.backends.cuda.config import (
    CudaFwdConfig,
    default_config,
    search_space,
    smem_bytes,
)

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(
    NVCC is None and os.environ.get("FLASHCORE_REQUIRE_NVCC") != "1",
    reason="nvcc not installed",
)


def _ptxas(defines: list[str], arch: str) -> str:
    if NVCC is None:
        pytest.fail("FLASHCORE_REQUIRE_NVCC=1 but nvcc is not on PATH")
    res = subprocess.run(
        [NVCC, "-cubin", f"-arch={arch}", "-std=c++17", *defines, "-Xptxas", "-v",
         str(kernel_source_path()), "-o", os.devnull],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    return res.stderr


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_default_configs_compile_without_spills(arch, d, dtype, causal):
    """Every default config dispatch picks compiles with no spills and no stack frame."""
    cfgs = {default_config(d, s, s, bh, causal, dtype=dtype) for s in (512, 8192)
            for bh in (8, 512)}
    for cfg in cfgs:
        log = _ptxas(compile_defines(cfg, dtype, d, causal), arch)
        block = log.split("Compiling entry function 'flashcore_attn_fwd'")[1]
        assert re.search(r"\b0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
                         block), f"{cfg} {arch}:\n{block}"


def test_defines_and_space():
    cfg = CudaFwdConfig(4, 64, 3)
    assert compile_defines(cfg, "bf16", 128, True) == [
        "-DFC_NUM_WARPS=4", "-DFC_BLOCK_N=64", "-DFC_STAGES=3", "-DFC_HEAD_DIM=128",
        "-DFC_BF16=1", "-DFC_CAUSAL=1", "-DFC_KV_GROUPS=1", "-DFC_P_REGS=1",
    ]
    assert compile_defines(cfg, "fp16", 64, False, p_regs=False)[-1] == "-DFC_P_REGS=0"
    assert cfg.block_m == 64
    assert CudaFwdConfig(4, 128, 4) not in search_space(128)  # 227 KiB shared-memory limit
    assert len(search_space(64)) > 10
    # Four key groups need a multiple of 4 warps; the merge buffer must fit the K/V ring.
    assert CudaFwdConfig(8, 64, 2, 4) in search_space(64)
    assert CudaFwdConfig(2, 64, 2, 4) not in search_space(64)
    # Shared memory counts P's staging tiles only when P cannot stay in registers.
    assert smem_bytes(cfg, 64, p_regs=False) - smem_bytes(cfg, 64) == 4 * 16 * 72 * 2


# ---------------------------------------------------------------------------- GPU only


@pytest.fixture
def poison(monkeypatch):
    from flashcore.backends.cuda import fwd

    monkeypatch.setattr(fwd, "_alloc_out", lambda q: torch.full_like(q, float("nan")))
    monkeypatch.setattr(
        fwd, "_alloc_lse",
        lambda b, h, s, device: torch.full((b, h, s), float("nan"), device=device),
    )


CAUSAL = [(False, "top_left"), (True, "top_left"), (True, "bottom_right")]


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (113, 113), (203, 203), (17, 203),
                                   (203, 17), (799, 799), (1024, 333), (4099, 4099)])
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal-tl", "causal-br"])
def test_cuda_correctness(d, dtype, sq, sk, causal, poison):
    q, k, v = make_qkv(2, 4, 2, sq, sk, d, dtype, "cuda", layout="bshd", seed=sq * 7 + sk)
    out, lse = flashcore.attention(q, k, v, is_causal=causal[0], causal_align=causal[1],
                                   enable_gqa=True, return_lse=True, backend="cuda")
    check_attention(out, lse, q, k, v, is_causal=causal[0], causal_align=causal[1])


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_cuda_gqa(ratio, poison):
    q, k, v = make_qkv(1, 2 * ratio, 2, 300, 300, 64, torch.float16, "cuda")
    out, lse = flashcore.attention(q, k, v, is_causal=True, enable_gqa=True, return_lse=True,
                                   backend="cuda")
    check_attention(out, lse, q, k, v, is_causal=True, causal_align="top_left")


@pytest.mark.gpu
@pytest.mark.parametrize("d,causal", [(64, False), (128, True)])
def test_configs_of_the_space(d, causal, poison):
    """Every tile shape of the space is correct (one pipeline depth each: the depth changes
    only the ring size). The tuner re-checks each candidate before timing it."""
    from flashcore.api import _forward

    q, k, v = make_qkv(1, 2, 2, 257, 257, d, torch.float16, "cuda")
    shapes = {}
    for cfg in search_space(d):
        shapes.setdefault((cfg.num_warps, cfg.block_n, cfg.kv_groups), cfg)
    for cfg in shapes.values():
        out, lse = _forward(q, k, v, d**-0.5, causal, "bottom_right", True, "cuda", config=cfg)
        check_attention(out, lse, q, k, v, is_causal=causal, causal_align="bottom_right")


@pytest.mark.gpu
def test_p_stays_in_registers_on_sm80_and_sm90():
    """The fast path (P's operand built from the S registers) is the one that runs on the
    architectures the layout map was written for: the probe must accept it there."""
    from flashcore.backends.cuda import fwd

    if torch.cuda.get_device_capability() not in ((8, 0), (9, 0)):
        pytest.skip("layout map written for sm_80 / sm_90")
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, torch.float16, "cuda")
    for dtype in (torch.float16, torch.bfloat16):
        flashcore.attention(q.to(dtype), k.to(dtype), v.to(dtype), backend="cuda")
    dev = torch.cuda.current_device()
    assert fwd._P_REGS[(dev, "fp16")] and fwd._P_REGS[(dev, "bf16")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_p_through_shared_memory_fallback(dtype, poison, monkeypatch):
    """The FC_P_REGS=0 build (taken when a GPU's operand layout fails the probe) is correct."""
    from flashcore.api import _forward
    from flashcore.backends.cuda import fwd

    dev = torch.cuda.current_device()
    monkeypatch.setitem(fwd._P_REGS, (dev, "fp16" if dtype == torch.float16 else "bf16"), False)
    q, k, v = make_qkv(2, 4, 2, 203, 333, 64, dtype, "cuda")
    for cfg in (CudaFwdConfig(4, 64, 2), CudaFwdConfig(8, 64, 2, 4)):
        out, lse = _forward(q, k, v, 0.125, True, "bottom_right", True, "cuda", config=cfg)
        check_attention(out, lse, q, k, v, is_causal=True, causal_align="bottom_right",
                        scale=0.125)


@pytest.mark.gpu
def test_cuda_rejects_misaligned_view():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, torch.float16, "cuda", layout="offset")
    with pytest.raises(ValueError, match="16-byte"):
        flashcore.attention(q, k, v, backend="cuda")


def test_misaligned_call_raises_or_takes_the_auto_fallback():
    """A plan is cached per strides; a later view with the same strides may start unaligned.
    backend="cuda" must say so; backend="auto" runs the plan it was given instead."""
    from flashcore.backends.cuda.fwd import CudaFwdPlan

    q, k, v = make_qkv(1, 2, 2, 16, 16, 64, torch.float16, "cpu")
    plan = CudaFwdPlan(q, k, v, scale=0.125, is_causal=False, causal_off=0, return_lse=False,
                       config=CudaFwdConfig(4, 64, 2))
    buf = torch.randn(q.numel() + 1, dtype=torch.float16)
    q_odd = buf[1:].view_as(q)
    assert q_odd.stride() == q.stride() and q_odd.data_ptr() % 16
    with pytest.raises(ValueError, match="16-byte"):
        plan(q_odd, k, v)
    calls = []
    plan.misaligned_fallback = lambda: (lambda q_, k_, v_, out=None: calls.append(q_) or "ran")
    assert plan(q_odd, k, v) == "ran" and calls[0] is q_odd

"""The Gluon Hopper kernel (backends/triton/fwd_hopper.py): configs and fallbacks everywhere,
correctness on an sm_90 GPU against the fp64 reference."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import HAS_CUDA
from helpers import DTYPES, check_attention, make_qkv

import flashcore
from flashcore.api import _forward
from flashcore.backends.triton.config import (
    TritonFwdConfig,
    default_config,
    hopper_fallback,
    hopper_head_dim,
    is_valid,
    search_space,
    smem_bytes,
    tma_fallback,
)

IS_SM90 = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)
sm90 = pytest.mark.skipif(not IS_SM90, reason="needs an sm_90 GPU")

H = TritonFwdConfig(64, 128, 8, 2, tma=1, hopper=1, overlap=1)
H256 = TritonFwdConfig(64, 64, 8, 2, tma=1, hopper=1, overlap=1)
KS = TritonFwdConfig(64, 128, 8, 4, tma=1, hopper=1, ksplit=1)
HP = TritonFwdConfig(64, 128, 8, 2, tma=1, hopper=1, overlap=1, persistent=1)


@pytest.fixture
def poison(poison_triton):
    """Outputs start as NaN (conftest): rows the kernel leaves unwritten fail the check."""


def _record_launches(monkeypatch, what):
    """Patches the Gluon kernel's launch to append ``what(plan)`` per call; returns the list."""
    from flashcore.backends.triton import fwd_hopper

    calls = []
    launch = fwd_hopper.HopperFwdPlan.run  # every launch goes through it (__call__ too)

    def counted(self, *args):
        calls.append(what(self))
        return launch(self, *args)

    monkeypatch.setattr(fwd_hopper.HopperFwdPlan, "run", counted)
    return calls


@pytest.fixture
def hopper_launches(monkeypatch):
    """Counts launches of the Gluon kernel, so a test fails if a Hopper config silently ran
    the tl.dot fallback instead."""
    return _record_launches(monkeypatch, lambda plan: plan.config)


def run(q, k, v, cfg, *, is_causal=False, causal_align="top_left", scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _forward(q, k, v, scale, is_causal, causal_align, True, "triton", config=cfg)


# ---------------------------------------------------------------------------------------------
# Everywhere (CPU included)
# ---------------------------------------------------------------------------------------------


def test_config_names_and_dicts():
    assert H.short() == "h64n128w8s2o"
    assert TritonFwdConfig(64, 64, 12, 3, tma=1, hopper=1, pingpong=1).short() == "h64n64w12s3p"
    assert TritonFwdConfig(64, 128, 8, 2, tma=1, hopper=1, overlap=1,
                           persistent=1).short() == "h64n128w8s2oP"
    assert KS.short() == "h64n128w8s4k" and TritonFwdConfig.from_dict(KS.to_dict()) == KS
    assert TritonFwdConfig.from_dict(H.to_dict()) == H
    # Table entries written before the Hopper kernel existed still load, as tl.dot configs.
    old = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3, "tma": 1, "ws": 0}
    assert TritonFwdConfig.from_dict(old) == TritonFwdConfig(128, 64, 8, 3, tma=1)


def test_prune_predicate():
    assert is_valid(H, 128) and is_valid(H, 64)
    assert not is_valid(H, 256) and not is_valid(H, 128, elem_bytes=4)
    # Padded head dims run the kernel of the dim they pad to (hopper_head_dim): D = 96 and 80
    # as D = 128, 40 as 64, 192 as 256; not below 40, nor where a dense row is no 16-byte
    # multiple (TMA strides), nor past 256.
    assert is_valid(H, 96) and is_valid(H, 80) and is_valid(H, 40) and is_valid(H256, 192)
    assert not is_valid(H, 36) and not is_valid(H, 32) and not is_valid(H, 100)
    assert not is_valid(H256, 264)
    # D = 256: 64-key blocks only (O is 128 registers a thread), 2-deep rings (shared memory).
    assert is_valid(H256, 256) and not is_valid(TritonFwdConfig(64, 64, 8, 3, tma=1, hopper=1),
                                                256)
    # Hopper-only fields on a tl.dot config, and 12 warps without the Hopper kernel.
    assert not is_valid(TritonFwdConfig(128, 64, 8, 3, tma=1, overlap=1), 128)
    assert not is_valid(TritonFwdConfig(128, 64, 12, 3, tma=1), 128)
    # 3 consumers at D = 128 with 128-key blocks would not fit 160 registers a thread.
    assert not is_valid(TritonFwdConfig(64, 128, 12, 2, tma=1, hopper=1), 128)
    assert is_valid(TritonFwdConfig(64, 128, 12, 2, tma=1, hopper=1), 64)
    # Shared memory: 2 x 64 x 128 Q + 4-deep 128-key K and V rings exceed 227 KiB.
    big = TritonFwdConfig(64, 128, 8, 4, tma=1, hopper=1)
    assert smem_bytes(big, 128) > 227 * 1024 and not is_valid(big, 128)
    # A persistent program stages O in its own buffer: 3-deep 128-key rings no longer fit.
    p3 = TritonFwdConfig(64, 128, 8, 3, tma=1, hopper=1, overlap=1)
    assert is_valid(p3, 128) and not is_valid(TritonFwdConfig(**{**p3.to_dict(),
                                                                "persistent": 1}), 128)
    assert not is_valid(TritonFwdConfig(128, 64, 8, 3, tma=1, persistent=1), 128)
    # The key split: one tile a program (never persistent), no ping-pong; one Q tile and
    # fp32 partials of the other consumers instead of a Q tile each.
    assert is_valid(KS, 64) and not is_valid(KS, 128)  # 4-deep 128-key rings at D = 128
    assert not is_valid(TritonFwdConfig(**{**KS.to_dict(), "persistent": 1}), 64)
    assert not is_valid(TritonFwdConfig(**{**KS.to_dict(), "pingpong": 1}), 64)
    assert not is_valid(TritonFwdConfig(64, 64, 4, 3, ksplit=1), 64)  # Gluon kernel only
    ks3 = TritonFwdConfig(64, 64, 12, 3, tma=1, hopper=1, overlap=1, ksplit=1)
    assert smem_bytes(ks3, 128) == 64 * 128 * 2 + 2 * 64 * 130 * 4 + 2 * 3 * 64 * 128 * 2 + 1024
    # A consumer waits on every C-th block only: a ring slot's previous fill must be its own
    # block, so the ring depth is a multiple of the consumer count.
    assert is_valid(ks3, 128) and not is_valid(TritonFwdConfig(**{**ks3.to_dict(),
                                                                  "num_stages": 2}), 128)
    assert not is_valid(TritonFwdConfig(**{**KS.to_dict(), "num_stages": 3}), 64)
    for d, n, k in ((64, 108, 12), (128, 68, 8), (256, 6, 2)):
        assert sum(c.hopper for c in search_space(d)) == n
        assert sum(c.ksplit for c in search_space(d)) == k
    # A padded dim searches the configs of the dim it runs at.
    for d, kd in ((40, 64), (80, 128), (96, 128), (192, 256)):
        assert [c for c in search_space(d) if c.hopper] == [c for c in search_space(kd)
                                                           if c.hopper]
    assert not any(c.hopper for c in search_space(24))
    assert not any(c.hopper for c in search_space(64, elem_bytes=4))


def test_heuristic_picks_hopper_only_on_sm90_and_large_grids():
    # The sweep's B8 H16 S2048 D128 on an H100 vs another GPU: a persistent grid below 8k keys.
    assert default_config(128, 2048, 2048, 128, False, 2, 132, sm90=True) == TritonFwdConfig(
        64, 128, 8, 2, tma=1, hopper=1, overlap=1, persistent=1)
    assert default_config(128, 16384, 16384, 16, False, 2, 132, sm90=True) == H
    assert not default_config(128, 2048, 2048, 128, False, 2, 132).hopper
    # Grids that leave most SMs idle (the mission: 8 heads x 512 rows, 64 tiles of 64 rows)
    # split each tile's keys between the consumers; a few more tiles take the small-grid
    # tl.dot tile; off sm_90, always the tl.dot tile.
    for causal in (False, True):
        assert default_config(64, 512, 512, 8, causal, 2, 132, sm90=True) == KS
    assert default_config(128, 512, 512, 4, False, 2, 132, sm90=True).short() == "h64n64w8s4k"
    assert not default_config(128, 1024, 1024, 16, False, 2, 132, sm90=True).hopper
    assert not default_config(64, 512, 512, 8, False, 2, 132).hopper
    # D = 64: 3 consumers from 2k keys non-causal (causal from 8k), else 2 on a persistent grid.
    assert default_config(64, 4096, 4096, 64, False, 2, 132, sm90=True).num_warps == 12
    small = default_config(64, 512, 512, 512, True, 2, 132, sm90=True)
    assert small.hopper and small.persistent and small.num_warps == 8
    assert default_config(64, 8192, 8192, 64, True, 2, 132, sm90=True).num_warps == 12
    # Padded dims take the Gluon branch of the dim they run at; fp32 and D < 40 stay on tl.dot.
    for d, kd in ((40, 64), (56, 64), (72, 128), (80, 128), (96, 128), (120, 128), (136, 256),
                  (192, 256), (248, 256)):
        for args in ((512, 512, 8, False), (4096, 4096, 64, False), (2048, 2048, 128, True),
                     (16384, 16384, 16, False)):
            assert (default_config(d, *args, 2, 132, sm90=True)
                    == default_config(kd, *args, 2, 132, sm90=True)), (d, args)
    assert not default_config(96, 4096, 4096, 64, False, 4, 132, sm90=True).hopper
    assert not default_config(24, 4096, 4096, 64, False, 2, 132, sm90=True).hopper
    # Small grids too many for the key split keep the tl.dot tiles, 8 warps for padded D <= 64.
    assert default_config(40, 512, 512, 16, False, 2, 132, sm90=True) == TritonFwdConfig(
        64, 64, 8, 3)
    assert default_config(64, 512, 512, 16, False, 2, 132, sm90=True) == TritonFwdConfig(
        64, 64, 4, 3)
    assert not default_config(128, 4096, 4096, 64, False, 4, 132, sm90=True).hopper
    assert default_config(256, 2048, 2048, 64, True, 2, 132, sm90=True) == H256
    assert not default_config(256, 2048, 2048, 64, True, 2, 132).hopper


def test_cross_tile_rule(monkeypatch):
    """Tiles pipelined into one another: persistent + in-warpgroup pipeline, two consumers, a
    second Q buffer that fits, and non-causal with every key block full or causal at diagonal
    offset 0 (one diagonal block a consumer, ragged lengths allowed)."""
    from flashcore.backends.triton.config import CROSS_TILE_ENV, cross_tile

    monkeypatch.delenv(CROSS_TILE_ENV, raising=False)

    assert cross_tile(HP, 128, False, 2048) and cross_tile(HP, 64, False, 128)
    assert cross_tile(HP, 128, True, 1024) and cross_tile(HP, 64, True, 1000)
    assert cross_tile(TritonFwdConfig(**{**HP.to_dict(), "block_n": 64, "num_stages": 3}), 128,
                      True, 512)
    assert cross_tile(HP, 128, True, 900, causal_off=0)  # top-left, Sq != Sk
    assert not cross_tile(HP, 128, True, 900, causal_off=400)  # bottom-right, Sq != Sk
    assert not cross_tile(HP, 128, True, 2048)  # causal D128 past CROSS_TILE_CAUSAL_MAX_SK keys
    assert cross_tile(HP, 128, True, 1024) and not cross_tile(HP, 128, True, 1025)
    assert cross_tile(HP, 64, True, 16384)  # causal D64: no key limit
    assert not cross_tile(TritonFwdConfig(**{**HP.to_dict(), "block_n": 64, "num_stages": 1}),
                          64, True, 512)  # a one-slot ring (not a valid config anyway)
    assert not cross_tile(HP, 128, False, 2000)  # ragged last key block
    assert not cross_tile(H, 128, False, 2048)  # one program per tile
    assert not cross_tile(TritonFwdConfig(64, 128, 8, 2, tma=1, hopper=1, persistent=1), 128,
                          False, 2048)  # no in-warpgroup pipeline
    # 2 consumers only (3 ran slower at D = 64).
    assert not cross_tile(TritonFwdConfig(64, 128, 12, 2, tma=1, hopper=1, overlap=1,
                                          persistent=1), 64, False, 2048)
    monkeypatch.setenv(CROSS_TILE_ENV, "0")
    assert not cross_tile(HP, 128, False, 2048)


def test_stream_k_rule(monkeypatch):
    """Stream-K last waves: non-causal launches of one program per tile with the in-warpgroup
    pipeline, whole key blocks, two waves or more, and a last wave short enough to matter;
    opt-in (FLASHCORE_STREAM_K=1) until measured on a GPU."""
    from flashcore.backends.triton.config import (
        STREAM_K_ENV,
        STREAM_K_MIN_BLOCKS,
        stream_k,
        stream_k_grid,
    )

    monkeypatch.delenv(STREAM_K_ENV, raising=False)
    assert STREAM_K_MIN_BLOCKS == 64
    assert not stream_k(H, 128, False, 16384, 2048, 132)  # off by default
    assert stream_k(H, 128, False, 16384, 2048, 132, enabled=True)
    monkeypatch.setenv(STREAM_K_ENV, "1")
    # B1 H16 S16k D128: 2048 tiles of 128 rows on 132 SMs, 15.5 waves of work in 16.
    assert stream_k(H, 128, False, 16384, 2048, 132)
    assert stream_k_grid(2048, 132) == 132 * 14  # 1848 whole tiles, 200 shared by 132
    assert stream_k(H, 64, False, 8192, 288, 132)
    assert not stream_k(H, 64, False, 8064, 288, 132)  # 63 key blocks a tile
    assert not stream_k(H, 128, True, 16384, 2048, 132)  # causal
    assert not stream_k(H, 128, False, 2000, 2048, 132)  # ragged last key block
    assert not stream_k(H, 128, False, 16384, 263, 132)  # under two waves
    assert not stream_k(H, 128, False, 16384, 2112, 132)  # 16 full waves
    assert not stream_k(H, 128, False, 16384, 2110, 132)  # a last wave 98.5 % full
    assert not stream_k(HP, 128, False, 16384, 2048, 132)  # persistent grid
    assert not stream_k(KS, 64, False, 16384, 2048, 132)  # key split
    assert not stream_k(TritonFwdConfig(**{**H.to_dict(), "overlap": 0}), 128, False, 16384,
                        2048, 132)
    assert not stream_k(H256, 256, False, 16384, 2048, 132)  # the merge spills at D = 256
    # ... and with three consumers (the gate: 44-48 bytes at D = 64)
    assert not stream_k(TritonFwdConfig(64, 128, 12, 3, tma=1, hopper=1, overlap=1), 64, False,
                        16384, 2048, 132)
    assert stream_k(H, 96, False, 16384, 2048, 132)  # padded to 128
    assert not stream_k(TritonFwdConfig(128, 64, 8, 3, tma=1), 128, False, 16384, 2048, 132)
    assert not stream_k(H, 128, False, 16384, 2048, 132, enabled=False)
    monkeypatch.setenv(STREAM_K_ENV, "0")
    assert not stream_k(H, 128, False, 16384, 2048, 132)


def test_fallbacks_are_valid_tl_dot_configs():
    # The key split's fallback is the heuristic's small-grid tile; D = 40 needs its 8 warps
    # (4 spill the column masks: the gate).
    assert hopper_fallback(KS, 64) == TritonFwdConfig(64, 64, 4, 3)
    assert hopper_fallback(KS, 40) == TritonFwdConfig(64, 64, 8, 3)
    for d in (40, 64, 80, 96, 128, 192, 256):
        for cfg in (c for c in search_space(d) if c.hopper):
            fb = hopper_fallback(cfg, d)
            assert not fb.hopper and is_valid(fb, d), (cfg, fb)
            assert not tma_fallback(cfg, d).hopper and not tma_fallback(cfg, d).tma


def test_hopper_config_falls_back_off_sm90(device, poison):
    """On the CPU interpreter (or any non-sm_90 GPU) a Hopper config runs the tl.dot fallback."""
    if IS_SM90:
        pytest.skip("sm_90 runs the Hopper kernel itself")
    q, k, v = make_qkv(1, 2, 2, 33, 33, 64, torch.float16, device)
    out, lse = run(q, k, v, H, is_causal=True)
    check_attention(out, lse, q, k, v, is_causal=True, causal_align="top_left")


def test_compiles_for_sm90_without_a_gpu():
    """The resource gate's path: compile for sm_90 on any machine and read the PTX. In a fresh
    interpreter: under TRITON_INTERPRET (set for the CPU tests) Gluon cannot compile."""
    code = """
from triton.backends.compiler import GPUTarget
from flashcore.backends.triton.config import TritonFwdConfig
from flashcore.backends.triton.fwd import compile_fwd
from flashcore.tools.variants import Problem, triton_spec
cfg = TritonFwdConfig(64, 128, 8, 2, tma=1, hopper=1, overlap=1)
spec = triton_spec(Problem("bf16", 128, True, 2, 8, 2, 1000, 1000), cfg)
print(compile_fwd(spec, target=GPUTarget("cuda", 90, 32)).asm["ptx"])
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ptx = res.stdout
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+240;", ptx)
    # The in-warpgroup pipeline: QK^T of block j retires while PV of block j-1 stays in flight.
    assert "wgmma.wait_group.sync.aligned 1" in ptx


# ---------------------------------------------------------------------------------------------
# sm_90 GPU
# ---------------------------------------------------------------------------------------------

CONFIGS = [
    H,
    TritonFwdConfig(64, 128, 8, 2, tma=1, hopper=1),
    TritonFwdConfig(64, 64, 8, 4, tma=1, hopper=1, overlap=1, pingpong=1),
    TritonFwdConfig(64, 128, 12, 3, tma=1, hopper=1, pingpong=1),
    TritonFwdConfig(64, 128, 8, 2, tma=1, hopper=1, overlap=1, persistent=1),
    TritonFwdConfig(64, 64, 12, 2, tma=1, hopper=1, pingpong=1, persistent=1),
    # The shipped tables' short-causal picks: 64-key blocks on a persistent causal grid, where
    # the consumer with a tile's upper rows releases the block above them unread (the first
    # consumer; either one, as they trade rows, on the cross-tile path of a pipelined config).
    TritonFwdConfig(64, 64, 8, 3, tma=1, hopper=1, overlap=1, persistent=1),
    TritonFwdConfig(64, 64, 8, 2, tma=1, hopper=1, persistent=1),
    H256,
    KS,
    TritonFwdConfig(64, 64, 12, 3, tma=1, hopper=1, overlap=1, ksplit=1),
]
CAUSAL = [(False, "top_left"), (True, "top_left"), (True, "bottom_right")]
SHAPES = [  # b, hq, hkv, sq, sk
    (1, 2, 2, 1, 1), (1, 2, 2, 17, 17), (2, 3, 3, 203, 203), (1, 2, 2, 113, 799),
    (1, 4, 2, 799, 113), (2, 8, 2, 1024, 1024), (1, 2, 1, 4099, 4099),
]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.short())
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal-tl", "causal-br"])
def test_correctness(cfg, d, dtype, causal, poison, hopper_launches):
    _check_shapes(cfg, d, dtype, causal, SHAPES, hopper_launches)


def _check_shapes(cfg, d, dtype, causal, shapes, hopper_launches):
    """Each (b, hq, hkv, sq, sk) of ``shapes`` against the fp64 reference, every launch on the
    Gluon kernel itself (none on the tl.dot fallback); a config not valid at ``d`` skips."""
    if not is_valid(cfg, d):
        pytest.skip(f"{cfg.short()} is not valid at D = {d}")
    for i, (b, hq, hkv, sq, sk) in enumerate(shapes):
        q, k, v = make_qkv(b, hq, hkv, sq, sk, d, DTYPES[dtype], "cuda", seed=i)
        out, lse = run(q, k, v, cfg, is_causal=causal[0], causal_align=causal[1])
        check_attention(out, lse, q, k, v, is_causal=causal[0], causal_align=causal[1])
    assert hopper_launches == [cfg] * len(shapes)


def _growing_logits(b, hq, hkv, sq, sk, d, dtype, seed):
    """q, k, v whose scores drift along the keys: k_j += (j / sk) * c * u for a random unit u,
    so a row's score moves by 64 * (q . u) log2 units over the sequence (q . u ~ N(0, 1)), up
    on rows with q . u > 0, down on the others. Every warp then holds rows whose max keeps moving
    past the lazy rescale's threshold (8), rows that move less and rows that never move."""
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, torch.float32, "cpu", seed=seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 100)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    ramp = torch.arange(sk, dtype=torch.float32)[:, None] / sk
    k = k + ramp * (64 / math.log2(math.e)) * math.sqrt(d) * u
    return (t.to(device="cuda", dtype=DTYPES[dtype]) for t in (q, k, v))


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.short())
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("causal", [CAUSAL[0], CAUSAL[2]], ids=["full", "causal-br"])
def test_lazy_rescale_with_moving_max(cfg, d, dtype, causal, poison, hopper_launches):
    """The O rescale is skipped per warp while no row's max moved past the threshold: scores
    that keep growing along the keys (rescales in most blocks, on some rows of a warp only)
    still match the reference, in both dtypes (P reaches 2^8 between rescales)."""
    if not is_valid(cfg, d):
        pytest.skip(f"{cfg.short()} is not valid at D = {d}")
    # The last shape: several tiles a program on persistent grids, and keys a multiple of the
    # key block, so the non-causal persistent configs take the cross-tile pipeline.
    shapes = ((2, 4, 2, 1000, 1000), (1, 2, 2, 300, 700), (4, 8, 2, 1024, 1024))
    for i, (b, hq, hkv, sq, sk) in enumerate(shapes):
        q, k, v = _growing_logits(b, hq, hkv, sq, sk, d, dtype, seed=i)
        out, lse = run(q, k, v, cfg, is_causal=causal[0], causal_align=causal[1])
        check_attention(out, lse, q, k, v, is_causal=causal[0], causal_align=causal[1])
    assert hopper_launches == [cfg] * len(shapes)


PADDED_SHAPES = [(1, 2, 2, 17, 17), (2, 3, 3, 203, 203), (1, 2, 2, 113, 799),
                 (1, 4, 2, 799, 113), (2, 8, 2, 1024, 1024)]


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.short())
@pytest.mark.parametrize("d", [40, 80, 96, 192])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("causal", CAUSAL, ids=["full", "causal-tl", "causal-br"])
def test_padded_head_dims(cfg, d, dtype, causal, poison, hopper_launches):
    """A head dim that is no power of two runs the kernel of the dim it pads to (40 as 64, 80
    and 96 as 128, 192 as 256), the copy engine zero-filling the columns past D: right against
    the reference with every config valid there, ragged lengths and both causal alignments."""
    _check_shapes(cfg, d, dtype, causal, PADDED_SHAPES, hopper_launches)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("cfg", [H, HP, KS, H256], ids=lambda c: c.short())
@pytest.mark.parametrize("d", [40, 80, 96, 192])
def test_padded_head_dim_touches_only_its_columns(cfg, d):
    """q, k, v and out as the first D columns of wider rows: the columns past D hold NaN in the
    inputs and a sentinel in the output. The tile's padding must come from the copy engine's
    zero-fill, not from the memory past D (NaN would reach every output), and the store must
    leave the output's other columns alone."""
    from flashcore.backends.triton.fwd_hopper import HopperFwdPlan

    if not is_valid(cfg, d):
        pytest.skip(f"{cfg.short()} is not valid at D = {d}")
    kd = hopper_head_dim(d)

    def wide(t: torch.Tensor, fill: float) -> torch.Tensor:
        """``t`` in the first D columns of rows kd + 8 wide, ``fill`` in the others."""
        buf = torch.full((*t.shape[:3], kd + 8), fill, dtype=t.dtype, device="cuda")
        buf[..., :d] = t
        return buf

    for i, (b, hq, hkv, sq, sk) in enumerate([(2, 4, 2, 300, 517), (1, 8, 8, 512, 512)]):
        q, k, v = (wide(t, float("nan"))[..., :d] for t in
                   make_qkv(b, hq, hkv, sq, sk, d, torch.bfloat16, "cuda", seed=i))
        out_rows = wide(torch.full_like(q, float("nan")), 7.0)
        out = out_rows[..., :d]
        lse = torch.full(q.shape[:3], float("nan"), device="cuda")
        plan = HopperFwdPlan(q, k, scale=d ** -0.5, is_causal=True, causal_off=sk - sq,
                             return_lse=True, config=cfg)
        assert plan.head_dim == kd
        plan(q, k, v, out, lse)
        check_attention(out, lse, q, k, v, is_causal=True, causal_align="bottom_right")
        assert (out_rows[..., d:] == 7.0).all()


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("layout", ["bshd", "offset"])
def test_layouts(layout, poison, hopper_launches):
    """BSHD views go through the rank-4 descriptors; a misaligned view falls back."""
    q, k, v = make_qkv(2, 4, 2, 300, 517, 128, torch.bfloat16, "cuda", layout=layout)
    out, lse = run(q, k, v, H, is_causal=True, causal_align="bottom_right")
    check_attention(out, lse, q, k, v, is_causal=True, causal_align="bottom_right")
    assert len(hopper_launches) == (1 if layout == "bshd" else 0)


@pytest.mark.gpu
@sm90
def test_rows_without_keys_and_custom_scale(poison, hopper_launches):
    # Bottom-right causal with Sq > Sk: the first Sq - Sk rows see no key (0 and -inf).
    q, k, v = make_qkv(1, 2, 2, 300, 100, 64, torch.float16, "cuda")
    out, lse = run(q, k, v, H, is_causal=True, causal_align="bottom_right", scale=0.3)
    check_attention(out, lse, q, k, v, is_causal=True, causal_align="bottom_right", scale=0.3)
    assert torch.isneginf(lse[:, :, :200]).all() and (out[:, :, :200] == 0).all()
    assert hopper_launches == [H]


@pytest.mark.gpu
@sm90
def test_graph_capture_and_dispatch(monkeypatch):
    """The heuristic sends a large-grid D = 128 problem to the Hopper kernel, and the launch
    can be captured in a CUDA graph."""
    monkeypatch.setenv("FLASHCORE_DISPATCH", "heuristic")
    q, k, v = make_qkv(4, 16, 16, 1024, 1024, 128, torch.float16, "cuda")
    sel = flashcore.api.select_for(q.device, q.dtype, 4, 16, 16, 1024, 1024, 128, False,
                                   "triton")
    assert sel.config.hopper, sel
    ref = flashcore.attention(q, k, v, backend="triton")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g):
        out = flashcore.attention(q, k, v, backend="triton")
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.persistent], ids=lambda c: c.short())
@pytest.mark.parametrize("causal", CAUSAL, ids=lambda c: "-".join(map(str, c)))
def test_persistent_walks_many_tiles(cfg, causal, poison, hopper_launches):
    """More tiles than SMs: each program walks several tiles, so the K/V ring, the Q buffer
    and the ping-pong turns carry their phases from one tile into the next (ragged S: the
    last row block of every head is partial)."""
    # Row blocks per head: 8 / 9 / 8 with 128-row tiles, 6 / 6 / 5 with 192 (a causal grid
    # pairs them, and an odd count leaves one alone).
    shapes = ((3, 16, 4, 1000, 1000), (2, 8, 2, 1100, 1100), (2, 8, 8, 900, 1300))
    for i, (b, hq, hkv, sq, sk) in enumerate(shapes):
        q, k, v = make_qkv(b, hq, hkv, sq, sk, 128, torch.bfloat16, "cuda", seed=i)
        out, lse = run(q, k, v, cfg, is_causal=causal[0], causal_align=causal[1])
        check_attention(out, lse, q, k, v, is_causal=causal[0], causal_align=causal[1])
    assert hopper_launches == [cfg] * len(shapes)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize(
    "cfg,d", [(HP, 128), (HP, 64), (TritonFwdConfig(**{**HP.to_dict(), "pingpong": 1}), 128),
              (TritonFwdConfig(**{**HP.to_dict(), "block_n": 64, "num_stages": 3}), 128),
              # 64-key blocks: the consumers trade row blocks and either one skips, under
              # ping-pong turns and on a two-slot ring too.
              (TritonFwdConfig(**{**HP.to_dict(), "block_n": 64, "num_stages": 3,
                                  "pingpong": 1}), 64),
              (TritonFwdConfig(**{**HP.to_dict(), "block_n": 64}), 64)],
    ids=["h64n128w8s2oP-d128", "h64n128w8s2oP-d64", "h64n128w8s2opP-d128",
         "h64n64w8s3oP-d128", "h64n64w8s3opP-d64", "h64n64w8s2oP-d64"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cross_tile_pipeline(cfg, d, dtype, causal, poison, monkeypatch):
    """A persistent program's tiles pipelined into one another (Q double-buffered, the next
    tile's first QK^T with this tile's last PV): right against the reference, and bit-identical
    to the same kernel without the cross-tile pipeline (only the issue order differs). Causal
    (top-left): each tile's reversed stream opens with its diagonal block, at every ragged
    length, Sq > Sk and Sq < Sk."""
    from flashcore.backends.triton.config import CROSS_TILE_ENV

    used = _record_launches(monkeypatch, lambda plan: plan.cross_tile)
    # Several tiles a program (ragged Sq), one key block, fewer tiles than SMs.
    shapes = ((3, 16, 4, 1000, 1024), (2, 8, 2, 1100, 128), (1, 4, 4, 64, 256))
    if causal:
        # Up to CROSS_TILE_CAUSAL_MAX_SK keys: a unit of one tile (9 row blocks a head), key
        # lengths ragged against both block widths, a 64-row tail consumer whose rows are all
        # past Sq, Sq < Sk.
        shapes += ((2, 8, 2, 1100, 1000), (3, 4, 4, 960, 777), (2, 16, 8, 520, 1000),
                   (8, 16, 16, 512, 512))
    else:
        shapes += ((2, 8, 8, 2048, 2048),)
    for i, (b, hq, hkv, sq, sk) in enumerate(shapes):
        q, k, v = make_qkv(b, hq, hkv, sq, sk, d, DTYPES[dtype], "cuda", seed=i)
        out, lse = run(q, k, v, cfg, is_causal=causal, causal_align="top_left")
        check_attention(out, lse, q, k, v, is_causal=causal, causal_align="top_left")
        monkeypatch.setenv(CROSS_TILE_ENV, "0")
        out0, lse0 = run(q, k, v, cfg, is_causal=causal, causal_align="top_left")
        monkeypatch.delenv(CROSS_TILE_ENV)
        assert torch.equal(out, out0) and torch.equal(lse, lse0), (b, hq, hkv, sq, sk)
    assert used == [True, False] * len(shapes)


def test_gate_compiles_stream_k_variants(monkeypatch):
    """The resource gate checks the opt-in stream-K variant of every config it checks that
    stream-K can take, beside the default variant, whatever FLASHCORE_STREAM_K says."""
    from flashcore.backends.triton.config import STREAM_K_ENV
    from flashcore.tools.variants import triton_items

    monkeypatch.delenv(STREAM_K_ENV, raising=False)
    items = triton_items()
    specs = {it.job.spec for it in items}
    sk = [it for it in items if it.job.spec.stream_k]
    assert sk, "no stream-K variant checked"
    for it in sk:
        cfg = it.job.spec.config
        assert cfg.num_warps == 8 and cfg.overlap and not cfg.persistent and not cfg.ksplit
        assert not it.job.spec.is_causal and "stream-K" in it.variant
        # The variant dispatch launches by default for that config is checked too.
        assert any(not s.stream_k and s.config == cfg and s.dtype == it.job.spec.dtype
                   and s.head_dim == it.job.spec.head_dim for s in specs)


def test_stream_k_partition():
    """The partition fwd_hopper._sk_span computes (its formula, in Python): every (tile, key
    block) iteration once, whole tiles for the first stream_k_grid programs, and at most two
    parts a split tile, the head ending program u's span and the tail opening u + 1's, so the
    merge slots (u + 1 for a head, u for a tail) pair up and lie in [1, num_sms - 1]."""
    from flashcore.backends.triton.config import stream_k_grid

    for n_tiles, p, nb in ((2048, 132, 128), (264, 132, 1), (395, 132, 2), (288, 132, 18),
                           (1000, 7, 3), (14, 7, 5), (527, 132, 64)):
        n_main = stream_k_grid(n_tiles, p)
        span = (n_tiles - n_main) * nb
        parts: dict[int, list[tuple[int, int, int]]] = {}  # tile -> (program, k0, k1)
        for pid in range(n_main + p):
            if pid < n_main:
                lo, hi = pid * nb, pid * nb + nb
            else:
                u = pid - n_main
                lo = n_main * nb + u * span // p
                hi = n_main * nb + (u + 1) * span // p
            assert hi > lo
            for t in range(lo // nb, (hi - 1) // nb + 1):
                k0, k1 = max(lo - t * nb, 0), min(hi - t * nb, nb)
                assert k1 > k0
                parts.setdefault(t, []).append((pid, k0, k1))
        assert sorted(parts) == list(range(n_tiles))
        for t, ps in parts.items():
            assert sum(k1 - k0 for _, k0, k1 in ps) == nb
            if len(ps) == 1:
                continue
            (pa, a0, a1), (pb, b0, b1) = ps  # at most two parts
            assert pb == pa + 1 and a0 == 0 and a1 == b0 and b1 == nb and t >= n_main
            head_slot, tail_slot = pa - n_main + 1, pb - n_main
            assert head_slot == tail_slot and 1 <= head_slot <= p - 1


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize(
    "cfg,d", [(H, 128), (TritonFwdConfig(**{**H.to_dict(), "pingpong": 1}), 128),
              (TritonFwdConfig(64, 64, 8, 3, tma=1, hopper=1, overlap=1), 128),
              (H, 64), (H, 80)],
    ids=["h64n128w8s2o-d128", "h64n128w8s2op-d128", "h64n64w8s3o-d128", "h64n128w8s2o-d64",
         "h64n128w8s2o-d80"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_stream_k(cfg, d, dtype, poison, monkeypatch):
    """Stream-K last waves (config.stream_k, opt-in): right against the reference with the
    rows' lse, Sq ragged and unequal to Sk, GQA; tiles split into parts of one key block up to
    most of a tile; bit-identical over repeated launches (whichever part of a split finishes
    second merges: the fold must not depend on it), with the workspace's partials poisoned
    in between (a wrong counter parity would merge a stale or NaN partial), every counter
    even after a launch and some counted; the JIT launch and CUDA-graph replays (no counter
    reset between replays) give the same bits."""
    from flashcore.backends.triton import config, fwd_hopper
    from flashcore.backends.triton.config import STREAM_K_ENV

    monkeypatch.setenv(STREAM_K_ENV, "1")  # opt-in
    # Short tiles split too (dispatch would not take them: STREAM_K_MIN_BLOCKS), so that
    # parts of one key block and splits at every offset meet the checks quickly.
    monkeypatch.setattr(config, "STREAM_K_MIN_BLOCKS", 1)
    used = _record_launches(monkeypatch, lambda plan: (plan.stream_k, plan.n_main))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = 64 * (cfg.num_warps // 4)
    # (b, hq, hkv, sq, sk): 2 to 36 key blocks a tile (64 or 128 keys a block), 280 to 528
    # tiles of 128 rows (with and without stream-K on 132 SMs).
    shapes = ((2, 8, 2, 2300, 2304), (5, 4, 4, 2048, 256), (1, 20, 20, 1700, 1024),
              (1, 16, 4, 4100, 1024), (2, 16, 8, 2000, 512))
    sk_shapes = []
    for i, (b, hq, hkv, sq, sk) in enumerate(shapes):
        q, k, v = make_qkv(b, hq, hkv, sq, sk, d, DTYPES[dtype], "cuda", seed=i)
        out, lse = run(q, k, v, cfg)
        check_attention(out, lse, q, k, v, is_causal=False, causal_align="top_left")
        sk_on, n_main = used[-1]
        tiles = b * hq * -(-sq // rows)
        assert sk_on == (tiles >= 2 * sms and sk % cfg.block_n == 0
                         and tiles / (sms * -(-tiles // sms)) <= 0.98), (b, hq, sq, sk)
        if not sk_on:
            continue
        sk_shapes.append((b, hq, hkv, sq, sk))
        assert n_main == sms * (tiles // sms - 1)
        ws, cnt, _ = fwd_hopper._WORKSPACES[(torch.cuda.current_device(),
                                             torch.cuda.current_stream().cuda_stream)]
        for _ in range(2):
            ws.fill_(float("nan"))
            out2, lse2 = run(q, k, v, cfg)
            assert torch.equal(out, out2) and torch.equal(lse, lse2), (b, hq, hkv, sq, sk)
        torch.cuda.synchronize()
        assert not (cnt % 2).any() and cnt.any()
    assert len(sk_shapes) >= 4
    b, hq, hkv, sq, sk = sk_shapes[0]
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, DTYPES[dtype], "cuda", seed=7)
    ref, ref_lse = run(q, k, v, cfg)
    # The JIT launch of the same plan.
    plan = fwd_hopper.HopperFwdPlan(q, k, scale=1.0 / math.sqrt(d), is_causal=False,
                                    causal_off=0, return_lse=True, config=cfg)
    assert plan.stream_k
    jout = torch.full_like(q, float("nan"))
    jlse = torch.full(q.shape[:3], float("nan"), device="cuda")
    plan._prepare()
    plan._jit_call(q, k, v, jout, jlse)
    assert torch.equal(jout, ref) and torch.equal(jlse, ref_lse)
    # A CUDA graph replays the launch alone: first with the side stream's workspace made
    # outside the capture, then on a stream whose workspace the capture makes (zeroed by a
    # memset the graph holds), then an eager launch there (which must not trust it).
    for warm in (True, False):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        if warm:
            with torch.cuda.stream(s):
                run(q, k, v, cfg)
        else:
            # Torch's stream pool may hand out a stream that already has one.
            w = fwd_hopper._WORKSPACES.pop((torch.cuda.current_device(), s.cuda_stream), None)
            if w is not None:
                fwd_hopper._RETIRED.append(w)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            gout, glse = run(q, k, v, cfg)
        assert used[-1][0]
        for _ in range(3):
            gout.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(gout, ref) and torch.equal(glse, ref_lse)
        with torch.cuda.stream(s):
            eout, else_ = run(q, k, v, cfg)
        torch.cuda.synchronize()
        assert torch.equal(eout, ref) and torch.equal(else_, ref_lse)


@pytest.mark.gpu
@sm90
def test_prepared_launch_matches_the_jit(poison):
    """The plan launches through Triton's C entry point with cached TMA descriptors; the JIT
    launch of the same kernel gives the same bits, and a second call reuses the descriptors."""
    from flashcore.backends.triton.fwd_hopper import HopperFwdPlan

    for cfg in (H, CONFIGS[-1]):
        q, k, v = make_qkv(2, 8, 4, 777, 900, 64, torch.float16, "cuda", seed=5)
        plan = HopperFwdPlan(q, k, scale=0.125, is_causal=True, causal_off=123, return_lse=True,
                             config=cfg)
        outs = []
        for call in (plan, plan._jit_call):
            out = torch.full_like(q, float("nan"))
            lse = torch.full(q.shape[:3], float("nan"), device="cuda")
            call(q, k, v, out, lse)
            outs.append((out, lse))
        assert plan.launch is not None, "Triton's launcher layout changed: JIT fallback in use"
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        assert len(plan.maps) == 4 and len(plan.tails) == 1
        plan(q, k, v, outs[0][0], outs[0][1])
        assert len(plan.maps) == 4 and len(plan.tails) == 1
        # The pointer-keyed entry point (TritonFwdPlan's) builds its own launch arguments
        # from the same descriptors; the bits do not change.
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:3], float("nan"), device="cuda")
        plan.run(q, k, v, out, lse, (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                     lse.data_ptr()))
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])
        assert len(plan.tails) == 2
        # Only lse moves: the key must see it (a stale tail would write the old lse).
        lse2 = torch.full(q.shape[:3], float("nan"), device="cuda")
        plan.run(q, k, v, out, lse2, (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                      lse2.data_ptr()))
        assert torch.equal(lse2, outs[0][1]) and len(plan.tails) == 3

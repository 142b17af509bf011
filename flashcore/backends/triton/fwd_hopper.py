"""Hopper (sm_90) forward attention in Gluon: warp-specialised, TMA-fed, async wgmma.

Why a second kernel: the ``tl.dot`` kernel in ``fwd.py`` cannot overlap softmax with the tensor
cores on Hopper (Triton 3.6 waits on the QK^T wgmma group at once, and both warpgroups of a
program stall on the same barriers; docs/perf-notes.md). Gluon exposes the pieces directly:

- one producer partition (4 warps, few registers) issues every TMA copy: Q once, then K/V
  blocks into a ``STAGES``-deep ring guarded by ``ready``/``empty`` mbarriers;
- ``NUM_CONSUMERS`` consumer warpgroups (240 registers each via setmaxnreg) each own
  ``BLOCK_M`` query rows of the program's tile and run QK^T -> online softmax -> PV with
  asynchronous wgmma; a K/V stage is released when every consumer's PV on it has retired, so
  there is no block-wide barrier in the main loop;
- the consumers are independent warpgroups, so while one does its softmax on the CUDA cores the
  other's wgmma keeps the tensor cores busy;
- with ``OVERLAP`` a consumer also overlaps inside itself: PV of block j-1 is issued together
  with QK^T of block j and runs during the softmax of block j (FA3's intra-warpgroup pipeline).

Tensors are addressed through rank-4 TMA descriptors over [B, H, S, D] with the caller's
strides (BHSD or BSHD, no copy): the copy engine zero-fills rows past S and clips stores at S
per (batch, head), so ragged sequence lengths need only the score mask.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .config import HOPPER_HEAD_DIMS, TritonFwdConfig

__all__ = ["HopperFwdPlan", "compile_hopper", "consumer_regs", "hopper_unsupported"]

_LOG2E = 1.4426950408889634


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
              v_empty,
              Hq, Sk, GROUP, causal_off,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              NUM_CONSUMERS: gl.constexpr, IS_CAUSAL: gl.constexpr):
    pid_m = gl.program_id(0)
    if IS_CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m
    bh = gl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    m0 = pid_m * (BLOCK_M * NUM_CONSUMERS)
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.expect(q_bar.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, m0 + c * BLOCK_M, 0], q_bar.index(c),
                                        q_smem.index(c))
    hi = _key_hi(m0, Sk, causal_off, BLOCK_M * NUM_CONSUMERS, IS_CAUSAL)
    n_blocks = gl.cdiv(hi, BLOCK_N)
    for j in range(n_blocks):
        s = j % STAGES
        # A fresh barrier is in phase 0, so waiting for the phase before it passes at once.
        ph = ((j // STAGES) & 1) ^ 1
        # K and V have their own barriers: K_j is consumed (and released) by QK^T one step
        # before V_j is by PV, so K can run ahead of V.
        mbarrier.wait(k_empty.index(s), ph)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, hk, j * BLOCK_N, 0], k_ready.index(s),
                                        k_smem.index(s))
        mbarrier.wait(v_empty.index(s), ph)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [b, hk, j * BLOCK_N, 0], v_ready.index(s),
                                        v_smem.index(s))


@gluon.jit
def _key_hi(m0, Sk, causal_off, ROWS: gl.constexpr, IS_CAUSAL: gl.constexpr):
    # One past the last key any of the rows [m0, m0 + ROWS) may see.
    if IS_CAUSAL:
        return gl.minimum(gl.maximum(m0 + ROWS + causal_off, 0), Sk)
    else:
        return Sk


@gluon.jit
def _take_turn(turn, j, CID: gl.constexpr, PINGPONG: gl.constexpr):
    # Ping-pong: the consumers issue their wgmma for block j strictly in turn (0, 1, 0, ...),
    # so one warpgroup's softmax runs while the other's GEMMs hold the tensor cores. turn[c]
    # completes once per arrive of the other consumer; consumer 0 holds the first turn.
    if PINGPONG:
        mbarrier.wait(turn.index(CID), (j & 1) ^ (CID == 0))


@gluon.jit
def _pass_turn(turn, CID: gl.constexpr, NUM_CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index((CID + 1) % NUM_CONSUMERS), count=1)


@gluon.jit
def _softmax_step(qk, m_i, l_i, key0, offs_n, offs_m, Sk, causal_off, qk_scale,
                  MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """One block of the online softmax in the exp2 domain. Returns (p fp32, alpha, m, l)."""
    if MASKED:
        keys = key0 + offs_n
        ok = (keys < Sk)[None, :]
        if IS_CAUSAL:
            ok = ok & (keys[None, :] <= (offs_m + causal_off)[:, None])
        s = gl.where(ok, qk * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        # A row with no visible key yet keeps m = -inf: subtract 0 so exp2 gives 0, not nan.
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s - m_sub[:, None])
    else:
        # qk_scale > 0 (checked on the host): max before scaling, one FMA per element.
        m_new = gl.maximum(m_i, gl.max(qk, axis=1) * qk_scale)
        m_sub = m_new
        p = gl.exp2(qk * qk_scale - m_sub[:, None])
    alpha = gl.exp2(m_i - m_sub)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@gluon.jit
def _consume_blocks(q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, acc, m_i, l_i,
                    j0, j1,
                    offs_m, Sk, causal_off, qk_scale,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                    STAGES: gl.constexpr, MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr,
                    s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                    CID: gl.constexpr, PINGPONG: gl.constexpr,
                    NUM_CONSUMERS: gl.constexpr):
    dtype: gl.constexpr = k_smem.dtype
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    for j in range(j0, j1):
        s = j % STAGES
        ph = (j // STAGES) & 1
        mbarrier.wait(k_ready.index(s), ph)
        k_t = k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        qk = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        _take_turn(turn, j, CID, PINGPONG)
        qk = warpgroup_mma(q, k_t, qk, use_acc=False, is_async=True)
        _pass_turn(turn, CID, NUM_CONSUMERS, PINGPONG)
        qk = warpgroup_mma_wait(0, deps=[qk])
        mbarrier.arrive(k_empty.index(s), count=1)
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, j * BLOCK_N, offs_n, offs_m, Sk,
                                           causal_off, qk_scale, MASKED, IS_CAUSAL)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_ready.index(s), ph)
        acc = warpgroup_mma(p_op, v_smem.index(s).reshape([BLOCK_N, HEAD_DIM]), acc,
                            is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(v_empty.index(s), count=1)
    return acc, m_i, l_i


@gluon.jit
def _consume_blocks_overlap(q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, acc,
                            m_i, l_i, j0, j1,
                            offs_m, Sk, causal_off, qk_scale,
                            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                            HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                            MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr,
                            s_layout: gl.constexpr, o_layout: gl.constexpr,
                            p_layout: gl.constexpr, CID: gl.constexpr, PINGPONG: gl.constexpr,
                    NUM_CONSUMERS: gl.constexpr):
    # Software pipeline: on entry acc holds blocks < j0 - 1 and p_op the probabilities of block
    # j0 - 1 (at the running max m_i); PV of block j - 1 runs while block j's softmax does.
    dtype: gl.constexpr = k_smem.dtype
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    # Block j0 alone (no PV before it).
    s = j0 % STAGES
    mbarrier.wait(k_ready.index(s), (j0 // STAGES) & 1)
    qk = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    _take_turn(turn, j0, CID, PINGPONG)
    qk = warpgroup_mma(q, k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), qk,
                       use_acc=False, is_async=True)
    _pass_turn(turn, CID, NUM_CONSUMERS, PINGPONG)
    qk = warpgroup_mma_wait(0, deps=[qk])
    mbarrier.arrive(k_empty.index(s), count=1)
    p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, j0 * BLOCK_N, offs_n, offs_m, Sk,
                                       causal_off, qk_scale, MASKED, IS_CAUSAL)
    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    for j in range(j0 + 1, j1):
        s_prev = (j - 1) % STAGES
        s = j % STAGES
        mbarrier.wait(k_ready.index(s), (j // STAGES) & 1)
        qk = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        _take_turn(turn, j, CID, PINGPONG)
        qk = warpgroup_mma(q, k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), qk,
                           use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(s_prev), ((j - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(s_prev).reshape([BLOCK_N, HEAD_DIM]), acc,
                            is_async=True)
        _pass_turn(turn, CID, NUM_CONSUMERS, PINGPONG)
        qk = warpgroup_mma_wait(1, deps=[qk])
        mbarrier.arrive(k_empty.index(s), count=1)
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, j * BLOCK_N, offs_n, offs_m, Sk,
                                           causal_off, qk_scale, MASKED, IS_CAUSAL)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(v_empty.index(s_prev), count=1)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
    s_last = (j1 - 1) % STAGES
    mbarrier.wait(v_ready.index(s_last), ((j1 - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(s_last).reshape([BLOCK_N, HEAD_DIM]), acc,
                        is_async=True)
    acc = warpgroup_mma_wait(0, deps=[acc])
    mbarrier.arrive(v_empty.index(s_last), count=1)
    return acc, m_i, l_i


@gluon.jit
def _consumer(o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
              Hq, Sq, Sk, causal_off, qk_scale,
              CID: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
              IS_CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr, OVERLAP: gl.constexpr,
              PINGPONG: gl.constexpr):
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)

    pid_m = gl.program_id(0)
    if IS_CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m
    bh = gl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    m0_cta = pid_m * (BLOCK_M * NUM_CONSUMERS)
    m0 = m0_cta + CID * BLOCK_M
    offs_m = m0 + gl.arange(0, BLOCK_M, layout=row_s)

    # Blocks [0, n_full) are visible in full to every row of this warpgroup; the producer
    # streams n_blocks for the whole program, and every consumer walks (and releases) all.
    hi = _key_hi(m0_cta, Sk, causal_off, BLOCK_M * NUM_CONSUMERS, IS_CAUSAL)
    n_blocks = gl.cdiv(hi, BLOCK_N)
    if IS_CAUSAL:
        full_hi = gl.minimum(gl.maximum(m0 + causal_off + 1, 0), Sk)
    else:
        full_hi = Sk
    n_full = full_hi // BLOCK_N

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

    mbarrier.wait(q_bar.index(CID), 0)
    q = q_smem.index(CID).reshape([BLOCK_M, HEAD_DIM])
    if OVERLAP:
        if n_full > 0:
            acc, m_i, l_i = _consume_blocks_overlap(
                q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, acc, m_i, l_i, 0,
                n_full, offs_m, Sk,
                causal_off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, False, IS_CAUSAL,
                s_layout, o_layout, p_layout, CID, PINGPONG, NUM_CONSUMERS)
    else:
        acc, m_i, l_i = _consume_blocks(
            q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, acc, m_i, l_i, 0, n_full,
            offs_m, Sk,
            causal_off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, False, IS_CAUSAL,
            s_layout, o_layout, p_layout, CID, PINGPONG, NUM_CONSUMERS)
    acc, m_i, l_i = _consume_blocks(
        q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, acc, m_i, l_i, n_full,
        n_blocks, offs_m, Sk,
        causal_off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, True, IS_CAUSAL,
        s_layout, o_layout, p_layout, CID, PINGPONG, NUM_CONSUMERS)

    # Rows with no visible key (bottom-right causal with Sq > Sk) end with l = 0: output 0.
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    out = acc * gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))[:, None]
    # Q's tile is dead after the last QK^T: stage O there for the TMA store (clipped at Sq).
    o_view = q_smem.index(CID)
    o_view.reshape([BLOCK_M, HEAD_DIM]).store(out.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [b, h, m0, 0], o_view)
    if STORE_LSE:
        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        gl.store(LSE + bh.to(gl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)
    tma.store_wait(0)


@gluon.jit
def _attn_fwd_hopper_kernel(q_desc, k_desc, v_desc, o_desc, LSE,
                            Hq, Sq, Sk, GROUP, causal_off, qk_scale,
                            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                            BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                            NUM_CONSUMERS: gl.constexpr, IS_CAUSAL: gl.constexpr,
                            STORE_LSE: gl.constexpr, OVERLAP: gl.constexpr,
                            PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, 1, 1, BLOCK_M, HEAD_DIM],
                                       q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(q_bar.index(c), count=1)
        mbarrier.init(turn.index(c), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=NUM_CONSUMERS)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(v_empty.index(s), count=NUM_CONSUMERS)
    fence_async_shared()

    gl.static_assert(NUM_CONSUMERS == 2 or NUM_CONSUMERS == 3, "2 or 3 consumer warpgroups")
    # The default partition (this kernel's 4 warps) is the producer; setmaxnreg gives the
    # consumers CONSUMER_REGS each and leaves the producer the rest of the register file.
    if NUM_CONSUMERS == 2:
        gl.warp_specialize([
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty,
                     v_ready, v_empty, Hq, Sk, GROUP, causal_off, BLOCK_M, BLOCK_N, STAGES,
                     NUM_CONSUMERS, IS_CAUSAL)),
        (_consumer, (o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                     v_empty, turn, Hq, Sq, Sk, causal_off, qk_scale, 0, HEAD_DIM, BLOCK_M,
                     BLOCK_N, STAGES, NUM_CONSUMERS, IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG)),
        (_consumer, (o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                     v_empty, turn, Hq, Sq, Sk, causal_off, qk_scale, 1, HEAD_DIM, BLOCK_M,
                     BLOCK_N, STAGES, NUM_CONSUMERS, IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
    else:
        gl.warp_specialize([
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty,
                     v_ready, v_empty, Hq, Sk, GROUP, causal_off, BLOCK_M, BLOCK_N, STAGES,
                     NUM_CONSUMERS, IS_CAUSAL)),
        (_consumer, (o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                     v_empty, turn, Hq, Sq, Sk, causal_off, qk_scale, 0, HEAD_DIM, BLOCK_M,
                     BLOCK_N, STAGES, NUM_CONSUMERS, IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG)),
        (_consumer, (o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                     v_empty, turn, Hq, Sq, Sk, causal_off, qk_scale, 1, HEAD_DIM, BLOCK_M,
                     BLOCK_N, STAGES, NUM_CONSUMERS, IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG)),
        (_consumer, (o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                     v_empty, turn, Hq, Sq, Sk, causal_off, qk_scale, 2, HEAD_DIM, BLOCK_M,
                     BLOCK_N, STAGES, NUM_CONSUMERS, IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG)),
        ], [4, 4, 4], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS])


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_GL_DTYPE = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}
_GL_DTYPE_NAME = {"fp16": gl.float16, "bf16": gl.bfloat16}


def consumer_regs(num_warps: int) -> int:
    """Registers per consumer thread (setmaxnreg) for 2 or 3 consumer warpgroups: with the
    4-warp producer at 24-32 registers these fill the 64K register file."""
    return 240 if num_warps // 4 == 2 else 160


def hopper_unsupported(
    device: torch.device, dtype: torch.dtype, head_dim: int, strides_ok: bool
) -> str | None:
    """None if the Gluon kernel can run this problem, else why not (then the launcher uses
    :func:`~.config.hopper_fallback`)."""
    if device.type != "cuda":
        return "not a CUDA device"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return "not an sm_90 GPU"
    if dtype not in _GL_DTYPE:
        return f"dtype {dtype} (fp16/bf16 only)"
    if head_dim not in HOPPER_HEAD_DIMS:
        return f"head dim {head_dim} (64/128 only)"
    if not strides_ok:
        return "strides TMA cannot take (unit last stride, 16-byte multiples elsewhere)"
    return None


def _layout(rows: int, head_dim: int, dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], dtype)


def _constexprs(cfg: TritonFwdConfig, head_dim: int, is_causal: bool, store_lse: bool) -> dict:
    return dict(
        HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages,
        NUM_CONSUMERS=cfg.num_warps // 4, IS_CAUSAL=bool(is_causal), STORE_LSE=bool(store_lse),
        OVERLAP=bool(cfg.overlap), PINGPONG=bool(cfg.pingpong),
        CONSUMER_REGS=consumer_regs(cfg.num_warps),
    )


def compile_hopper(spec, target=None):
    """Compile one variant ahead of time from a ``fwd.KernelSpec`` whose config has hopper=1
    (the resource gate passes a ``GPUTarget`` to compile without a GPU)."""
    cfg, d = spec.config, spec.head_dim
    dt = _GL_DTYPE_NAME[spec.dtype]

    def desc(rows: int) -> str:
        return f"tensordesc<{spec.dtype}[1, 1, {rows}, {d}],{_layout(rows, d, dt)!r}>"

    sig = {"q_desc": desc(cfg.block_m), "k_desc": desc(cfg.block_n), "v_desc": desc(cfg.block_n),
           "o_desc": desc(cfg.block_m), "LSE": "*fp32", "Hq": "i32", "Sq": "i32", "Sk": "i32",
           "GROUP": "i32", "causal_off": "i32", "qk_scale": "fp32"}
    cx = _constexprs(cfg, d, spec.is_causal, spec.store_lse)
    sig.update({k: "constexpr" for k in cx})
    src = GluonASTSource(_attn_fwd_hopper_kernel, sig, cx)
    return triton.compile(src, target=target, options={"num_warps": 4})


class HopperFwdPlan:
    """Launch state of one problem (shapes, dtype, options) for the Gluon kernel. The rank-4
    descriptors carry the tensors' own strides, so BHSD and BSHD views launch without a copy;
    they are rebuilt per call (the base pointers change), a few microseconds of host time."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, *, scale: float, is_causal: bool,
                 causal_off: int, return_lse: bool, config: TritonFwdConfig) -> None:
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        self.config = config
        self.dev_index = q.device.index if q.device.index is not None else 0
        self.dt = _GL_DTYPE[q.dtype]
        self.layout_m = _layout(config.block_m, d, self.dt)
        self.layout_n = _layout(config.block_n, d, self.dt)
        rows = config.block_m * (config.num_warps // 4)
        self.grid = (triton.cdiv(sq, rows), b * hq)
        self.ints = (hq, sq, sk, hq // hkv, causal_off)
        self.qk_scale = scale * _LOG2E
        self.constexprs = _constexprs(config, d, is_causal, return_lse)

    def _desc(self, t: torch.Tensor, rows: int, layout) -> TensorDescriptor:
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]],
                                layout)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor) -> None:
        # Triton's JIT launches on the current device's current stream: make it q's device.
        if torch.cuda.current_device() != self.dev_index:
            with torch.cuda.device(self.dev_index):
                return self(q, k, v, out, lse)
        cfg = self.config
        _attn_fwd_hopper_kernel[self.grid](
            self._desc(q, cfg.block_m, self.layout_m), self._desc(k, cfg.block_n, self.layout_n),
            self._desc(v, cfg.block_n, self.layout_n), self._desc(out, cfg.block_m, self.layout_m),
            lse, *self.ints, self.qk_scale, **self.constexprs, num_warps=4,
        )

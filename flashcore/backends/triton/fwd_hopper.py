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
from .fwd import _LOG2E, _raw_stream

__all__ = ["HopperFwdPlan", "compile_hopper", "consumer_regs", "hopper_unsupported"]


@gluon.jit
def _unit_tiles(u, n_m, IS_CAUSAL: gl.constexpr, PERSISTENT: gl.constexpr):
    # Work unit u -> its tiles [t0, t1). A unit is one tile, except for a persistent causal
    # grid, where it is a pair of row blocks of one head whose key ranges sum to the same
    # length (the longest with the shortest, ...): equal units keep the programs, which take
    # every P-th unit, balanced, and a head's tiles stay close in time (its K/V stay in L2).
    if IS_CAUSAL and PERSISTENT:
        per_head = (n_m + 1) // 2
        t0 = (u // per_head) * n_m + 2 * (u % per_head)
        t1 = gl.minimum(t0 + 2, (u // per_head + 1) * n_m)
    else:
        t0 = u
        t1 = u + 1
    return t0, t1


@gluon.jit
def _tile_coords(t, n_m, Hq, ROWS: gl.constexpr, IS_CAUSAL: gl.constexpr,
                 PERSISTENT: gl.constexpr):
    # Tile t -> (batch, head, first row). Tiles of one head are consecutive, so programs that
    # run at the same time share that head's K/V in L2; causal tiles go longest first.
    bh = t // n_m
    r = t % n_m
    if IS_CAUSAL:
        if PERSISTENT:
            # Row blocks of a head in the order n_m - 1, 0, n_m - 2, 1, ... (see _unit_tiles).
            pid_m = gl.where(r % 2 == 0, n_m - 1 - r // 2, r // 2)
        else:
            pid_m = n_m - 1 - r
    else:
        pid_m = r
    return bh // Hq, bh % Hq, pid_m * ROWS


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, k_empty,
              v_ready, v_empty,
              Hq, Sq, Sk, GROUP, causal_off, n_units,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              NUM_CONSUMERS: gl.constexpr, IS_CAUSAL: gl.constexpr, PERSISTENT: gl.constexpr):
    ROWS: gl.constexpr = BLOCK_M * NUM_CONSUMERS
    n_m = gl.cdiv(Sq, ROWS)
    it = 0  # K/V blocks issued so far: the ring position runs on across tiles
    tc = 0  # tiles done by this program
    for u in range(gl.program_id(0), n_units, gl.num_programs(0)):
        t0, t1 = _unit_tiles(u, n_m, IS_CAUSAL, PERSISTENT)
        for t in range(t0, t1):
            b, h, m0 = _tile_coords(t, n_m, Hq, ROWS, IS_CAUSAL, PERSISTENT)
            hk = h // GROUP
            for c in gl.static_range(NUM_CONSUMERS):
                if PERSISTENT:
                    # Q's buffer is free once the consumer's last QK^T of the previous tile retired.
                    mbarrier.wait(q_empty.index(c), (tc & 1) ^ 1)
                mbarrier.expect(q_bar.index(c), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [b, h, m0 + c * BLOCK_M, 0], q_bar.index(c),
                                                q_smem.index(c))
            hi = _key_hi(m0, Sk, causal_off, ROWS, IS_CAUSAL)
            n_blocks = gl.cdiv(hi, BLOCK_N)
            for j in range(n_blocks):
                s = it % STAGES
                # A fresh barrier is in phase 0, so waiting for the phase before it passes at once.
                ph = ((it // STAGES) & 1) ^ 1
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
                it += 1
            tc += 1


@gluon.jit
def _key_hi(m0, Sk, causal_off, ROWS: gl.constexpr, IS_CAUSAL: gl.constexpr):
    # One past the last key any of the rows [m0, m0 + ROWS) may see.
    if IS_CAUSAL:
        return gl.minimum(gl.maximum(m0 + ROWS + causal_off, 0), Sk)
    else:
        return Sk


@gluon.jit
def _take_turn(turn, g, CID: gl.constexpr, PINGPONG: gl.constexpr):
    # Ping-pong: the consumers issue their wgmma for block g strictly in turn (0, 1, 0, ...),
    # so one warpgroup's softmax runs while the other's GEMMs hold the tensor cores. turn[c]
    # completes once per arrive of the other consumer; consumer 0 holds the first turn.
    if PINGPONG:
        mbarrier.wait(turn.index(CID), (g & 1) ^ (CID == 0))


@gluon.jit
def _pass_turn(turn, CID: gl.constexpr, NUM_CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index((CID + 1) % NUM_CONSUMERS), count=1)


@gluon.jit
def _release_q(q_empty, j, j_last, CID: gl.constexpr, PERSISTENT: gl.constexpr):
    # Persistent grid: after the tile's last QK^T has retired, Q's buffer may take the next
    # tile's rows, so that load overlaps this tile's last PV and epilogue.
    if PERSISTENT:
        if j == j_last:
            mbarrier.arrive(q_empty.index(CID), count=1)


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
def _consume_blocks(q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty, acc,
                    m_i, l_i, j0, j1, base, j_last,
                    offs_m, Sk, causal_off, qk_scale,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                    STAGES: gl.constexpr, MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr,
                    s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                    CID: gl.constexpr, PINGPONG: gl.constexpr,
                    NUM_CONSUMERS: gl.constexpr, PERSISTENT: gl.constexpr):
    # Key block j of the tile sits in ring slot (base + j) % STAGES: the ring position runs on
    # across the tiles of a persistent program.
    dtype: gl.constexpr = k_smem.dtype
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    for j in range(j0, j1):
        g = base + j
        s = g % STAGES
        ph = (g // STAGES) & 1
        mbarrier.wait(k_ready.index(s), ph)
        k_t = k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        qk = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        _take_turn(turn, g, CID, PINGPONG)
        qk = warpgroup_mma(q, k_t, qk, use_acc=False, is_async=True)
        _pass_turn(turn, CID, NUM_CONSUMERS, PINGPONG)
        qk = warpgroup_mma_wait(0, deps=[qk])
        mbarrier.arrive(k_empty.index(s), count=1)
        _release_q(q_empty, j, j_last, CID, PERSISTENT)
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
def _consume_blocks_overlap(q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn,
                            q_empty, acc, m_i, l_i, j0, j1, base, j_last,
                            offs_m, Sk, causal_off, qk_scale,
                            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                            HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                            MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr,
                            s_layout: gl.constexpr, o_layout: gl.constexpr,
                            p_layout: gl.constexpr, CID: gl.constexpr, PINGPONG: gl.constexpr,
                            NUM_CONSUMERS: gl.constexpr, PERSISTENT: gl.constexpr):
    # Software pipeline: PV of block j - 1 runs while block j's softmax does. Needs j1 > j0.
    dtype: gl.constexpr = k_smem.dtype
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    # Block j0 alone (no PV before it).
    g = base + j0
    s = g % STAGES
    mbarrier.wait(k_ready.index(s), (g // STAGES) & 1)
    qk = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    _take_turn(turn, g, CID, PINGPONG)
    qk = warpgroup_mma(q, k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), qk,
                       use_acc=False, is_async=True)
    _pass_turn(turn, CID, NUM_CONSUMERS, PINGPONG)
    qk = warpgroup_mma_wait(0, deps=[qk])
    mbarrier.arrive(k_empty.index(s), count=1)
    _release_q(q_empty, j0, j_last, CID, PERSISTENT)
    p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, j0 * BLOCK_N, offs_n, offs_m, Sk,
                                       causal_off, qk_scale, MASKED, IS_CAUSAL)
    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    for j in range(j0 + 1, j1):
        g = base + j
        s_prev = (g - 1) % STAGES
        s = g % STAGES
        mbarrier.wait(k_ready.index(s), (g // STAGES) & 1)
        qk = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        _take_turn(turn, g, CID, PINGPONG)
        qk = warpgroup_mma(q, k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), qk,
                           use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(s_prev), ((g - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(s_prev).reshape([BLOCK_N, HEAD_DIM]), acc,
                            is_async=True)
        _pass_turn(turn, CID, NUM_CONSUMERS, PINGPONG)
        qk = warpgroup_mma_wait(1, deps=[qk])
        mbarrier.arrive(k_empty.index(s), count=1)
        _release_q(q_empty, j, j_last, CID, PERSISTENT)
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, j * BLOCK_N, offs_n, offs_m, Sk,
                                           causal_off, qk_scale, MASKED, IS_CAUSAL)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(v_empty.index(s_prev), count=1)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
    g_last = base + j1 - 1
    s_last = g_last % STAGES
    mbarrier.wait(v_ready.index(s_last), (g_last // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(s_last).reshape([BLOCK_N, HEAD_DIM]), acc,
                        is_async=True)
    acc = warpgroup_mma_wait(0, deps=[acc])
    mbarrier.arrive(v_empty.index(s_last), count=1)
    return acc, m_i, l_i


@gluon.jit
def _consumer(o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready, k_empty,
              v_ready, v_empty, turn,
              Hq, Sq, Sk, causal_off, qk_scale, n_units,
              CID: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
              IS_CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr, OVERLAP: gl.constexpr,
              PINGPONG: gl.constexpr, PERSISTENT: gl.constexpr):
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    ROWS: gl.constexpr = BLOCK_M * NUM_CONSUMERS
    n_m = gl.cdiv(Sq, ROWS)
    q = q_smem.index(CID).reshape([BLOCK_M, HEAD_DIM])
    # Without a persistent grid O is staged in Q's buffer (dead after the last QK^T); with one,
    # Q's buffer already holds the next tile's rows, so O has its own.
    if PERSISTENT:
        o_view = o_smem.index(CID)
    else:
        o_view = q_smem.index(CID)
    it = 0  # K/V blocks consumed so far (ring position)
    tc = 0
    for u in range(gl.program_id(0), n_units, gl.num_programs(0)):
        t0, t1 = _unit_tiles(u, n_m, IS_CAUSAL, PERSISTENT)
        for t in range(t0, t1):
            b, h, m0_cta = _tile_coords(t, n_m, Hq, ROWS, IS_CAUSAL, PERSISTENT)
            bh = b * Hq + h
            m0 = m0_cta + CID * BLOCK_M
            offs_m = m0 + gl.arange(0, BLOCK_M, layout=row_s)

            # Blocks [0, n_full) are visible in full to every row of this warpgroup; the producer
            # streams n_blocks for the whole tile, and every consumer walks (and releases) all.
            hi = _key_hi(m0_cta, Sk, causal_off, ROWS, IS_CAUSAL)
            n_blocks = gl.cdiv(hi, BLOCK_N)
            if IS_CAUSAL:
                full_hi = gl.minimum(gl.maximum(m0 + causal_off + 1, 0), Sk)
            else:
                full_hi = Sk
            n_full = full_hi // BLOCK_N
            j_last = n_blocks - 1

            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
            l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
            acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

            mbarrier.wait(q_bar.index(CID), tc & 1)
            if OVERLAP:
                if n_full > 0:
                    acc, m_i, l_i = _consume_blocks_overlap(
                        q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty, acc,
                        m_i, l_i, 0, n_full, it, j_last, offs_m, Sk,
                        causal_off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, False, IS_CAUSAL,
                        s_layout, o_layout, p_layout, CID, PINGPONG, NUM_CONSUMERS, PERSISTENT)
            else:
                acc, m_i, l_i = _consume_blocks(
                    q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty, acc, m_i,
                    l_i, 0, n_full, it, j_last, offs_m, Sk,
                    causal_off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, False, IS_CAUSAL,
                    s_layout, o_layout, p_layout, CID, PINGPONG, NUM_CONSUMERS, PERSISTENT)
            acc, m_i, l_i = _consume_blocks(
                q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty, acc, m_i, l_i,
                n_full, n_blocks, it, j_last, offs_m, Sk,
                causal_off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, True, IS_CAUSAL,
                s_layout, o_layout, p_layout, CID, PINGPONG, NUM_CONSUMERS, PERSISTENT)
            if PERSISTENT:
                if n_blocks == 0:  # no QK^T released Q: a causal tile that sees no key
                    mbarrier.arrive(q_empty.index(CID), count=1)
            it += n_blocks

            # Rows with no visible key (bottom-right causal with Sq > Sk) end with l = 0: output 0.
            empty = l_i == 0.0
            l_safe = gl.where(empty, 1.0, l_i)
            out = acc * gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))[:, None]
            if PERSISTENT:
                tma.store_wait(0)  # the previous tile's O has left o_view
            o_view.reshape([BLOCK_M, HEAD_DIM]).store(out.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(o_desc, [b, h, m0, 0], o_view)
            if STORE_LSE:
                lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
                gl.store(LSE + bh.to(gl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)
            tc += 1
    tma.store_wait(0)


@gluon.jit
def _attn_fwd_hopper_kernel(q_desc, k_desc, v_desc, o_desc, LSE,
                            Hq, Sq, Sk, GROUP, causal_off, qk_scale, n_units,
                            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                            BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                            NUM_CONSUMERS: gl.constexpr, IS_CAUSAL: gl.constexpr,
                            STORE_LSE: gl.constexpr, OVERLAP: gl.constexpr,
                            PINGPONG: gl.constexpr, PERSISTENT: gl.constexpr,
                            CONSUMER_REGS: gl.constexpr):
    # Program p runs work units p, p + P, p + 2P, ... (a unit: one (row block, batch x head)
    # tile, or two for a persistent causal grid; _unit_tiles): one each without a persistent
    # grid (P = n_units), else P = the SM count.
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, 1, 1, BLOCK_M, HEAD_DIM],
                                       q_desc.layout)
    if PERSISTENT:
        o_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, 1, 1, BLOCK_M, HEAD_DIM],
                                           o_desc.layout)
    else:
        o_smem = q_smem
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(q_bar.index(c), count=1)
        mbarrier.init(q_empty.index(c), count=1)
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
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, Hq, Sq, Sk, GROUP, causal_off, n_units,
                         BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS, IS_CAUSAL, PERSISTENT)),
            (_consumer, (o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, turn, Hq, Sq, Sk, causal_off, qk_scale,
                         n_units, 0, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS,
                         IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG, PERSISTENT)),
            (_consumer, (o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, turn, Hq, Sq, Sk, causal_off, qk_scale,
                         n_units, 1, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS,
                         IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG, PERSISTENT)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
    else:
        gl.warp_specialize([
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, Hq, Sq, Sk, GROUP, causal_off, n_units,
                         BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS, IS_CAUSAL, PERSISTENT)),
            (_consumer, (o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, turn, Hq, Sq, Sk, causal_off, qk_scale,
                         n_units, 0, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS,
                         IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG, PERSISTENT)),
            (_consumer, (o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, turn, Hq, Sq, Sk, causal_off, qk_scale,
                         n_units, 1, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS,
                         IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG, PERSISTENT)),
            (_consumer, (o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, turn, Hq, Sq, Sk, causal_off, qk_scale,
                         n_units, 2, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS,
                         IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG, PERSISTENT)),
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
        return f"head dim {head_dim} (supported: {', '.join(map(str, HOPPER_HEAD_DIMS))})"
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
        PERSISTENT=bool(cfg.persistent), CONSUMER_REGS=consumer_regs(cfg.num_warps),
    )


def _compile(cfg: TritonFwdConfig, dtype: str, head_dim: int, is_causal: bool, store_lse: bool,
             target=None):
    dt = _GL_DTYPE_NAME[dtype]

    def desc(rows: int) -> str:
        return f"tensordesc<{dtype}[1, 1, {rows}, {head_dim}],{_layout(rows, head_dim, dt)!r}>"

    sig = {"q_desc": desc(cfg.block_m), "k_desc": desc(cfg.block_n), "v_desc": desc(cfg.block_n),
           "o_desc": desc(cfg.block_m), "LSE": "*fp32", "Hq": "i32", "Sq": "i32", "Sk": "i32",
           "GROUP": "i32", "causal_off": "i32", "qk_scale": "fp32", "n_units": "i32"}
    cx = _constexprs(cfg, head_dim, is_causal, store_lse)
    sig.update({k: "constexpr" for k in cx})
    src = GluonASTSource(_attn_fwd_hopper_kernel, sig, cx)
    return triton.compile(src, target=target, options={"num_warps": 4})


def compile_hopper(spec, target=None):
    """Compile one variant ahead of time from a ``fwd.KernelSpec`` whose config has hopper=1
    (the resource gate passes a ``GPUTarget`` to compile without a GPU)."""
    return _compile(spec.config, spec.dtype, spec.head_dim, spec.is_causal, spec.store_lse,
                    target)


# Compiled kernels per (config, dtype, head dim, causal, lse, device): shared by every plan.
_COMPILED: dict[tuple, object] = {}
_NUM_SMS: dict[int, int] = {}
_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16"}
# TMA descriptors kept per plan, keyed by (argument, pointer, strides); cleared when full.
_MAX_CACHED_MAPS = 64


def _num_sms(dev_index: int) -> int:
    n = _NUM_SMS.get(dev_index)
    if n is None:
        n = _NUM_SMS[dev_index] = torch.cuda.get_device_properties(dev_index).multi_processor_count
    return n


def _raw_launcher(kernel):
    """Triton 3.6's C launch entry point of a compiled kernel, under the Python wrapper that
    builds a TMA descriptor from every host descriptor argument on every call; None where this
    Triton lays its launcher out differently (then the plan launches through the JIT)."""
    run = kernel.run
    if getattr(run, "profile_scratch_size", 1) != 0 or not hasattr(run, "launch"):
        return None
    meta = getattr(kernel.metadata, "tensordesc_meta", None)
    if not meta or len(meta) != 4:
        return None
    for cell in getattr(run.launch, "__closure__", None) or ():
        fn = cell.cell_contents
        if type(fn).__name__ == "builtin_function_or_method":
            return fn
    return None


class HopperFwdPlan:
    """Launch state of one problem (shapes, dtype, options) for the Gluon kernel. The rank-4
    descriptors carry the tensors' own strides, so BHSD and BSHD views launch without a copy.

    The launch skips Triton's JIT: the kernel is compiled once per variant, its four TMA
    descriptors are encoded once per (pointer, strides) and cached, and the C launcher is
    called directly (as ``fwd.TritonFwdPlan`` does for the ``tl.dot`` kernel)."""

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
        n_m = triton.cdiv(sq, rows)
        # Work units (_unit_tiles): row-block tiles, paired per head for a persistent causal grid.
        self.n_units = (n_m + 1) // 2 * b * hq if config.persistent and is_causal else n_m * b * hq
        # Persistent: one program per SM walks the tiles (fewer when there are fewer tiles).
        grid = self.n_units
        if config.persistent:
            grid = min(grid, _num_sms(self.dev_index))
        self.grid = (grid,)
        self.ints = (hq, sq, sk, hq // hkv, causal_off)
        self.qk_scale = scale * _LOG2E
        self.constexprs = _constexprs(config, d, is_causal, return_lse)
        # The C launcher takes every parameter in order and skips the constexpr ones.
        self.placeholders = (None,) * len(self.constexprs)
        self.key = (config, _DTYPE_NAME[q.dtype], d, bool(is_causal), bool(return_lse),
                    self.dev_index)
        self.kernel = None
        self.launch = None
        self.maps: dict[tuple, list] = {}

    def _desc(self, t: torch.Tensor, rows: int, layout) -> TensorDescriptor:
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]],
                                layout)

    def _prepare(self) -> None:
        kernel = _COMPILED.get(self.key)
        if kernel is None:
            cfg, dtype, d, causal, lse, _ = self.key
            with torch.cuda.device(self.dev_index):
                kernel = _compile(cfg, dtype, d, causal, lse)
                kernel._init_handles()
            _COMPILED[self.key] = kernel
        self.kernel = kernel
        self.launch = _raw_launcher(kernel)
        self.scratch = kernel.metadata.global_scratch_size * self.grid[0]
        self.fill = triton.runtime.driver.active.utils.fill_tma_descriptor

    def _map(self, i: int, t: torch.Tensor) -> list:
        # What Triton's launcher expands a host descriptor into: the encoded CUtensorMap, then
        # the shape and strides it was built from.
        stride = t.stride()
        key = (i, t.data_ptr(), stride)
        args = self.maps.get(key)
        if args is None:
            from triton.backends.nvidia.driver import TMA_DTYPE_DEVICE_TO_HOST

            m = self.kernel.metadata.tensordesc_meta[i]
            shape = list(t.shape)
            tmap = self.fill(t.data_ptr(), m["swizzle"], m["elem_size"],
                             TMA_DTYPE_DEVICE_TO_HOST[m["elem_type"]], m["block_size"], shape,
                             list(stride), 0)
            if len(self.maps) >= _MAX_CACHED_MAPS:
                self.maps.clear()
            args = self.maps[key] = [tmap, *shape, *stride]
        return args

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor) -> None:
        if torch.cuda.current_device() != self.dev_index:
            # The launch goes to the current CUDA context: make it q's device.
            with torch.cuda.device(self.dev_index):
                return self(q, k, v, out, lse)
        if self.kernel is None:
            self._prepare()
        if self.launch is None or _raw_stream is None:
            return self._jit_call(q, k, v, out, lse)
        kernel = self.kernel
        buf = (torch.empty(self.scratch, dtype=torch.uint8, device=q.device)
               if self.scratch else None)
        self.launch(
            self.grid[0], 1, 1, _raw_stream(self.dev_index), kernel.function,
            kernel.run.launch_cooperative_grid, kernel.run.launch_pdl, buf, None,
            kernel.packed_metadata, None, None, None,
            *self._map(0, q), *self._map(1, k), *self._map(2, v), *self._map(3, out),
            lse.data_ptr(), *self.ints, self.qk_scale, self.n_units, *self.placeholders,
        )

    def _jit_call(self, q, k, v, out, lse) -> None:
        bm, bn = self.config.block_m, self.config.block_n
        _attn_fwd_hopper_kernel[self.grid](
            self._desc(q, bm, self.layout_m), self._desc(k, bn, self.layout_n),
            self._desc(v, bn, self.layout_n), self._desc(out, bm, self.layout_m),
            lse, *self.ints, self.qk_scale, self.n_units, **self.constexprs, num_warps=4,
        )


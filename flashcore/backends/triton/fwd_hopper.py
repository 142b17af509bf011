"""Hopper (sm_90) forward attention in Gluon: warp-specialised, TMA-fed, async wgmma.

Why a second kernel: the ``tl.dot`` kernel in ``fwd.py`` cannot overlap softmax with the tensor
cores on Hopper (Triton 3.6 waits on the QK^T wgmma group at once, and both warpgroups of a
program stall on the same barriers; docs/perf-notes.md). Gluon exposes the pieces directly:

- one producer partition (4 warps, few registers) issues every TMA copy: Q once, then K/V
  blocks into a ``STAGES``-deep ring guarded by ``ready``/``empty`` mbarriers;
- ``NUM_CONSUMERS`` consumer warpgroups (240 registers each via setmaxnreg) each own
  ``BLOCK_M`` query rows of the program's tile and run QK^T -> online softmax -> PV with
  asynchronous wgmma; a K/V stage is released when every consumer's PV on it has retired (a
  block wholly above a consumer's causal rows, once it has landed), so there is no block-wide
  barrier in the main loop;
- the consumers are independent warpgroups, so while one does its softmax on the CUDA cores the
  other's wgmma keeps the tensor cores busy;
- with ``OVERLAP`` a consumer also overlaps inside itself: PV of block j-1 is issued together
  with QK^T of block j and runs during the softmax of block j (FA3's intra-warpgroup pipeline);
  two such consumers walk a causal tile's key blocks last first, so the masked diagonal block
  opens the pipeline and the steady steps see full blocks only;
- on a persistent grid with that pipeline the tiles of a program are pipelined into one
  another (``CROSS_TILE``: the next tile's first QK^T is issued with this tile's last PV), for
  non-causal launches with whole key blocks and causal ones at diagonal offset 0 (with
  head_dim > 64 up to ``config.CROSS_TILE_CAUSAL_MAX_SK`` keys).

With ``KSPLIT`` (for grids with fewer tiles than SMs, such as B1 H8 S512) the consumers share
one 64-row tile and split its keys instead: consumer c takes key blocks c, c + C, c + 2C, ...,
and consumer 0 merges the others' partial (max, sum, O) through shared memory. A tile's serial
chain of key blocks is then C times shorter, where a grid of 64 tiles leaves half the SMs idle
anyway.

Tensors are addressed through rank-4 TMA descriptors over [B, H, S, D] with the caller's
strides (BHSD or BSHD, no copy): the copy engine zero-fills rows past S and clips stores at S
per (batch, head), so ragged sequence lengths need only the score mask. The same holds along D:
a padded head dim (40, 80, 96, 192) runs the kernel of 64 / 128 / 256 with boxes that wide over
the tensors' own D, zero-filled past it on load and clipped on store.
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

from .config import (
    TritonFwdConfig,
    cross_tile,
    hopper_grid,
    hopper_head_dim,
    stream_k,
    stream_k_grid,
)
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


@gluon.constexpr_function
def _tile_rows(block_m, num_consumers, ksplit):
    # Query rows per tile: one 64-row block per consumer, or one shared block under KSPLIT.
    return block_m if ksplit else block_m * num_consumers


@gluon.constexpr_function
def _swap_rows(is_causal, block_m, block_n):
    # A causal cross-tile program with key blocks no wider than a consumer's rows: the consumer
    # with a tile's upper row block skips the key block above it, so it walks one block fewer.
    # A persistent causal unit pairs a long tile with a short one (_unit_tiles); with fixed
    # roles the second consumer walked 10 blocks of a 512-key unit to the first's 8, and the
    # first then waited on the ring. So the consumers trade row blocks every tile (_row_block),
    # 9 blocks each, and either one may skip.
    return is_causal and block_n <= block_m


@gluon.constexpr_function
def _cross_skips(is_causal, cid, block_m, block_n, num_consumers):
    # Whether cross-tile consumer cid may meet key blocks wholly above its rows: the consumer
    # of a tile's upper row block, i.e. either one when they trade rows (_swap_rows), else
    # a consumer whose rows end a key block or more before the tile's.
    return _swap_rows(is_causal, block_m, block_n) or (
        is_causal and (num_consumers - 1 - cid) * block_m >= block_n)


@gluon.jit
def _row_block(c, tc, SWAP: gl.constexpr):
    # The row block (0: upper, 1: lower) of a two-row-block tile that consumer c takes in the
    # program's tile tc: its own, or the other one on odd tiles with SWAP (_swap_rows).
    if SWAP:
        return c ^ (tc % 2)
    else:
        return c


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, k_empty,
              v_ready, v_empty,
              Hq, Sq, Sk, GROUP, causal_off, n_units,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              NUM_CONSUMERS: gl.constexpr, IS_CAUSAL: gl.constexpr, PERSISTENT: gl.constexpr,
              KSPLIT: gl.constexpr, CROSS_TILE: gl.constexpr, REVERSE: gl.constexpr,
              n_main, STREAM_K: gl.constexpr):
    ROWS: gl.constexpr = _tile_rows(BLOCK_M, NUM_CONSUMERS, KSPLIT)
    if STREAM_K:
        _produce_sk(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                    k_empty, v_ready, v_empty, Hq, Sq, Sk, GROUP, n_units, n_main, BLOCK_M,
                    BLOCK_N, STAGES, NUM_CONSUMERS)
        return
    # Q buffers per consumer: two when tiles are pipelined into each other (CROSS_TILE).
    Q_BUFS: gl.constexpr = 2 if CROSS_TILE else 1
    n_m = gl.cdiv(Sq, ROWS)
    it = 0  # K/V blocks issued so far: the ring position runs on across tiles
    tc = 0  # tiles done by this program
    for u in range(gl.program_id(0), n_units, gl.num_programs(0)):
        t0, t1 = _unit_tiles(u, n_m, IS_CAUSAL, PERSISTENT)
        for t in range(t0, t1):
            b, h, m0 = _tile_coords(t, n_m, Hq, ROWS, IS_CAUSAL, PERSISTENT)
            hk = h // GROUP
            if KSPLIT:
                # The consumers share one Q tile (KSPLIT is never persistent: one tile a program).
                mbarrier.expect(q_bar.index(0), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [b, h, m0, 0], q_bar.index(0),
                                                q_smem.index(0))
            else:
                for c in gl.static_range(NUM_CONSUMERS):
                    qi = c * Q_BUFS + tc % Q_BUFS
                    if PERSISTENT:
                        # Q's buffer is free once the consumer's last QK^T of the tile that last
                        # used it retired.
                        mbarrier.wait(q_empty.index(qi), ((tc // Q_BUFS) & 1) ^ 1)
                    mbarrier.expect(q_bar.index(qi), q_desc.block_type.nbytes)
                    rb = _row_block(c, tc, CROSS_TILE and _swap_rows(IS_CAUSAL, BLOCK_M,
                                                                     BLOCK_N))
                    tma.async_copy_global_to_shared(q_desc, [b, h, m0 + rb * BLOCK_M, 0],
                                                    q_bar.index(qi), q_smem.index(qi))
            hi = _key_hi(m0, Sk, causal_off, ROWS, IS_CAUSAL)
            n_blocks = gl.cdiv(hi, BLOCK_N)
            for j in range(n_blocks):  # j: the block's position in the tile's stream
                _issue_kv(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b,
                          hk, _key0(j, n_blocks - 1, BLOCK_N, REVERSE), it, STAGES)
                it += 1
            tc += 1


@gluon.jit
def _issue_kv(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b, hk, key0,
              it, STAGES: gl.constexpr):
    # The K and V blocks at key0 into ring position it, once the consumers released its slot.
    s = it % STAGES
    # A fresh barrier is in phase 0, so waiting for the phase before it passes at once.
    ph = ((it // STAGES) & 1) ^ 1
    # K and V have their own barriers: K_j is consumed (and released) by QK^T one step before
    # V_j is by PV, so K can run ahead of V.
    mbarrier.wait(k_empty.index(s), ph)
    mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [b, hk, key0, 0], k_ready.index(s), k_smem.index(s))
    mbarrier.wait(v_empty.index(s), ph)
    mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(v_desc, [b, hk, key0, 0], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _sk_span(n_main, n_units, nb):
    # STREAM_K: this program's range [lo, hi) of the launch's (tile, key block) iterations,
    # tile-major (nb blocks a tile). Programs below n_main take one whole tile each; the last
    # P programs (P = the SM count) split the remaining P to 2P - 1 tiles' iterations evenly,
    # at least one tile's worth each, so a tile has at most two parts: the head (its first
    # blocks, at the end of a program's range) and the tail (at the start of the next one's).
    pid = gl.program_id(0)
    if pid < n_main:
        lo = pid * nb
        hi = lo + nb
    else:
        u = pid - n_main
        n_sk = gl.num_programs(0) - n_main
        span = (n_units - n_main) * nb
        lo = n_main * nb + (u * span) // n_sk
        hi = n_main * nb + ((u + 1) * span) // n_sk
    return lo, hi


@gluon.jit
def _produce_sk(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                k_empty, v_ready, v_empty, Hq, Sq, Sk, GROUP, n_units, n_main,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                NUM_CONSUMERS: gl.constexpr):
    # STREAM_K's producer: the blocks [k0, k1) of each tile in this program's span (_sk_span),
    # Q once per tile part. Non-causal, whole key blocks (config.stream_k).
    ROWS: gl.constexpr = BLOCK_M * NUM_CONSUMERS
    n_m = gl.cdiv(Sq, ROWS)
    nb = Sk // BLOCK_N
    lo, hi = _sk_span(n_main, n_units, nb)
    it = 0
    tc = 0
    for t in range(lo // nb, (hi - 1) // nb + 1):
        k0 = gl.maximum(lo - t * nb, 0)
        k1 = gl.minimum(hi - t * nb, nb)
        b, h, m0 = _tile_coords(t, n_m, Hq, ROWS, False, True)
        hk = h // GROUP
        for c in gl.static_range(NUM_CONSUMERS):
            mbarrier.wait(q_empty.index(c), (tc & 1) ^ 1)
            mbarrier.expect(q_bar.index(c), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, h, m0 + c * BLOCK_M, 0], q_bar.index(c),
                                            q_smem.index(c))
        for j in range(k0, k1):
            _issue_kv(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b, hk,
                      j * BLOCK_N, it, STAGES)
            it += 1
        tc += 1


@gluon.constexpr_function
def _reverse(is_causal, overlap, ksplit, num_consumers):
    # Causal tiles walk their key blocks last first (FA3's order): the last diagonal block, the
    # tile's only masked one when it is aligned, then opens the in-warpgroup pipeline as its
    # first block (whose QK^T and softmax nothing overlaps anyway), so no serial masked block
    # ends the tile. Measured on the H200 (docs/perf-notes.md, twelfth session): +2-7 % on
    # two-consumer causal tiles at S = 512-1k; three consumers (160 registers, the masked form
    # with the key vector) lost 4 % at D = 64 16k, so they keep the forward order.
    return is_causal and overlap and not ksplit and num_consumers == 2


@gluon.jit
def _key0(j, j_last, BLOCK_N: gl.constexpr, REVERSE: gl.constexpr):
    # First key of the block at position j of a tile's stream of blocks 0 .. j_last.
    if REVERSE:
        return (j_last - j) * BLOCK_N
    else:
        return j * BLOCK_N


@gluon.jit
def _key_hi(m0, Sk, causal_off, ROWS: gl.constexpr, IS_CAUSAL: gl.constexpr):
    # One past the last key any of the rows [m0, m0 + ROWS) may see.
    if IS_CAUSAL:
        return gl.minimum(gl.maximum(m0 + ROWS + causal_off, 0), Sk)
    else:
        return Sk


@gluon.jit
def _own_blocks(m0, Sk, causal_off, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    # Causal: the key blocks any of one consumer's rows [m0, m0 + BLOCK_M) can see; the tile's
    # blocks past them lie wholly above the diagonal for these rows.
    return gl.cdiv(gl.minimum(gl.maximum(m0 + BLOCK_M + causal_off, 0), Sk), BLOCK_N)


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
def _release_q(q_empty, qi, j, j_last, PERSISTENT: gl.constexpr):
    # Persistent grid: after the tile's last QK^T has retired, Q's buffer qi may take a later
    # tile's rows, so that load overlaps this tile's last PV and epilogue.
    if PERSISTENT:
        if j == j_last:
            mbarrier.arrive(q_empty.index(qi), count=1)


# The lazy rescale's threshold, in the exp2 domain: a row's reference max moves only when the
# block's max exceeds it by more than this, so P stays <= 2^8 (exact enough in fp16 / bf16, far
# from overflow) and most blocks after the first leave O alone.
_RESCALE_TAU = gl.constexpr(8.0)


@gluon.jit
def _warp_any(flag):
    # Per-row int flags (2 rows a thread in the wgmma layout) -> 1 on every row of a warp if any
    # row of that warp is set: a vote, no shared memory or barrier (a warpgroup-wide
    # gl.max would put two named barriers between the row max and the exp2s).
    return gl.inline_asm_elementwise(
        "{ .reg .pred p, q; setp.ne.s32 p, $2, 0; setp.ne.s32 q, $3, 0; or.pred p, p, q; "
        "vote.sync.any.pred p, p, -1; selp.s32 $0, 1, 0, p; mov.b32 $1, $0; }",
        # Not pure: a vote must not be moved into divergent code.
        "=r,=r,r,r", [flag], dtype=gl.int32, is_pure=False, pack=2)


@gluon.constexpr_function
def _rescale_asm(n):
    # O *= alpha over a thread's n accumulator elements (outputs tied to the inputs), skipped
    # by a warp-uniform branch when the warp's flag is 0 (no row of the warp moved its max).
    # Operands: n outputs, then the n tied acc inputs, n alphas, n int flags (all equal in a
    # warp: any one of them decides).
    muls = " ".join(f"mul.f32 ${i}, ${i}, ${2 * n + i};" for i in range(n))
    return (f"{{ .reg .pred p; setp.eq.s32 p, ${3 * n}, 0; @p bra.uni SKIP; {muls} SKIP: }}",
            ",".join(["=f"] * n + [str(i) for i in range(n)] + ["f"] * n + ["r"] * n))


@gluon.jit
def _softmax_step(qk, m_i, l_i, key0, offs_n, offs_m, Sk, causal_off, qk_scale,
                  MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr, LEAN_MASK: gl.constexpr,
                  LAZY: gl.constexpr, FRESH: gl.constexpr):
    """One block of the online softmax in the exp2 domain. Returns (p fp32, alpha, m, l, grow).

    With LAZY (_lazy) the reference max m is lazy (FA4's conditional rescale): a row's m moves
    only when the block's max exceeds it by more than _RESCALE_TAU, else its alpha is exactly
    1; grow tells each warp whether any of its rows moved, and the caller skips multiplying O
    by alpha in the warps where none did (D / 2 multiplies a thread, 20 % of a D = 128 block's
    instructions). The result is the same softmax: O and l are both relative to m, whatever m
    is. FRESH: the first block of a fresh row state (m = -inf, l = 0, O = 0: the pipelined
    paths' first block of a tile), where m simply becomes the block max and O needs no
    rescale.

    LEAN_MASK picks the masked form with fewer instructions (2 consumers, 240 registers); at
    160 registers (3 consumers) it spills (ptxas, 48-156 bytes at D = 64), so those keep the
    form with the key vector, which does not."""
    if MASKED and not LEAN_MASK:
        keys = key0 + offs_n
        ok = (keys < Sk)[None, :]
        if IS_CAUSAL:
            ok = ok & (keys[None, :] <= (offs_m + causal_off)[:, None])
        qk = gl.where(ok, qk * qk_scale, float("-inf"))
        m_blk = gl.max(qk, axis=1)
        scale = 1.0
    elif MASKED:
        # Key key0 + c is visible to row offs_m[r] iff c < lim[r]: one compare per element
        # against a per-row bound (the key vector and a second compare cost instructions, and
        # the kernel is instruction-cache bound at short S: docs/perf-notes.md, seventh
        # session). -inf before the scale (qk_scale > 0 keeps it), so the scale stays fused
        # into exp2's FMA as in the unmasked branch.
        if IS_CAUSAL:
            lim = gl.minimum(offs_m + (causal_off + 1 - key0), Sk - key0)
        else:
            lim = gl.full(offs_m.shape, 0, gl.int32, offs_m.type.layout) + (Sk - key0)
        qk = gl.where(offs_n[None, :] < lim[:, None], qk, float("-inf"))
        m_blk = gl.max(qk, axis=1) * qk_scale
        scale = qk_scale
    else:
        # qk_scale > 0 (checked on the host): max before scaling, one FMA per element.
        m_blk = gl.max(qk, axis=1) * qk_scale
        scale = qk_scale
    if FRESH:
        m_new = m_blk
    elif not LAZY:
        m_new = gl.maximum(m_i, m_blk)
    else:
        # A row's m moves only past the threshold (a row with m = -inf and a visible key
        # always moves: inf > 8; -inf - -inf = nan compares false); then m_blk > m_i, so the
        # new max is m_blk. The difference, not m_i + 8: that rounds at |m_i| >= 2^27 and
        # could let P pass 2^16 (fp16 overflow).
        up = m_blk - m_i > _RESCALE_TAU
        m_new = gl.where(up, m_blk, m_i)
    # A row with no visible key yet keeps m = -inf: subtract 0 so exp2 gives 0, not nan.
    if MASKED:
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = gl.exp2(qk * scale - m_sub[:, None])
    if FRESH:
        alpha = m_i  # unused: O and l are still 0
        grow = m_i
        l_i = gl.sum(p, axis=1)
    elif not LAZY:
        alpha = gl.exp2(m_i - m_sub)
        grow = m_i  # unused: every block rescales
        l_i = l_i * alpha + gl.sum(p, axis=1)
    else:
        # alpha is exactly 1 on a row that kept its m, so a warp that rescales for one row
        # leaves the others as they are.
        alpha = gl.where(up, gl.exp2(m_i - m_sub), 1.0)
        grow = _warp_any(up.to(gl.int32))
        l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i, grow


@gluon.constexpr_function
def _lazy(head_dim):
    # The lazy rescale where it saves enough: D / 2 multiplies a thread and block against ~10
    # more instructions and a branch that splits ptxas's scheduling region. Measured on the
    # H200 (docs/perf-notes.md, eleventh session): D = 64 lost 3-5 % at 2k-16k with it on its
    # three-consumer configs (its two-consumer ones gained 0.6-1.7 %).
    return head_dim >= 128


@gluon.jit
def _rescale(acc, alpha, grow, o_layout: gl.constexpr):
    # O *= alpha per row; with the lazy rescale, skipped by each warp whose rows all kept their
    # m (grow = 0; alpha is 1 there): inline asm, because a Gluon `if` needs one condition for
    # the whole warpgroup.
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    if not _lazy(acc.shape[1]):
        return acc * gl.convert_layout(alpha, row_o)[:, None]
    n: gl.constexpr = acc.shape[0] * acc.shape[1] // 128  # accumulator elements a thread
    asm: gl.constexpr = _rescale_asm(n)
    return gl.inline_asm_elementwise(
        asm[0], asm[1],
        [acc, gl.convert_layout(alpha, row_o)[:, None], gl.convert_layout(grow, row_o)[:, None]],
        dtype=gl.float32, is_pure=True, pack=n)


@gluon.jit
def _skip_blocks(k_ready, k_empty, v_ready, v_empty, turn, q_empty, qi, j0, j1, base, j_last,
                 STAGES: gl.constexpr, CID: gl.constexpr, PINGPONG: gl.constexpr,
                 NUM_CONSUMERS: gl.constexpr, PERSISTENT: gl.constexpr, STEP: gl.constexpr):
    # Key blocks j0, j0 + STEP, ... < j1 of the tile that no row of this consumer can see: no
    # GEMM, but the ring slots are released (every consumer must, the empty barriers count
    # them) and the ping-pong turn passed on. The waits keep each slot's phases in step: a
    # slot is released only after its fill landed.
    for j in range(j0, j1, STEP):
        g = base + j
        s = g % STAGES
        ph = (g // STAGES) & 1
        _take_turn(turn, g, CID, PINGPONG)
        _pass_turn(turn, CID, NUM_CONSUMERS, PINGPONG)
        mbarrier.wait(k_ready.index(s), ph)
        mbarrier.arrive(k_empty.index(s), count=1)
        _release_q(q_empty, qi, j, j_last, PERSISTENT)
        mbarrier.wait(v_ready.index(s), ph)
        mbarrier.arrive(v_empty.index(s), count=1)


@gluon.jit
def _issue_qk(q, k_smem, k_ready, turn, g, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
              CID: gl.constexpr, PINGPONG: gl.constexpr):
    # QK^T of ring position g issued (asynchronously) once K has landed and, under ping-pong,
    # this consumer has the turn; the caller passes the turn on and waits for the result.
    s = g % STAGES
    mbarrier.wait(k_ready.index(s), (g // STAGES) & 1)
    qk = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    _take_turn(turn, g, CID, PINGPONG)
    return warpgroup_mma(q, k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), qk,
                         use_acc=False, is_async=True)


@gluon.jit
def _consume_blocks(q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty, qi,
                    acc, m_i, l_i, j0, j1, base, j_last,
                    offs_m, Sk, causal_off, qk_scale,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                    STAGES: gl.constexpr, MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr,
                    s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                    CID: gl.constexpr, PINGPONG: gl.constexpr,
                    NUM_CONSUMERS: gl.constexpr, PERSISTENT: gl.constexpr, STEP: gl.constexpr,
                    REVERSE: gl.constexpr):
    # Key blocks j0, j0 + STEP, ... < j1 (STEP > 1: this consumer's share under KSPLIT). Block j
    # of the tile sits in ring slot (base + j) % STAGES: the ring position runs on across the
    # tiles of a persistent program.
    dtype: gl.constexpr = k_smem.dtype
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    for j in range(j0, j1, STEP):
        g = base + j
        s = g % STAGES
        ph = (g // STAGES) & 1
        qk = _issue_qk(q, k_smem, k_ready, turn, g, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                       s_layout, CID, PINGPONG)
        _pass_turn(turn, CID, NUM_CONSUMERS, PINGPONG)
        qk = warpgroup_mma_wait(0, deps=[qk])
        mbarrier.arrive(k_empty.index(s), count=1)
        _release_q(q_empty, qi, j, j_last, PERSISTENT)
        p, alpha, m_i, l_i, grow = _softmax_step(qk, m_i, l_i,
                                                 _key0(j, j_last, BLOCK_N, REVERSE), offs_n,
                                                 offs_m, Sk, causal_off, qk_scale, MASKED,
                                                 IS_CAUSAL, NUM_CONSUMERS == 2, _lazy(HEAD_DIM),
                                                 False)
        acc = _rescale(acc, alpha, grow, o_layout)
        p_op = _p_operand(p, dtype, p_layout, False)
        mbarrier.wait(v_ready.index(s), ph)
        acc = _issue_pv(p_op, v_smem.index(s).reshape([BLOCK_N, HEAD_DIM]), acc, p_layout)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(v_empty.index(s), count=1)
    return acc, m_i, l_i


@gluon.constexpr_function
def _cvt_x2(dtype):
    # The PTX that narrows two fp32 values into one register of two 16-bit ones (_pack_p).
    return f"cvt.rn.{'f16' if dtype == gl.float16 else 'bf16'}x2.f32 $0, $2, $1;"


@gluon.constexpr_function
def _twice(dtype):
    # (dtype, dtype): the result types of _unpack_p's two-output asm.
    return (dtype, dtype)


@gluon.jit
def _pack_p(p, dtype: gl.constexpr):
    # P (fp32, wgmma accumulator layout) narrowed a pair of columns at a time into int32 by one
    # cvt.rn.{f16,bf16}x2 (the rounding of p.to(dtype)). The causal cross-tile pipeline carries
    # P across its loops in this form: carried as 16-bit values, LLVM folded the phi of the
    # two incoming narrowings into a phi of floats, narrowed them one by one after it and
    # ptxas packed the halves with 32 PRMT a step (docs/perf-notes.md, thirteenth and
    # fourteenth sessions).
    M: gl.constexpr = p.shape[0]
    N: gl.constexpr = p.shape[1]
    lo, hi = gl.split(gl.reshape(p, [M, N // 2, 2]))
    return gl.inline_asm_elementwise(_cvt_x2(dtype), "=r,f,f", [lo, hi], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _unpack_p(pk, dtype: gl.constexpr, p_layout: gl.constexpr):
    # _pack_p's int32 pairs back to the 16-bit PV operand (register moves only, at the wgmma).
    lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [pk],
                                       dtype=_twice(dtype), is_pure=True, pack=1)
    M: gl.constexpr = pk.shape[0]
    N2: gl.constexpr = pk.shape[1]
    return gl.convert_layout(gl.reshape(gl.join(lo, hi), [M, N2 * 2]), p_layout)


@gluon.jit
def _p_operand(p, dtype: gl.constexpr, p_layout: gl.constexpr, PACK_P: gl.constexpr):
    # P (fp32) as the pipeline carries it to the next PV: packed int32 pairs (_pack_p) on the
    # causal cross-tile path, else 16-bit values in the wgmma operand layout.
    if PACK_P:
        p_op = _pack_p(p, dtype)
    else:
        p_op = gl.convert_layout(p.to(dtype), p_layout)
    return p_op


@gluon.jit
def _issue_pv(p_op, v_tile, acc, p_layout: gl.constexpr):
    # PV issued asynchronously from _p_operand's P (unpacked at the wgmma if packed).
    if p_op.dtype == gl.int32:
        p_in = _unpack_p(p_op, v_tile.dtype, p_layout)
    else:
        p_in = p_op
    return warpgroup_mma(p_in, v_tile, acc, is_async=True)


@gluon.jit
def _issue_qk_pv(q, k_smem, v_smem, k_ready, k_empty, v_ready, turn, acc, p_op, g, g_prev,
                 p_layout: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
                 CID: gl.constexpr, PINGPONG: gl.constexpr, NUM_CONSUMERS: gl.constexpr):
    # One step of the in-warpgroup pipeline: QK^T of ring position g and PV of the previous
    # block (p_op, ring position g_prev) issued together. Returns (qk, acc) once QK^T has
    # retired and K's slot is released; PV is still in flight (wait on acc before using it,
    # then release V's slot g_prev).
    s = g % STAGES
    s_prev = g_prev % STAGES
    qk = _issue_qk(q, k_smem, k_ready, turn, g, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, s_layout,
                   CID, PINGPONG)
    mbarrier.wait(v_ready.index(s_prev), (g_prev // STAGES) & 1)
    acc = _issue_pv(p_op, v_smem.index(s_prev).reshape([BLOCK_N, HEAD_DIM]), acc, p_layout)
    _pass_turn(turn, CID, NUM_CONSUMERS, PINGPONG)
    qk = warpgroup_mma_wait(1, deps=[qk])
    mbarrier.arrive(k_empty.index(s), count=1)
    return qk, acc


@gluon.jit
def _overlap_steps(q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty, qi,
                   acc, p_op, m_i, l_i, g_prev, j0, j1, base, j_last,
                   offs_m, Sk, causal_off, qk_scale,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                   STAGES: gl.constexpr, MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr,
                   s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                   CID: gl.constexpr, PINGPONG: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                   PERSISTENT: gl.constexpr, STEP: gl.constexpr, REVERSE: gl.constexpr,
                   PACK_P: gl.constexpr):
    # The steady state of the in-warpgroup pipeline, blocks j0, j0 + STEP, ... < j1: QK^T of
    # block j and PV of the previous block (p_op, ring position g_prev) are issued together,
    # QK^T retires first, and block j's softmax runs while PV is in flight. Returns the state
    # with block j1 - STEP's P still to multiply into acc.
    dtype: gl.constexpr = k_smem.dtype
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    for j in range(j0, j1, STEP):
        g = base + j
        qk, acc = _issue_qk_pv(q, k_smem, v_smem, k_ready, k_empty, v_ready, turn, acc, p_op, g,
                               g_prev, p_layout, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, s_layout, CID,
                               PINGPONG, NUM_CONSUMERS)
        _release_q(q_empty, qi, j, j_last, PERSISTENT)
        p, alpha, m_i, l_i, grow = _softmax_step(qk, m_i, l_i,
                                                 _key0(j, j_last, BLOCK_N, REVERSE), offs_n,
                                                 offs_m, Sk, causal_off, qk_scale, MASKED,
                                                 IS_CAUSAL, NUM_CONSUMERS == 2, _lazy(HEAD_DIM),
                                                 False)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(v_empty.index(g_prev % STAGES), count=1)
        acc = _rescale(acc, alpha, grow, o_layout)
        p_op = _p_operand(p, dtype, p_layout, PACK_P)
        g_prev = g
    return acc, p_op, m_i, l_i, g_prev


@gluon.jit
def _first_block(q, k_smem, k_ready, k_empty, turn, q_empty, qi, acc, m_i, l_i, g, j, j_last,
                 offs_m, Sk, causal_off, qk_scale,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                 STAGES: gl.constexpr, MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr,
                 s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                 CID: gl.constexpr, PINGPONG: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                 PERSISTENT: gl.constexpr, REVERSE: gl.constexpr, FRESH: gl.constexpr,
                 PACK_P: gl.constexpr):
    # A pipeline's first block (ring position g, position j in its tile's stream): QK^T alone,
    # then its softmax. FRESH: the row state is fresh (m = -inf, O = 0), so O needs no
    # rescale. Returns (P as the PV operand, O, m, l).
    dtype: gl.constexpr = k_smem.dtype
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    s = g % STAGES
    qk = _issue_qk(q, k_smem, k_ready, turn, g, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, s_layout,
                   CID, PINGPONG)
    _pass_turn(turn, CID, NUM_CONSUMERS, PINGPONG)
    qk = warpgroup_mma_wait(0, deps=[qk])
    mbarrier.arrive(k_empty.index(s), count=1)
    _release_q(q_empty, qi, j, j_last, PERSISTENT)
    p, alpha, m_i, l_i, grow = _softmax_step(qk, m_i, l_i, _key0(j, j_last, BLOCK_N, REVERSE),
                                             offs_n, offs_m, Sk, causal_off, qk_scale, MASKED,
                                             IS_CAUSAL, NUM_CONSUMERS == 2,
                                             _lazy(HEAD_DIM) and not FRESH, FRESH)
    if not FRESH:
        acc = _rescale(acc, alpha, grow, o_layout)
    return _p_operand(p, dtype, p_layout, PACK_P), acc, m_i, l_i


@gluon.jit
def _last_pv(v_smem, v_ready, v_empty, acc, p_op, g_prev, p_layout: gl.constexpr,
             BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
    # A pipeline's drain: the PV of its last block.
    s_last = g_prev % STAGES
    mbarrier.wait(v_ready.index(s_last), (g_prev // STAGES) & 1)
    acc = _issue_pv(p_op, v_smem.index(s_last).reshape([BLOCK_N, HEAD_DIM]), acc, p_layout)
    acc = warpgroup_mma_wait(0, deps=[acc])
    mbarrier.arrive(v_empty.index(s_last), count=1)
    return acc


@gluon.jit
def _consume_blocks_overlap(q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn,
                            q_empty, qi, acc, m_i, l_i, j0, j1, base, j_last,
                            offs_m, Sk, causal_off, qk_scale,
                            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                            HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                            MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr,
                            s_layout: gl.constexpr, o_layout: gl.constexpr,
                            p_layout: gl.constexpr, CID: gl.constexpr, PINGPONG: gl.constexpr,
                            NUM_CONSUMERS: gl.constexpr, PERSISTENT: gl.constexpr,
                            STEP: gl.constexpr, REVERSE: gl.constexpr):
    # Software pipeline over positions j0, j0 + STEP, ... < j1 (as in _consume_blocks): PV of
    # the previous block runs while this block's softmax does. Needs j1 > j0.
    # Forward: called at a tile's start only (m = -inf, l = 0, acc = 0), so the first block
    # needs no rescale. REVERSE (a causal tile, last block first): the first block is the
    # tile's last diagonal one, masked, after any other diagonal block this consumer walked
    # serially (so it rescales); the rest are full.
    p_op, acc, m_i, l_i = _first_block(
        q, k_smem, k_ready, k_empty, turn, q_empty, qi, acc, m_i, l_i, base + j0, j0, j_last,
        offs_m, Sk, causal_off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
        MASKED or REVERSE, IS_CAUSAL, s_layout, o_layout, p_layout, CID, PINGPONG,
        NUM_CONSUMERS, PERSISTENT, REVERSE, not REVERSE, False)
    acc, p_op, m_i, l_i, g_prev = _overlap_steps(
        q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty, qi,
        acc, p_op, m_i, l_i, base + j0, j0 + STEP, j1, base, j_last, offs_m, Sk, causal_off,
        qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, MASKED, IS_CAUSAL, s_layout, o_layout,
        p_layout, CID, PINGPONG, NUM_CONSUMERS, PERSISTENT, STEP, REVERSE, False)
    acc = _last_pv(v_smem, v_ready, v_empty, acc, p_op, g_prev, p_layout, BLOCK_N, HEAD_DIM,
                   STAGES)
    return acc, m_i, l_i


@gluon.jit
def _merge_partials(acc, m_i, l_i, part_acc, part_m, part_l, part_bar,
                    NUM_CONSUMERS: gl.constexpr, row_s: gl.constexpr, o_layout: gl.constexpr):
    # KSPLIT, consumer 0: fold in the other consumers' (max, sum, unnormalised O) of the same
    # rows over their key blocks, in the exp2 domain like the online softmax.
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    for c in gl.static_range(1, NUM_CONSUMERS):
        mbarrier.wait(part_bar.index(c - 1), 0)
        m_c = part_m.index(c - 1).load(row_s)
        l_c = part_l.index(c - 1).load(row_s)
        acc_c = part_acc.index(c - 1).load(o_layout)
        m_new = gl.maximum(m_i, m_c)
        # Rows no consumer has seen a key for stay at -inf: subtract 0 so both scales are 0.
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
        a_own = gl.exp2(m_i - m_sub)
        a_c = gl.exp2(m_c - m_sub)
        l_i = l_i * a_own + l_c * a_c
        acc = (acc * gl.convert_layout(a_own, row_o)[:, None]
               + acc_c * gl.convert_layout(a_c, row_o)[:, None])
        m_i = m_new
    return acc, m_i, l_i


@gluon.jit
def _publish_partial(acc, m_i, l_i, part_acc, part_m, part_l, part_bar, CID: gl.constexpr):
    # KSPLIT, consumer CID > 0: hand this consumer's partial result to consumer 0.
    part_m.index(CID - 1).store(m_i)
    part_l.index(CID - 1).store(l_i)
    part_acc.index(CID - 1).store(acc)
    # Every thread's stores precede the single-thread arrive (release) that consumer 0's wait
    # (acquire) pairs with.
    gl.thread_barrier()
    mbarrier.arrive(part_bar.index(CID - 1), count=1)


@gluon.jit
def _store_tile(o_desc, LSE, o_view, acc, m_i, l_i, b, h, bh, m0, offs_m, Sq,
                BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, STORE_LSE: gl.constexpr,
                PERSISTENT: gl.constexpr, o_layout: gl.constexpr):
    dtype: gl.constexpr = o_view.dtype
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


@gluon.jit
def _cross_tile(t, tc, n_m, Hq, Sk, causal_off, j_last, CID: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                IS_CAUSAL: gl.constexpr, s_layout: gl.constexpr):
    # Tile t (the program's tc-th) of a cross-tile program, for this consumer: (batch, head,
    # first row, its rows, block count, first position, last position). Non-causal: every tile
    # has the j_last + 1 blocks given. Causal: the stream runs last block first (_reverse), so
    # positions [0, i0) are the blocks wholly above this consumer's rows (none for the lower
    # row block), position i0 its one diagonal block and the rest are full (cross_tile admits
    # causal_off = 0 only, where 64-row consumers have one diagonal block).
    ROWS: gl.constexpr = BLOCK_M * NUM_CONSUMERS
    SWAP: gl.constexpr = _swap_rows(IS_CAUSAL, BLOCK_M, BLOCK_N)
    SKIPS: gl.constexpr = _cross_skips(IS_CAUSAL, CID, BLOCK_M, BLOCK_N, NUM_CONSUMERS)
    b, h, m0_cta = _tile_coords(t, n_m, Hq, ROWS, IS_CAUSAL, True)
    m0 = m0_cta + _row_block(CID, tc, SWAP) * BLOCK_M
    offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    if IS_CAUSAL:
        n_blocks = gl.cdiv(_key_hi(m0_cta, Sk, causal_off, ROWS, True), BLOCK_N)
        if SKIPS:
            i0 = n_blocks - _own_blocks(m0, Sk, causal_off, BLOCK_M, BLOCK_N)
        else:
            i0 = n_blocks * 0
        j_last = n_blocks - 1
    else:
        n_blocks = j_last + 1
        i0 = 0
    return b, h, m0, offs_m, n_blocks, i0, j_last


@gluon.jit
def _cross_next(q_smem, o_desc, LSE, o_view, k_smem, v_smem, q_bar, q_empty, k_ready, k_empty,
                v_ready, v_empty, turn, acc, p_op, m_i, l_i, g_prev, it, tc, b_p, h_p, m0_p,
                offs_p, t, j_last, Hq, Sq, Sk, causal_off, qk_scale, n_m,
                CID: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                STORE_LSE: gl.constexpr, PINGPONG: gl.constexpr, IS_CAUSAL: gl.constexpr,
                s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    # Tile t of a cross-tile program after its first: the boundary (this tile's first QK^T
    # issued with the previous tile's last PV, this tile's first softmax while that PV runs,
    # then the previous tile's store), then this tile's steady steps. Returns the carried
    # state with this tile as the previous one.
    SKIPS: gl.constexpr = _cross_skips(IS_CAUSAL, CID, BLOCK_M, BLOCK_N, NUM_CONSUMERS)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    dtype: gl.constexpr = k_smem.dtype
    b, h, m0, offs_m, n_blocks, i0, j_last = _cross_tile(
        t, tc, n_m, Hq, Sk, causal_off, j_last, CID, BLOCK_M, BLOCK_N, NUM_CONSUMERS, IS_CAUSAL,
        s_layout)
    qi = CID * 2 + tc % 2
    mbarrier.wait(q_bar.index(qi), (tc // 2) & 1)
    q = q_smem.index(qi).reshape([BLOCK_M, HEAD_DIM])
    if SKIPS:
        _skip_blocks(k_ready, k_empty, v_ready, v_empty, turn, q_empty, qi, 0, i0, it, j_last,
                     STAGES, CID, PINGPONG, NUM_CONSUMERS, True, 1)
    # The boundary: this tile's first QK^T with the previous tile's last PV.
    g = it + i0
    qk, acc = _issue_qk_pv(q, k_smem, v_smem, k_ready, k_empty, v_ready, turn, acc, p_op, g,
                           g_prev, p_layout, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, s_layout, CID,
                           PINGPONG, NUM_CONSUMERS)
    _release_q(q_empty, qi, i0, j_last, True)
    m_n = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    l_n = gl.zeros([BLOCK_M], gl.float32, row_s)
    p, alpha, m_n, l_n, grow = _softmax_step(qk, m_n, l_n, _key0(i0, j_last, BLOCK_N, IS_CAUSAL),
                                             offs_n, offs_m, Sk, causal_off, qk_scale,
                                             IS_CAUSAL, IS_CAUSAL, NUM_CONSUMERS == 2, False,
                                             True)
    acc = warpgroup_mma_wait(0, deps=[acc])
    mbarrier.arrive(v_empty.index(g_prev % STAGES), count=1)
    _store_tile(o_desc, LSE, o_view, acc, m_i, l_i, b_p, h_p, b_p * Hq + h_p, m0_p, offs_p,
                Sq, BLOCK_M, HEAD_DIM, STORE_LSE, True, o_layout)
    m_i = m_n
    l_i = l_n
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    p_op = _p_operand(p, dtype, p_layout, IS_CAUSAL)
    acc, p_op, m_i, l_i, g_prev = _overlap_steps(
        q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty, qi,
        acc, p_op, m_i, l_i, g, i0 + 1, n_blocks, it, j_last, offs_m, Sk, causal_off, qk_scale,
        BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, False, IS_CAUSAL, s_layout, o_layout, p_layout, CID,
        PINGPONG, NUM_CONSUMERS, True, 1, IS_CAUSAL, IS_CAUSAL)
    return acc, p_op, m_i, l_i, g_prev, it + n_blocks, tc + 1, b, h, m0, offs_m


@gluon.jit
def _consume_tiles_cross(o_desc, LSE, q_smem, o_view, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, turn, Hq, Sq, Sk, causal_off, qk_scale,
                         n_units, n_m, CID: gl.constexpr, HEAD_DIM: gl.constexpr,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                         NUM_CONSUMERS: gl.constexpr, STORE_LSE: gl.constexpr,
                         PINGPONG: gl.constexpr, IS_CAUSAL: gl.constexpr,
                         s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    # A persistent program's tiles as one pipeline: the next tile's first QK^T is issued with
    # this tile's last PV, and its softmax runs while that PV is in flight, so no tile starts
    # with a QK^T or ends with a PV that nothing overlaps. Q is double-buffered per consumer
    # (buffer CID * 2 + tile parity): the next tile's rows are in shared memory before this
    # tile's last QK^T. O is staged in its own buffer (o_view). Non-causal: every key block is
    # full. Causal: each tile's blocks come last first (_reverse), so its first block is its
    # diagonal one (masked) and the steady steps see full blocks only, as without a mask.
    SKIPS: gl.constexpr = _cross_skips(IS_CAUSAL, CID, BLOCK_M, BLOCK_N, NUM_CONSUMERS)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    if IS_CAUSAL:
        causal_off = 0  # the host admits 0 only (config.cross_tile)
    # Non-causal: the host checked Sk % BLOCK_N == 0, Sk > 0.
    j_last = Sk // BLOCK_N - 1

    # The program's first tile (every program has one: the grid is at most the unit count).
    u = gl.program_id(0)
    t0, t1 = _unit_tiles(u, n_m, IS_CAUSAL, True)
    b_p, h_p, m0_p, offs_p, n_blocks, i0, j_last = _cross_tile(
        t0, 0, n_m, Hq, Sk, causal_off, j_last, CID, BLOCK_M, BLOCK_N, NUM_CONSUMERS, IS_CAUSAL,
        s_layout)
    qi = CID * 2
    mbarrier.wait(q_bar.index(qi), 0)
    q = q_smem.index(qi).reshape([BLOCK_M, HEAD_DIM])
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    g0 = u * 0  # ring position 0, as a run-time value (it is loop-carried)
    if SKIPS:
        _skip_blocks(k_ready, k_empty, v_ready, v_empty, turn, q_empty, qi, 0, i0, g0, j_last,
                     STAGES, CID, PINGPONG, NUM_CONSUMERS, True, 1)
    p_op, acc, m_i, l_i = _first_block(
        q, k_smem, k_ready, k_empty, turn, q_empty, qi, acc, m_i, l_i, g0 + i0, i0, j_last,
        offs_p, Sk, causal_off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, IS_CAUSAL,
        IS_CAUSAL, s_layout, o_layout, p_layout, CID, PINGPONG, NUM_CONSUMERS, True, IS_CAUSAL,
        True, IS_CAUSAL)
    acc, p_op, m_i, l_i, g_prev = _overlap_steps(
        q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty, qi,
        acc, p_op, m_i, l_i, g0 + i0, i0 + 1, n_blocks, g0, j_last, offs_p, Sk, causal_off,
        qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, False, IS_CAUSAL, s_layout, o_layout,
        p_layout, CID, PINGPONG, NUM_CONSUMERS, True, 1, IS_CAUSAL, IS_CAUSAL)
    it = n_blocks
    tc = 1
    if IS_CAUSAL:
        # A unit is one or two tiles of one head (_unit_tiles): the rest of the first unit,
        # then the program's later units.
        for u in range(gl.program_id(0), n_units, gl.num_programs(0)):
            t0, t1 = _unit_tiles(u, n_m, True, True)
            for t in range(t0 + (u == gl.program_id(0)).to(gl.int32), t1):
                acc, p_op, m_i, l_i, g_prev, it, tc, b_p, h_p, m0_p, offs_p = _cross_next(
                    q_smem, o_desc, LSE, o_view, k_smem, v_smem, q_bar, q_empty, k_ready,
                    k_empty, v_ready, v_empty, turn, acc, p_op, m_i, l_i, g_prev, it, tc, b_p,
                    h_p, m0_p, offs_p, t, j_last, Hq, Sq, Sk, causal_off, qk_scale, n_m, CID,
                    HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS, STORE_LSE, PINGPONG,
                    True, s_layout, o_layout, p_layout)
    else:
        for u in range(gl.program_id(0) + gl.num_programs(0), n_units, gl.num_programs(0)):
            acc, p_op, m_i, l_i, g_prev, it, tc, b_p, h_p, m0_p, offs_p = _cross_next(
                q_smem, o_desc, LSE, o_view, k_smem, v_smem, q_bar, q_empty, k_ready, k_empty,
                v_ready, v_empty, turn, acc, p_op, m_i, l_i, g_prev, it, tc, b_p, h_p, m0_p,
                offs_p, u, j_last, Hq, Sq, Sk, causal_off, qk_scale, n_m, CID, HEAD_DIM,
                BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS, STORE_LSE, PINGPONG, False, s_layout,
                o_layout, p_layout)
    acc = _last_pv(v_smem, v_ready, v_empty, acc, p_op, g_prev, p_layout, BLOCK_N, HEAD_DIM,
                   STAGES)
    _store_tile(o_desc, LSE, o_view, acc, m_i, l_i, b_p, h_p, b_p * Hq + h_p, m0_p, offs_p, Sq,
                BLOCK_M, HEAD_DIM, STORE_LSE, True, o_layout)
    tma.store_wait(0)


@gluon.jit
def _sk_fixup(acc, m_i, l_i, WS, CNT, slot, part, n_slots, CID: gl.constexpr,
              NUM_CONSUMERS: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
              row_s: gl.constexpr, o_layout: gl.constexpr):
    # STREAM_K: one part (0 head, 1 tail) of a tile split between two programs, for this
    # consumer's rows. Both parts publish their (unnormalised O, max, sum) in the workspace
    # slot of the split, then count themselves in; the second to arrive folds the other's in
    # and stores the tile (returns last = True). No program waits on another. Each launch
    # adds exactly two to a counter, so it is even between launches and the first arrival
    # reads an even value, the second an odd one: the counters need zeroing once, not per
    # launch (a CUDA graph replays the kernel alone).
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    TILE: gl.constexpr = BLOCK_M * HEAD_DIM
    rows_s = gl.arange(0, BLOCK_M, layout=row_s)
    o_off = (gl.arange(0, BLOCK_M, layout=row_o)[:, None] * HEAD_DIM
             + gl.arange(0, HEAD_DIM, layout=col_o)[None, :])
    # Workspace (fp32): O [n_slots, 2, C, BLOCK_M, HEAD_DIM], then max and sum
    # [n_slots, 2, C, BLOCK_M] each.
    mine = (slot * 2 + part) * NUM_CONSUMERS + CID
    other = (slot * 2 + 1 - part) * NUM_CONSUMERS + CID
    ws_m = WS + n_slots * (2 * NUM_CONSUMERS * TILE)
    ws_l = ws_m + n_slots * (2 * NUM_CONSUMERS * BLOCK_M)
    gl.store(WS + mine * TILE + o_off, acc)
    gl.store(ws_m + mine * BLOCK_M + rows_s, m_i)
    gl.store(ws_l + mine * BLOCK_M + rows_s, l_i)
    # Every thread's stores precede the one atomic (release at GPU scope); its result reaches
    # the warpgroup through shared memory behind a barrier, which orders the other threads'
    # reads after its acquire (the pattern of CUTLASS's semaphore).
    gl.thread_barrier()
    old = gl.atomic_add(CNT + slot * NUM_CONSUMERS + CID, 1, sem="acq_rel", scope="gpu")
    last = (old & 1) == 1
    if last:
        # .cg: read at L2, where the other program's stores are.
        m_c = gl.load(ws_m + other * BLOCK_M + rows_s, cache_modifier=".cg")
        l_c = gl.load(ws_l + other * BLOCK_M + rows_s, cache_modifier=".cg")
        acc_c = gl.load(WS + other * TILE + o_off, cache_modifier=".cg")
        m_new = gl.maximum(m_i, m_c)
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
        a_own = gl.exp2(m_i - m_sub)
        a_c = gl.exp2(m_c - m_sub)
        # Which part is this one's is a race, so the fold must not depend on it: both
        # products rounded alone (no FMA fuses one of them into the sum), then one add, the
        # same bits either way round.
        l_i = _mul_rn(l_i, a_own) + _mul_rn(l_c, a_c)
        acc = (_mul_rn(acc, gl.convert_layout(a_own, row_o)[:, None])
               + _mul_rn(acc_c, gl.convert_layout(a_c, row_o)[:, None]))
        m_i = m_new
    return acc, m_i, l_i, last


@gluon.jit
def _mul_rn(x, y):
    # x * y rounded to fp32 on its own: ptxas never contracts a mul.rn into an FMA.
    return gl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [x, y],
                                     dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _consume_tiles_sk(o_desc, LSE, q_smem, o_view, k_smem, v_smem, q_bar, q_empty, k_ready,
                      k_empty, v_ready, v_empty, turn, WS, CNT, Hq, Sq, Sk, qk_scale, n_units,
                      n_main, CID: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                      STORE_LSE: gl.constexpr, PINGPONG: gl.constexpr,
                      s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    # STREAM_K (config.stream_k): the tile parts of this program's span (_sk_span), each
    # through the in-warpgroup pipeline; a whole tile is stored as usual, a part of a split
    # one goes through _sk_fixup. Non-causal, whole key blocks: every block is full. O is
    # staged in Q's buffer (o_view), as on a grid of one tile a program, so Q's buffer is
    # released to the producer once the store has left it, not after the last QK^T: only the
    # last programs walk more than one part (two or three), so little overlap is lost.
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    ROWS: gl.constexpr = BLOCK_M * NUM_CONSUMERS
    n_m = gl.cdiv(Sq, ROWS)
    nb = Sk // BLOCK_N
    lo, hi = _sk_span(n_main, n_units, nb)
    n_slots = gl.num_programs(0) - n_main
    u = gl.program_id(0) - n_main
    q = q_smem.index(CID).reshape([BLOCK_M, HEAD_DIM])
    it = 0  # ring position
    tc = 0  # tile parts done
    for t in range(lo // nb, (hi - 1) // nb + 1):
        k0 = gl.maximum(lo - t * nb, 0)
        k1 = gl.minimum(hi - t * nb, nb)
        b, h, m0_cta = _tile_coords(t, n_m, Hq, ROWS, False, True)
        m0 = m0_cta + CID * BLOCK_M
        offs_m = m0 + gl.arange(0, BLOCK_M, layout=row_s)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        mbarrier.wait(q_bar.index(CID), tc & 1)
        # Block j of the tile sits at ring position it - k0 + j.
        acc, m_i, l_i = _consume_blocks_overlap(
            q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty, CID, acc,
            m_i, l_i, k0, k1, it - k0, k1 - 1, offs_m, Sk, 0, qk_scale, BLOCK_M, BLOCK_N,
            HEAD_DIM, STAGES, False, False, s_layout, o_layout, p_layout, CID, PINGPONG,
            NUM_CONSUMERS, False, 1, False)
        it += k1 - k0
        if k1 - k0 == nb:
            _store_tile(o_desc, LSE, o_view, acc, m_i, l_i, b, h, b * Hq + h, m0, offs_m, Sq,
                        BLOCK_M, HEAD_DIM, STORE_LSE, False, o_layout)
        else:
            # The head part ends this program's span: its split is the next program's slot.
            head = (k0 == 0).to(gl.int32)
            acc, m_i, l_i, last = _sk_fixup(acc, m_i, l_i, WS, CNT, u + head, 1 - head,
                                            n_slots, CID, NUM_CONSUMERS, BLOCK_M, HEAD_DIM,
                                            row_s, o_layout)
            if last:
                _store_tile(o_desc, LSE, o_view, acc, m_i, l_i, b, h, b * Hq + h, m0, offs_m,
                            Sq, BLOCK_M, HEAD_DIM, STORE_LSE, False, o_layout)
        tma.store_wait(0)
        mbarrier.arrive(q_empty.index(CID), count=1)
        tc += 1


@gluon.jit
def _consumer(o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready, k_empty,
              v_ready, v_empty, turn, part_acc, part_m, part_l, part_bar,
              Hq, Sq, Sk, causal_off, qk_scale, n_units, WS, CNT, n_main,
              CID: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
              IS_CAUSAL: gl.constexpr, STORE_LSE: gl.constexpr, OVERLAP: gl.constexpr,
              PINGPONG: gl.constexpr, PERSISTENT: gl.constexpr, KSPLIT: gl.constexpr,
              CROSS_TILE: gl.constexpr, STREAM_K: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    ROWS: gl.constexpr = _tile_rows(BLOCK_M, NUM_CONSUMERS, KSPLIT)
    # KSPLIT: this consumer takes key blocks CID, CID + C, ... of the shared tile.
    QI: gl.constexpr = 0 if KSPLIT else CID
    FIRST: gl.constexpr = CID if KSPLIT else 0
    STEP: gl.constexpr = NUM_CONSUMERS if KSPLIT else 1
    REVERSE: gl.constexpr = _reverse(IS_CAUSAL, OVERLAP, KSPLIT, NUM_CONSUMERS)
    # Whole key blocks above this consumer's rows: under a causal mask, for a consumer whose
    # rows end at least a block before the tile's (the first of two consumers with 64-key
    # blocks; the first two of three with 64, the first of three with 128). Compiled only
    # there: every instruction counts against the instruction cache. (Other consumers can
    # still meet such a block at some causal offsets; they multiply it by P = 0.)
    SKIPS: gl.constexpr = (IS_CAUSAL and not KSPLIT
                           and (NUM_CONSUMERS - 1 - CID) * BLOCK_M >= BLOCK_N)
    n_m = gl.cdiv(Sq, ROWS)
    q = q_smem.index(QI).reshape([BLOCK_M, HEAD_DIM])
    # Without a persistent grid O is staged in Q's buffer (dead after the last QK^T; under
    # KSPLIT consumer 0 writes it only after every consumer has published); with one, Q's
    # buffer already holds the next tile's rows, so O has its own.
    if PERSISTENT:
        o_view = o_smem.index(CID)
    else:
        o_view = q_smem.index(QI)
    if CROSS_TILE:
        _consume_tiles_cross(o_desc, LSE, q_smem, o_view, k_smem, v_smem, q_bar, q_empty,
                             k_ready, k_empty, v_ready, v_empty, turn, Hq, Sq, Sk, causal_off,
                             qk_scale, n_units, n_m, CID, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                             NUM_CONSUMERS, STORE_LSE, PINGPONG, IS_CAUSAL, s_layout, o_layout,
                             p_layout)
    elif STREAM_K:
        _consume_tiles_sk(o_desc, LSE, q_smem, o_view, k_smem, v_smem, q_bar, q_empty, k_ready,
                          k_empty, v_ready, v_empty, turn, WS, CNT, Hq, Sq, Sk, qk_scale,
                          n_units, n_main, CID, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                          NUM_CONSUMERS, STORE_LSE, PINGPONG, s_layout, o_layout, p_layout)
    else:
        it = 0  # K/V blocks consumed so far (ring position)
        tc = 0
        for u in range(gl.program_id(0), n_units, gl.num_programs(0)):
            t0, t1 = _unit_tiles(u, n_m, IS_CAUSAL, PERSISTENT)
            for t in range(t0, t1):
                b, h, m0_cta = _tile_coords(t, n_m, Hq, ROWS, IS_CAUSAL, PERSISTENT)
                bh = b * Hq + h
                m0 = m0_cta + QI * BLOCK_M
                offs_m = m0 + gl.arange(0, BLOCK_M, layout=row_s)

                # Blocks [0, n_full) are visible in full to every row of this warpgroup; the
                # producer streams n_blocks for the whole tile, and the consumers walk (and
                # release) all.
                hi = _key_hi(m0_cta, Sk, causal_off, ROWS, IS_CAUSAL)
                n_blocks = gl.cdiv(hi, BLOCK_N)
                if IS_CAUSAL:
                    full_hi = gl.minimum(gl.maximum(m0 + causal_off + 1, 0), Sk)
                else:
                    full_hi = Sk
                n_full = full_hi // BLOCK_N
                j_last = n_blocks - 1
                # This consumer's first masked block: the first j >= n_full with j = FIRST mod STEP.
                j_masked = n_full + (FIRST + STEP - n_full % STEP) % STEP

                m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
                l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
                acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

                mbarrier.wait(q_bar.index(QI), tc & 1)
                if SKIPS:
                    # The tile's last blocks lie wholly above this consumer's rows: release
                    # them unread instead of multiplying by P = 0.
                    n_own = _own_blocks(m0, Sk, causal_off, BLOCK_M, BLOCK_N)
                else:
                    n_own = n_blocks
                if REVERSE:
                    # Positions (block n_blocks - 1 - i at position i): the blocks above this
                    # consumer's rows, then its diagonal ones, then its full ones.
                    i_own = n_blocks - n_own
                    if SKIPS:
                        _skip_blocks(k_ready, k_empty, v_ready, v_empty, turn, q_empty, QI, 0,
                                     i_own, it, j_last, STAGES, CID, PINGPONG, NUM_CONSUMERS,
                                     PERSISTENT, STEP)
                    if n_own > 0:
                        # The diagonal blocks (one in an aligned tile, two at some offsets): all
                        # but the last walked serially, the last opens the pipeline.
                        i_first = gl.maximum(n_blocks - n_full - 1, i_own)
                        acc, m_i, l_i = _consume_blocks(
                            q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty,
                            QI, acc, m_i, l_i, i_own, i_first, it, j_last, offs_m, Sk,
                            causal_off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, True,
                            IS_CAUSAL, s_layout, o_layout, p_layout, CID, PINGPONG,
                            NUM_CONSUMERS, PERSISTENT, STEP, True)
                        acc, m_i, l_i = _consume_blocks_overlap(
                            q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty,
                            QI, acc, m_i, l_i, i_first, n_blocks, it, j_last, offs_m, Sk,
                            causal_off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, False,
                            IS_CAUSAL, s_layout, o_layout, p_layout, CID, PINGPONG,
                            NUM_CONSUMERS, PERSISTENT, STEP, True)
                else:
                    if OVERLAP:
                        if n_full > FIRST:
                            acc, m_i, l_i = _consume_blocks_overlap(
                                q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn,
                                q_empty, QI, acc, m_i, l_i, FIRST, n_full, it, j_last,
                                offs_m, Sk, causal_off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM,
                                STAGES, False, IS_CAUSAL, s_layout, o_layout, p_layout, CID,
                                PINGPONG, NUM_CONSUMERS, PERSISTENT, STEP, False)
                    else:
                        acc, m_i, l_i = _consume_blocks(
                            q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty,
                            QI, acc, m_i, l_i, FIRST, n_full, it, j_last, offs_m, Sk,
                            causal_off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, False,
                            IS_CAUSAL, s_layout, o_layout, p_layout, CID, PINGPONG,
                            NUM_CONSUMERS, PERSISTENT, STEP, False)
                    acc, m_i, l_i = _consume_blocks(
                        q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, q_empty, QI,
                        acc, m_i, l_i, j_masked, n_own, it, j_last, offs_m, Sk, causal_off,
                        qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, True, IS_CAUSAL, s_layout,
                        o_layout, p_layout, CID, PINGPONG, NUM_CONSUMERS, PERSISTENT, STEP, False)
                    if SKIPS:
                        _skip_blocks(k_ready, k_empty, v_ready, v_empty, turn, q_empty, QI,
                                     n_own, n_blocks, it, j_last, STAGES, CID, PINGPONG,
                                     NUM_CONSUMERS, PERSISTENT, STEP)
                if PERSISTENT:
                    if n_blocks == 0:  # no QK^T released Q: a causal tile that sees no key
                        mbarrier.arrive(q_empty.index(CID), count=1)
                it += n_blocks

                if KSPLIT:
                    if CID == 0:
                        acc, m_i, l_i = _merge_partials(acc, m_i, l_i, part_acc, part_m, part_l,
                                                        part_bar, NUM_CONSUMERS, row_s, o_layout)
                        _store_tile(o_desc, LSE, o_view, acc, m_i, l_i, b, h, bh, m0, offs_m, Sq,
                                    BLOCK_M, HEAD_DIM, STORE_LSE, PERSISTENT, o_layout)
                    else:
                        _publish_partial(acc, m_i, l_i, part_acc, part_m, part_l, part_bar, CID)
                else:
                    _store_tile(o_desc, LSE, o_view, acc, m_i, l_i, b, h, bh, m0, offs_m, Sq,
                                BLOCK_M, HEAD_DIM, STORE_LSE, PERSISTENT, o_layout)
                tc += 1
        tma.store_wait(0)


@gluon.jit
def _attn_fwd_hopper_kernel(q_desc, k_desc, v_desc, o_desc, LSE,
                            Hq, Sq, Sk, GROUP, causal_off, qk_scale, n_units, WS, CNT, n_main,
                            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                            BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                            NUM_CONSUMERS: gl.constexpr, IS_CAUSAL: gl.constexpr,
                            STORE_LSE: gl.constexpr, OVERLAP: gl.constexpr,
                            PINGPONG: gl.constexpr, PERSISTENT: gl.constexpr,
                            KSPLIT: gl.constexpr, CROSS_TILE: gl.constexpr,
                            STREAM_K: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    # Program p runs work units p, p + P, p + 2P, ... (a unit: one (row block, batch x head)
    # tile, or two for a persistent causal grid; _unit_tiles): one each without a persistent
    # grid (P = n_units), else P = the SM count.
    gl.static_assert(NUM_CONSUMERS == 2 or NUM_CONSUMERS == 3, "2 or 3 consumer warpgroups")
    # 64 rows a consumer: the lazy rescale's asm (_warp_any, _rescale) assumes 2 rows a thread.
    gl.static_assert(BLOCK_M == 64, "64-row consumer warpgroups")
    gl.static_assert(not (KSPLIT and PERSISTENT), "KSPLIT runs one tile a program")
    # KSPLIT: a consumer waits on every C-th block only, so the previous fill of the ring slot
    # it waits on must be one of its own blocks (config.is_valid explains).
    gl.static_assert(not KSPLIT or STAGES % NUM_CONSUMERS == 0,
                     "KSPLIT needs STAGES a multiple of the consumer count")
    gl.static_assert(not CROSS_TILE or (PERSISTENT and OVERLAP and not KSPLIT
                                        and NUM_CONSUMERS == 2),
                     "CROSS_TILE pipelines a persistent two-consumer program's tiles")
    gl.static_assert(not STREAM_K or (OVERLAP and not PERSISTENT and not KSPLIT
                                      and not IS_CAUSAL),
                     "STREAM_K splits non-causal tiles with the in-warpgroup pipeline")
    dtype: gl.constexpr = q_desc.dtype
    Q_TILES: gl.constexpr = (1 if KSPLIT else NUM_CONSUMERS) * (2 if CROSS_TILE else 1)
    q_smem = gl.allocate_shared_memory(dtype, [Q_TILES, 1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
    if PERSISTENT:
        o_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, 1, 1, BLOCK_M, HEAD_DIM],
                                           o_desc.layout)
    else:
        o_smem = q_smem
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [Q_TILES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_TILES, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    if KSPLIT:
        # Partial results of consumers 1.. for consumer 0 to merge (fp32 O, row max and sum).
        # (A layout of rank r describes buffers of rank r or r + 1: one slice per consumer.)
        # O is swizzled (16-byte column chunk index XOR row mod 8): one warp access of the
        # wgmma accumulator covers 8 consecutive rows x 4 column pairs, which row-major rows
        # (a multiple of 128 bytes) put on the same 8 banks (8 wavefronts an access; 2 with the
        # swizzle, the minimum for 256 bytes). H200: -0.24 to -0.49 us at 64 tiles.
        part_o: gl.constexpr = gl.SwizzledSharedLayout(4, 1, 8, [1, 0])
        flat1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        part_acc = gl.allocate_shared_memory(gl.float32, [NUM_CONSUMERS - 1, BLOCK_M, HEAD_DIM],
                                             part_o)
        part_m = gl.allocate_shared_memory(gl.float32, [NUM_CONSUMERS - 1, BLOCK_M], flat1)
        part_l = gl.allocate_shared_memory(gl.float32, [NUM_CONSUMERS - 1, BLOCK_M], flat1)
        part_bar = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS - 1, 1],
                                             mbarrier.MBarrierLayout())
        for c in gl.static_range(NUM_CONSUMERS - 1):
            mbarrier.init(part_bar.index(c), count=1)
        # Each K/V block has one consumer.
        KV_READERS: gl.constexpr = 1
    else:
        part_acc = q_smem  # placeholders: never touched without KSPLIT
        part_m = q_smem
        part_l = q_smem
        part_bar = q_bar
        KV_READERS: gl.constexpr = NUM_CONSUMERS
    for c in gl.static_range(Q_TILES):
        mbarrier.init(q_bar.index(c), count=1)
        mbarrier.init(q_empty.index(c), count=1)
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(turn.index(c), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=KV_READERS)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(v_empty.index(s), count=KV_READERS)
    fence_async_shared()

    # The default partition (this kernel's 4 warps) is the producer; setmaxnreg gives the
    # consumers CONSUMER_REGS each and leaves the producer the rest of the register file.
    if NUM_CONSUMERS == 2:
        gl.warp_specialize([
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, Hq, Sq, Sk, GROUP, causal_off, n_units,
                         BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS, IS_CAUSAL, PERSISTENT, KSPLIT,
                         CROSS_TILE, _reverse(IS_CAUSAL, OVERLAP, KSPLIT, NUM_CONSUMERS), n_main,
                         STREAM_K)),
            (_consumer, (o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, turn, part_acc, part_m, part_l, part_bar,
                         Hq, Sq, Sk, causal_off, qk_scale, n_units, WS, CNT, n_main,
                         0, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS,
                         IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG, PERSISTENT, KSPLIT,
                         CROSS_TILE, STREAM_K)),
            (_consumer, (o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, turn, part_acc, part_m, part_l, part_bar,
                         Hq, Sq, Sk, causal_off, qk_scale, n_units, WS, CNT, n_main,
                         1, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS,
                         IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG, PERSISTENT, KSPLIT,
                         CROSS_TILE, STREAM_K)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
    else:
        gl.warp_specialize([
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, Hq, Sq, Sk, GROUP, causal_off, n_units,
                         BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS, IS_CAUSAL, PERSISTENT, KSPLIT,
                         CROSS_TILE, _reverse(IS_CAUSAL, OVERLAP, KSPLIT, NUM_CONSUMERS), n_main,
                         STREAM_K)),
            (_consumer, (o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, turn, part_acc, part_m, part_l, part_bar,
                         Hq, Sq, Sk, causal_off, qk_scale, n_units, WS, CNT, n_main,
                         0, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS,
                         IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG, PERSISTENT, KSPLIT,
                         CROSS_TILE, STREAM_K)),
            (_consumer, (o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, turn, part_acc, part_m, part_l, part_bar,
                         Hq, Sq, Sk, causal_off, qk_scale, n_units, WS, CNT, n_main,
                         1, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS,
                         IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG, PERSISTENT, KSPLIT,
                         CROSS_TILE, STREAM_K)),
            (_consumer, (o_desc, LSE, q_smem, o_smem, k_smem, v_smem, q_bar, q_empty, k_ready,
                         k_empty, v_ready, v_empty, turn, part_acc, part_m, part_l, part_bar,
                         Hq, Sq, Sk, causal_off, qk_scale, n_units, WS, CNT, n_main,
                         2, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS,
                         IS_CAUSAL, STORE_LSE, OVERLAP, PINGPONG, PERSISTENT, KSPLIT,
                         CROSS_TILE, STREAM_K)),
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
    if hopper_head_dim(head_dim) is None:
        return (f"head dim {head_dim} (supported: 64, 128, 256 and the multiples of 8 from 40 "
                "that run padded to them)")
    if not strides_ok:
        return "strides TMA cannot take (unit last stride, 16-byte multiples elsewhere)"
    return None


def _layout(rows: int, head_dim: int, dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], dtype)


def _constexprs(cfg: TritonFwdConfig, head_dim: int, is_causal: bool, store_lse: bool,
                cross: bool, sk: bool = False) -> dict:
    return dict(
        HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages,
        NUM_CONSUMERS=cfg.num_warps // 4, IS_CAUSAL=bool(is_causal), STORE_LSE=bool(store_lse),
        OVERLAP=bool(cfg.overlap), PINGPONG=bool(cfg.pingpong),
        PERSISTENT=bool(cfg.persistent), KSPLIT=bool(cfg.ksplit), CROSS_TILE=bool(cross),
        STREAM_K=bool(sk), CONSUMER_REGS=consumer_regs(cfg.num_warps),
    )


def _compile(cfg: TritonFwdConfig, dtype: str, head_dim: int, is_causal: bool, store_lse: bool,
             cross: bool, sk: bool = False, target=None):
    # A padded head dim compiles the kernel of the dim it runs at (hopper_head_dim).
    head_dim = hopper_head_dim(head_dim) or head_dim
    dt = _GL_DTYPE_NAME[dtype]

    def desc(rows: int) -> str:
        return f"tensordesc<{dtype}[1, 1, {rows}, {head_dim}],{_layout(rows, head_dim, dt)!r}>"

    sig = {"q_desc": desc(cfg.block_m), "k_desc": desc(cfg.block_n), "v_desc": desc(cfg.block_n),
           "o_desc": desc(cfg.block_m), "LSE": "*fp32", "Hq": "i32", "Sq": "i32", "Sk": "i32",
           "GROUP": "i32", "causal_off": "i32", "qk_scale": "fp32", "n_units": "i32",
           "WS": "*fp32", "CNT": "*i32", "n_main": "i32"}
    cx = _constexprs(cfg, head_dim, is_causal, store_lse, cross, sk)
    sig.update({k: "constexpr" for k in cx})
    src = GluonASTSource(_attn_fwd_hopper_kernel, sig, cx)
    return triton.compile(src, target=target, options={"num_warps": 4})


def compile_hopper(spec, target=None):
    """Compile one variant ahead of time from a ``fwd.KernelSpec`` whose config has hopper=1
    (the resource gate passes a ``GPUTarget`` to compile without a GPU)."""
    return _compile(spec.config, spec.dtype, spec.head_dim, spec.is_causal, spec.store_lse,
                    spec.cross_tile, spec.stream_k, target)


# Compiled kernels per (config, dtype, head dim, causal, lse, cross-tile, stream-K, device):
# shared by every plan.
_COMPILED: dict[tuple, object] = {}
_NUM_SMS: dict[int, int] = {}
# Stream-K workspaces by (device, stream), shared by every plan: (fp32 partials, int32
# counters, made during a graph capture). Launches on one stream run in order, and each leaves
# every counter even (_sk_fixup), so the counters are zeroed once, when made, never per launch
# (a CUDA graph replays the kernel alone); launches on different streams may overlap, so each
# stream has its own. One buffer holds both, sized for any stream-K plan on the device, and is
# never freed: a captured graph keeps its pointers (_RETIRED keeps replaced ones alive).
_WORKSPACES: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, bool]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
# The largest consumers x (head dim + 2) fp32 values a workspace row holds: two consumers at
# D = 128 (config.stream_k).
_SK_ROW = 2 * (128 + 2)
_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16"}
# TMA descriptors kept per plan, keyed by (argument, pointer, strides); cleared when full.
_MAX_CACHED_MAPS = 64


def _num_sms(dev_index: int) -> int:
    n = _NUM_SMS.get(dev_index)
    if n is None:
        n = _NUM_SMS[dev_index] = torch.cuda.get_device_properties(dev_index).multi_processor_count
    return n


# The current device's index without torch.cuda.current_device()'s lazy-init check (a
# launch has CUDA tensors, so CUDA is initialised).
_get_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


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

    A padded head dim (D = 80: hopper_head_dim) runs the kernel of the dim it pads to (128):
    the descriptors' boxes are that wide, their shapes keep the tensors' own D, so loads
    zero-fill the columns past D and the store drops them.

    The launch skips Triton's JIT: the kernel is compiled once per variant, its four TMA
    descriptors are encoded once per (pointer, strides) and cached (``maps``), so is the whole
    argument list after the launch metadata (``tails``, by the five pointers from
    ``TritonFwdPlan``, by pointers and strides from :meth:`__call__`), and the C launcher is
    called directly (as ``fwd.TritonFwdPlan`` does for the ``tl.dot`` kernel). Both caches
    assume the problem shape the plan was made for."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, *, scale: float, is_causal: bool,
                 causal_off: int, return_lse: bool, config: TritonFwdConfig) -> None:
        b, hq, sq, _ = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        # The kernel's head dim: the tensors' own, or the one a padded dim runs at.
        d = self.head_dim = hopper_head_dim(q.shape[-1]) or q.shape[-1]
        self.config = config
        self.dev_index = q.device.index if q.device.index is not None else 0
        self.dt = _GL_DTYPE[q.dtype]
        self.layout_m = _layout(config.block_m, d, self.dt)
        self.layout_n = _layout(config.block_n, d, self.dt)
        # Work units (_unit_tiles): row-block tiles, paired per head for a persistent causal
        # grid; a persistent grid runs one program per SM (fewer when there are fewer tiles).
        num_sms = _num_sms(self.dev_index)
        self.n_units, grid = hopper_grid(config, b, hq, sq, is_causal, num_sms)
        self.ints = (hq, sq, sk, hq // hkv, causal_off)
        self.qk_scale = scale * _LOG2E
        self.cross_tile = cross_tile(config, d, is_causal, sk, q.element_size(), causal_off)
        self.stream_k = stream_k(config, d, is_causal, sk, self.n_units, num_sms)
        # Stream-K: n_main programs of one tile each, then num_sms that share the rest out;
        # their split tiles meet in a workspace (fp32 O, max and sum of both parts of a split
        # per slot and consumer) and a counter per slot and consumer (_sk_fixup).
        self.n_main = stream_k_grid(self.n_units, num_sms) if self.stream_k else 0
        if self.stream_k:
            grid = self.n_main + num_sms
            c = config.num_warps // 4
            assert c * (d + 2) <= _SK_ROW, "config.stream_k admits no such config"
            self.num_sms = num_sms
        self.grid = (grid,)
        self.constexprs = _constexprs(config, d, is_causal, return_lse, self.cross_tile,
                                      self.stream_k)
        # The C launcher takes every parameter in order and skips the constexpr ones.
        self.placeholders = (None,) * len(self.constexprs)
        self.key = (config, _DTYPE_NAME[q.dtype], d, bool(is_causal), bool(return_lse),
                    self.cross_tile, self.stream_k, self.dev_index)
        self.kernel = None
        self.launch = None
        self.maps: dict[tuple, list] = {}  # one tensor's encoded descriptor, by pointer/strides
        self.tails: dict[tuple, tuple] = {}  # the launch arguments after the metadata

    def _desc(self, t: torch.Tensor, rows: int, layout) -> TensorDescriptor:
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, self.head_dim],
                                layout)

    def _prepare(self) -> None:
        kernel = _COMPILED.get(self.key)
        if kernel is None:
            cfg, dtype, d, causal, lse, cross, sk, _ = self.key
            with torch.cuda.device(self.dev_index):
                kernel = _compile(cfg, dtype, d, causal, lse, cross, sk)
                kernel._init_handles()
            _COMPILED[self.key] = kernel
        self.kernel = kernel
        self.launch = _raw_launcher(kernel)
        self.scratch = kernel.metadata.global_scratch_size * self.grid[0]
        self.fill = triton.runtime.driver.active.utils.fill_tma_descriptor
        # The C launcher's arguments in its order: grid, stream, these three, the global
        # scratch buffer, these five, then every kernel parameter (the tail).
        run = kernel.run
        self.head = (kernel.function, run.launch_cooperative_grid, run.launch_pdl)
        self.mid = (None, kernel.packed_metadata, None, None, None)
        # Constexpr parameters are skipped by the launcher but still take a slot.
        self.post = (*self.ints, self.qk_scale, self.n_units)

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
        """Launch on q, k, v [B, H, S, D] into out [B, Hq, Sq, D] and lse [B, Hq, Sq] (fp32;
        written only with return_lse), shaped as this plan's problem, any strides TMA
        accepts."""
        self.run(q, k, v, out, lse, (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                     lse.data_ptr(), q.stride(), k.stride(), v.stride(),
                                     out.stride()))

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, key: tuple) -> None:
        """:meth:`__call__` with the launch-argument cache key given: ``TritonFwdPlan`` passes
        the five pointers alone, for tensors strided as this plan was made for (its own
        contract; it has the pointers at hand for the alignment test)."""
        if _get_device() != self.dev_index:
            # The launch goes to the current CUDA context: make it q's device.
            with torch.cuda.device(self.dev_index):
                return self.run(q, k, v, out, lse, key)
        if self.kernel is None:
            self._prepare()
        if self.launch is None or _raw_stream is None:
            return self._jit_call(q, k, v, out, lse)
        stream = _raw_stream(self.dev_index)
        if self.stream_k:
            ws, cnt = self._workspace(stream, lse)
            key = (key, ws.data_ptr())  # the stream's workspace (one buffer with its counters)
        else:
            ws = cnt = lse  # never touched: lse stands in
        tail = self.tails.get(key)
        if tail is None:
            if len(self.tails) >= _MAX_CACHED_MAPS:
                self.tails.clear()
            tail = self.tails[key] = (*self._map(0, q), *self._map(1, k), *self._map(2, v),
                                      *self._map(3, out), lse.data_ptr(), *self.post,
                                      ws.data_ptr(), cnt.data_ptr(), self.n_main,
                                      *self.placeholders)
        buf = (torch.empty(self.scratch, dtype=torch.uint8, device=q.device)
               if self.scratch else None)
        self.launch(self.grid[0], 1, 1, stream, *self.head, buf, *self.mid, *tail)

    def _workspace(self, stream: int, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The stream-K workspace and counters of launches on this stream (_WORKSPACES): per
        # program of the last waves and consumer, two parts of 64 rows (O, max, sum), and a
        # counter.
        key = (self.dev_index, stream)
        capturing = torch.cuda.is_current_stream_capturing()
        w = _WORKSPACES.get(key)
        # One made during a capture was zeroed by a memset the graph holds, which only its
        # replays run: an eager launch needs one zeroed now.
        if w is None or (w[2] and not capturing):
            if w is not None:
                _RETIRED.append(w)
            n_ws = self.num_sms * 2 * 64 * _SK_ROW
            n_cnt = self.num_sms * 2
            buf = torch.empty(n_ws + n_cnt, dtype=torch.float32, device=lse.device)
            cnt = buf[n_ws:].view(torch.int32)
            cnt.zero_()
            w = _WORKSPACES[key] = (buf[:n_ws], cnt, capturing)
        return w[0], w[1]

    def _jit_call(self, q, k, v, out, lse) -> None:
        bm, bn = self.config.block_m, self.config.block_n
        ws, cnt = (self._workspace(torch.cuda.current_stream(q.device).cuda_stream, lse)
                   if self.stream_k else (lse, lse))
        _attn_fwd_hopper_kernel[self.grid](
            self._desc(q, bm, self.layout_m), self._desc(k, bn, self.layout_n),
            self._desc(v, bn, self.layout_n), self._desc(out, bm, self.layout_m),
            lse, *self.ints, self.qk_scale, self.n_units, ws, cnt, self.n_main,
            **self.constexprs, num_warps=4,
        )


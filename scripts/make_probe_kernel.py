"""Write scripts/_probe_fwd_hopper.py: the Gluon kernel with clock / globaltimer probes.

The copy is ``flashcore/backends/triton/fwd_hopper.py`` with probes on the KSPLIT (64-tile,
mission) path: each probe stores (``%clock``, ``%globaltimer_lo``) per row into the LSE pointer,
which ``scripts/probe_mission.py`` points at a probe buffer. The shipped kernel is untouched; the
copy is regenerated from it on every run, and a kernel edit that moves a patched line makes
:func:`make` fail (every patch must apply exactly as often as expected) rather than probe the
wrong place.

The probes are not free (each reduces a tensor to one value per row and stores it), and the
replays are short enough that the card may not reach its top clock (the H200 run: 9.1 us a
mission call at 1.46 GHz, against 6.8 us unprobed at 1.98): read the timeline in cycles, for
where time goes, not for absolute durations.
"""

# ruff: noqa: E501  (the patch sites are quoted verbatim from fwd_hopper.py, indentation and all)
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "flashcore", "backends", "triton", "fwd_hopper.py")
OUT = os.path.join(HERE, "_probe_fwd_hopper.py")
PATCHES: list[tuple] = []  # (old, new) or (old, new, occurrences)
NS = 16  # probe slots per role (consumer 0, consumer 1, producer)

probe = '''

PROBE_SLOTS = gl.constexpr(NSLOTS)


@gluon.jit
def _probe(P, slot, dep, ROLE: gl.constexpr, N: gl.constexpr, layout: gl.constexpr):
    # (clock, globaltimer_lo) of this point, per row of dep, at P[prog, ROLE, slot, 0|1, :N].
    c = gl.inline_asm_elementwise("mov.u32 $0, %clock;", "=r,r", [dep], dtype=gl.int32,
                                  is_pure=False, pack=1)
    t = gl.inline_asm_elementwise("mov.u32 $0, %globaltimer_lo;", "=r,r", [dep],
                                  dtype=gl.int32, is_pure=False, pack=1)
    offs = gl.arange(0, N, layout=layout)
    base = ((gl.program_id(0) * 3 + ROLE) * PROBE_SLOTS + slot) * 2 * 128
    gl.store(P + base + offs, c.to(gl.float32, bitcast=True))
    gl.store(P + base + 128 + offs, t.to(gl.float32, bitcast=True))
'''.replace("NSLOTS", str(NS))
PATCHES.append(('\n\n@gluon.jit\ndef _release_q(', probe + '\n\n@gluon.jit\ndef _release_q('))

# _consume_blocks: optional probe pointer; probe after each QK wait and PV wait.
PATCHES.append(('''                    NUM_CONSUMERS: gl.constexpr, PERSISTENT: gl.constexpr, STEP: gl.constexpr,
                    REVERSE: gl.constexpr):
    # Key blocks j0, j0 + STEP''', '''                    NUM_CONSUMERS: gl.constexpr, PERSISTENT: gl.constexpr, STEP: gl.constexpr,
                    REVERSE: gl.constexpr, P=None, PROBE: gl.constexpr = False):
    # Key blocks j0, j0 + STEP'''))
PATCHES.append(('''        qk = warpgroup_mma_wait(0, deps=[qk])
        mbarrier.arrive(k_empty.index(s), count=1)
        _release_q(q_empty, qi, j, j_last, PERSISTENT)
        p, alpha, m_i, l_i, grow = _softmax_step(qk, m_i, l_i,''', '''        qk = warpgroup_mma_wait(0, deps=[qk])
        if PROBE:
            _probe(P, 2 + 3 * gl.minimum(j // STEP, 2), gl.max(qk, 1), CID, BLOCK_M,
                   gl.SliceLayout(1, s_layout))
        mbarrier.arrive(k_empty.index(s), count=1)
        _release_q(q_empty, qi, j, j_last, PERSISTENT)
        p, alpha, m_i, l_i, grow = _softmax_step(qk, m_i, l_i,'''))
PATCHES.append(('''        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_ready.index(s), ph)
        acc = warpgroup_mma(p_op, v_smem.index(s).reshape([BLOCK_N, HEAD_DIM]), acc,
                            is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(v_empty.index(s), count=1)
    return acc, m_i, l_i''', '''        p_op = gl.convert_layout(p.to(dtype), p_layout)
        if PROBE:
            _probe(P, 3 + 3 * gl.minimum(j // STEP, 2), l_i, CID, BLOCK_M,
                   gl.SliceLayout(1, s_layout))
        mbarrier.wait(v_ready.index(s), ph)
        acc = warpgroup_mma(p_op, v_smem.index(s).reshape([BLOCK_N, HEAD_DIM]), acc,
                            is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
        if PROBE:
            _probe(P, 4 + 3 * gl.minimum(j // STEP, 2), gl.max(acc, 1), CID, BLOCK_M,
                   gl.SliceLayout(1, o_layout))
        mbarrier.arrive(v_empty.index(s), count=1)
    return acc, m_i, l_i'''))

# consumer: entry, after q wait, ksplit calls with probes, merge/store.
PATCHES.append(('''                mbarrier.wait(q_bar.index(QI), tc & 1)
                if SKIPS:''', '''                if KSPLIT:
                    _probe(LSE, 0, m_i, CID, BLOCK_M, row_s)
                mbarrier.wait(q_bar.index(QI), tc & 1)
                if KSPLIT:
                    _probe(LSE, 1, m_i, CID, BLOCK_M, row_s)
                if SKIPS:'''))
# the non-overlap forward calls (full and masked) in the consumer: add probes for KSPLIT
PATCHES.append(('''                            IS_CAUSAL, s_layout, o_layout, p_layout, CID, PINGPONG,
                            NUM_CONSUMERS, PERSISTENT, STEP, False)
                    acc, m_i, l_i = _consume_blocks(''', '''                            IS_CAUSAL, s_layout, o_layout, p_layout, CID, PINGPONG,
                            NUM_CONSUMERS, PERSISTENT, STEP, False, LSE, KSPLIT)
                    acc, m_i, l_i = _consume_blocks('''))
PATCHES.append(('''                        o_layout, p_layout, CID, PINGPONG, NUM_CONSUMERS, PERSISTENT, STEP, False)
                    if SKIPS:''', '''                        o_layout, p_layout, CID, PINGPONG, NUM_CONSUMERS, PERSISTENT, STEP, False,
                        LSE, KSPLIT)
                    if SKIPS:'''))
PATCHES.append(('''                if KSPLIT:
                    if CID == 0:
                        acc, m_i, l_i = _merge_partials(acc, m_i, l_i, part_acc, part_m, part_l,
                                                        part_bar, NUM_CONSUMERS, row_s, o_layout)
                        _store_tile(o_desc, LSE, o_view, acc, m_i, l_i, b, h, bh, m0, offs_m, Sq,
                                    BLOCK_M, HEAD_DIM, STORE_LSE, PERSISTENT, o_layout)
                    else:
                        _publish_partial(acc, m_i, l_i, part_acc, part_m, part_l, part_bar, CID)''',
'''                if KSPLIT:
                    _probe(LSE, 14, l_i, CID, BLOCK_M, row_s)
                    if CID == 0:
                        acc, m_i, l_i = _merge_partials(acc, m_i, l_i, part_acc, part_m, part_l,
                                                        part_bar, NUM_CONSUMERS, row_s, o_layout)
                        _probe(LSE, 15, gl.max(acc, 1), CID, BLOCK_M,
                               gl.SliceLayout(1, o_layout))
                        _store_tile(o_desc, LSE, o_view, acc, m_i, l_i, b, h, bh, m0, offs_m, Sq,
                                    BLOCK_M, HEAD_DIM, STORE_LSE, PERSISTENT, o_layout)
                        _probe(LSE, 13, l_i, CID, BLOCK_M, row_s)
                        tma.store_wait(0)
                        _probe(LSE, 12, l_i, CID, BLOCK_M, row_s)
                    else:
                        _publish_partial(acc, m_i, l_i, part_acc, part_m, part_l, part_bar, CID)
                        _probe(LSE, 15, l_i, CID, BLOCK_M, row_s)'''))
# producer: entry and after the last issue (role 2)
PATCHES.append(('''    n_m = gl.cdiv(Sq, ROWS)
    it = 0  # K/V blocks issued so far: the ring position runs on across tiles
    tc = 0  # tiles done by this program''', '''    n_m = gl.cdiv(Sq, ROWS)
    it = 0  # K/V blocks issued so far: the ring position runs on across tiles
    tc = 0  # tiles done by this program
    PL: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    if KSPLIT:
        _probe(LSE, 0, gl.arange(0, 128, layout=PL), 2, 128, PL)'''))
PATCHES.append(('''                it += 1
            tc += 1
''', '''                if KSPLIT:
                    if j == 0:
                        _probe(LSE, 1, gl.arange(0, 128, layout=PL), 2, 128, PL)
                it += 1
            tc += 1
    if KSPLIT:
        _probe(LSE, 2, gl.arange(0, 128, layout=PL), 2, 128, PL)
'''))
# the producer needs LSE
PATCHES.append(('''def _producer(q_desc, k_desc, v_desc, q_smem,''', '''def _producer(LSE, q_desc, k_desc, v_desc, q_smem,'''))
PATCHES.append(('''            (_producer, (q_desc, k_desc''', '''            (_producer, (LSE, q_desc, k_desc''', 2))
PATCHES.append(('from .config import', 'from flashcore.backends.triton.config import'))
PATCHES.append(('from .fwd import', 'from flashcore.backends.triton.fwd import'))


def make(out: str = OUT) -> str:
    """Write the probed copy to ``out`` and return its path.

    Slots per role: 0 entry, 1 Q landed, 2 + 3i / 3 + 3i / 4 + 3i block i's QK^T, softmax and PV
    done (i = the consumer's i-th block, j // STEP; blocks past the third share slots 8-10),
    12-15 the tile's end (see ``probe_mission.NAMES``). Only the KSPLIT consumers' forward
    (non-overlap) path is probed, so an overlap key-split config (``...ok``) gets entry, Q and
    end points but no block points."""
    with open(SRC) as f:
        src = f.read()
    for old, new, *n in PATCHES:
        want = n[0] if n else 1
        found = src.count(old)
        if found != want:
            raise RuntimeError(f"patch site moved ({found} of {want}): {old[:60]!r}")
        src = src.replace(old, new)
    with open(out, "w") as f:
        # Generated, git-ignored, and quoted from a linted file: not linted again.
        f.write("# ruff: noqa  (generated by scripts/make_probe_kernel.py)\n" + src)
    return out


if __name__ == "__main__":
    print(make())

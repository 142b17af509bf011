"""Device script: the mission shape's latency ladder and a key split *across programs*.

Usage (GPU):  PYTHONPATH=. python scripts/mission_split.py [--rounds 3] [--json OUT]
Usage (CPU):  TRITON_INTERPRET=1 PYTHONPATH=. python scripts/mission_split.py --check-only

What it times, fp16 B1 H8 S512 D64 (both masks), by the bench's graph timer (cold L2):
- the floor ladder: an empty kernel at 64, 128 and 256 programs, a copy of one 64x64 tile per
  program (Q -> O, 64 programs);
- SDPA and ``flashcore.attention`` (the shipped dispatch);
- ``split``: a plain-Triton prototype of the key split across programs. Grid (row blocks,
  B*H, SPLITS); each program runs the online softmax over its share of the key blocks, writes
  its (unnormalised O, max, sum) partial to a workspace, and bumps the tile's counter (a
  release/acquire atomic after a CTA barrier, the CUTLASS semaphore pattern); the program that
  arrives last merges the SPLITS partials, writes O and resets the counter for the next call.
  ``SPLITS=1`` is the same kernel with no workspace; ``-nc`` skips the barrier, the counter, the
  merge and the O write (wrong output, timed only to price them together).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

import torch
import triton
import triton.language as tl

from flashcore.backends.triton.fwd import _LOG2E
from flashcore.reference import attention_reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _noop(X):
    tl.store(X + tl.program_id(0), 1.0)


@triton.jit
def _copy_tile(Q, Out, D: tl.constexpr, BLOCK_M: tl.constexpr):
    offs = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] * D \
        + tl.arange(0, D)[None, :]
    tl.store(Out + offs, tl.load(Q + offs))


@triton.jit
def _split_kernel(Q, K, V, Out, PA, PML, CNT, Sq, Sk, qk_scale,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SPLITS: tl.constexpr, IS_CAUSAL: tl.constexpr, COMBINE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    sp = tl.program_id(2)
    n_m = tl.num_programs(0)
    tile = bh * n_m + pid_m
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Sq
    q = tl.load(Q + bh.to(tl.int64) * Sq * D + offs_m[:, None] * D + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if IS_CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, Sk)
    else:
        hi = Sk
    n_blk = tl.cdiv(hi, BLOCK_N)
    per = tl.cdiv(n_blk, SPLITS)
    j0 = sp * per
    j1 = tl.minimum(j0 + per, n_blk)
    k_base = K + bh.to(tl.int64) * Sk * D
    v_base = V + bh.to(tl.int64) * Sk * D
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for j in range(j0, j1):
        keys = j * BLOCK_N + offs_n
        key_ok = keys < Sk
        k = tl.load(k_base + keys[None, :] * D + offs_d[:, None], mask=key_ok[None, :], other=0.0)
        v = tl.load(v_base + keys[:, None] * D + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        qk = tl.dot(q, k)
        ok = key_ok[None, :]
        if IS_CAUSAL:
            ok = ok & (keys[None, :] <= offs_m[:, None])
        s = tl.where(ok, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    o_ptrs = Out + bh.to(tl.int64) * Sq * D + offs_m[:, None] * D + offs_d[None, :]
    if SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    elif COMBINE < 2:
        r = tl.arange(0, BLOCK_M)
        part = tile * SPLITS + sp
        tl.store(PA + part * BLOCK_M * D + r[:, None] * D + offs_d[None, :], acc)
        tl.store(PML + part * 2 * BLOCK_M + r, m_i)
        tl.store(PML + part * 2 * BLOCK_M + BLOCK_M + r, l_i)
        if COMBINE == 1:
            # Every thread's partial stores happen before thread 0's release (CTA barrier,
            # then a gpu-scope acq_rel atomic); the last arrival's acquire orders its reads.
            tl.debug_barrier()
            arrived = tl.atomic_add(CNT + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLITS - 1:
                m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
                for s in tl.static_range(SPLITS):
                    m_s = tl.load(PML + (tile * SPLITS + s) * 2 * BLOCK_M + r, cache_modifier=".cg")
                    m_all = tl.maximum(m_all, m_s)
                m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
                l_all = tl.zeros([BLOCK_M], tl.float32)
                o_all = tl.zeros([BLOCK_M, D], tl.float32)
                for s in tl.static_range(SPLITS):
                    base = (tile * SPLITS + s) * 2 * BLOCK_M
                    w = tl.math.exp2(tl.load(PML + base + r, cache_modifier=".cg") - m_ref)
                    l_all += w * tl.load(PML + base + BLOCK_M + r, cache_modifier=".cg")
                    a = tl.load(PA + (tile * SPLITS + s) * BLOCK_M * D + r[:, None] * D
                                + offs_d[None, :], cache_modifier=".cg")
                    o_all += w[:, None] * a
                out = o_all / tl.where(l_all == 0.0, 1.0, l_all)[:, None]
                tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
                tl.store(CNT + tile, 0)
    if SPLITS > 1 and COMBINE == 2:
        # Waiter: the last split (highest grid z, dispatched after the ones it waits for)
        # keeps its partial in registers and polls the counter the others bump (release),
        # then merges all partials online, loads independent of the running max.
        r = tl.arange(0, BLOCK_M)
        if sp < SPLITS - 1:
            part = tile * SPLITS + sp
            tl.store(PA + part * BLOCK_M * D + r[:, None] * D + offs_d[None, :], acc)
            tl.store(PML + part * 2 * BLOCK_M + r, m_i)
            tl.store(PML + part * 2 * BLOCK_M + BLOCK_M + r, l_i)
            tl.debug_barrier()
            tl.atomic_add(CNT + tile, 1, sem="release", scope="gpu")
        else:
            seen = tl.atomic_add(CNT + tile, 0, sem="acquire", scope="gpu")
            while seen < SPLITS - 1:
                seen = tl.atomic_add(CNT + tile, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()
            for s in tl.static_range(SPLITS - 1):
                base = (tile * SPLITS + s) * 2 * BLOCK_M
                m_s = tl.load(PML + base + r, cache_modifier=".cg")
                l_s = tl.load(PML + base + BLOCK_M + r, cache_modifier=".cg")
                a = tl.load(PA + (tile * SPLITS + s) * BLOCK_M * D + r[:, None] * D
                            + offs_d[None, :], cache_modifier=".cg")
                m_new = tl.maximum(m_i, m_s)
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                w_old = tl.math.exp2(m_i - m_ref)
                w_s = tl.math.exp2(m_s - m_ref)
                l_i = l_i * w_old + l_s * w_s
                acc = acc * w_old[:, None] + a * w_s[:, None]
                m_i = m_new
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
            tl.store(CNT + tile, 0)


class Split:
    """One split config: workspace allocated once (the counters reset themselves)."""

    def __init__(self, b, h, s, d, splits, block_n, warps, stages, combine=1,
                 block_m=64, device="cuda"):
        self.splits, self.block_n, self.warps, self.stages = splits, block_n, warps, stages
        self.block_m, self.combine = block_m, combine
        n_m = triton.cdiv(s, block_m)
        tiles = b * h * n_m
        self.grid = (n_m, b * h, splits)
        self.pa = torch.empty(tiles * splits * block_m * d, device=device, dtype=torch.float32)
        self.pml = torch.empty(tiles * splits * 2 * block_m, device=device, dtype=torch.float32)
        self.cnt = torch.zeros(tiles, device=device, dtype=torch.int32)

    @property
    def name(self):
        return (f"split{self.splits}n{self.block_n}w{self.warps}s{self.stages}"
                + {0: "-nc", 1: "", 2: "-wait"}[self.combine])

    def __call__(self, q, k, v, causal, out=None):
        b, h, s, d = q.shape
        o = torch.empty_like(q) if out is None else out
        _split_kernel[self.grid](q, k, v, o, self.pa, self.pml, self.cnt, s, k.shape[2],
                                 _LOG2E / math.sqrt(d), D=d, BLOCK_M=self.block_m,
                                 BLOCK_N=self.block_n, SPLITS=self.splits, IS_CAUSAL=causal,
                                 COMBINE=self.combine, num_warps=self.warps,
                                 num_stages=self.stages)
        return o


def check(dev) -> list[str]:
    """Split configs against the fp64 reference on odd shapes (outputs start as NaN)."""
    bad = []
    shapes = [(1, 2, 512, 64), (1, 3, 203, 64), (2, 1, 130, 64), (1, 1, 1, 64)]
    if not INTERPRET:
        shapes += [(1, 8, 512, 64), (2, 4, 1000, 64)]
    cfgs = [(1, 64, 4, 2, 1), (2, 64, 4, 2, 1), (4, 64, 4, 2, 1), (3, 32, 4, 2, 1),
            (2, 64, 4, 2, 2), (3, 32, 4, 2, 2)]
    if not INTERPRET:
        cfgs += [(8, 64, 4, 2, 1), (4, 128, 8, 2, 1), (4, 64, 4, 2, 2), (2, 128, 4, 2, 2)]
    for b, h, s, d in shapes:
        for causal in (False, True):
            torch.manual_seed(s + h)
            inputs = [tuple(torch.randn(b, h, s, d, device=dev, dtype=torch.float16)
                            for _ in range(3)) for _ in range(2)]
            refs = [attention_reference(*t, is_causal=causal)[0] for t in inputs]
            for sp, bn, w, st, mode in cfgs:
                sp_ = Split(b, h, s, d, sp, bn, w, st, combine=mode, device=dev)
                # Two calls on different inputs, the workspace poisoned before each: a merge
                # that read stale or unwritten partials fails, and so would counters that did
                # not reset themselves after the first call. (Under the interpreter programs
                # run one after another, so only the GPU run tests the memory ordering.)
                for (q, k, v), ref in zip(inputs, refs, strict=True):
                    sp_.pa.fill_(float("nan"))
                    sp_.pml.fill_(float("nan"))
                    out = torch.full_like(q, float("nan"))
                    sp_(q, k, v, causal, out)
                    err = (out.double() - ref).abs().max().item()
                    if not err < 2e-3:
                        bad.append(f"{sp_.name} B{b} H{h} S{s} causal={causal}: err {err}")
                if int(sp_.cnt.abs().sum()) != 0:
                    bad.append(f"{sp_.name} B{b} H{h} S{s}: counters not reset")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = "cpu" if INTERPRET else "cuda"
    bad = check(dev)
    print(f"split checks: {len(bad)} failures", flush=True)
    for x in bad:
        print("  FAIL", x, flush=True)
    if args.check_only or bad:
        return 1 if bad else 0

    import torch.nn.functional as F

    import flashcore
    from flashcore.bench.timing import cold_l2_sets, time_cuda_graph

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.sm,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    result = dict(env=dict(smi=smi, torch=torch.__version__, triton=triton.__version__),
                  floor={}, rows=[])
    print(result["env"], flush=True)
    x = torch.zeros(4096, device="cuda")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(400):
        a @ a
    torch.cuda.synchronize()
    for g in (64, 128, 256):
        _noop[(g,)](x)  # compiled before the timer's eager pass (else it reads as a long call)
        torch.cuda.synchronize()
        result["floor"][f"empty{g}"] = time_cuda_graph([lambda g=g: _noop[(g,)](x)]).median_us
    b, h, s, d = 1, 8, 512, 64
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    n = min(cold_l2_sets(4 * b * h * s * d * 2, l2), 256)
    sets = [tuple(torch.randn(b, h, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
            for _ in range(n)]
    outs = [torch.empty_like(t[0]) for t in sets]
    _copy_tile[(64,)](sets[0][0], outs[0], D=64, BLOCK_M=64, num_warps=4)
    result["floor"]["copy64"] = time_cuda_graph(
        [lambda q=t[0], o=o: _copy_tile[(64,)](q, o, D=64, BLOCK_M=64, num_warps=4)
         for t, o in zip(sets, outs, strict=True)]).median_us
    print("floor (us/call):", {k_: round(v_, 2) for k_, v_ in result["floor"].items()}, flush=True)
    splits = [Split(b, h, s, d, sp, bn, w, st, combine=c)
              for sp, bn, w, st, c in [
                  (1, 128, 4, 2, 1), (2, 128, 4, 2, 1), (4, 64, 4, 2, 1), (4, 128, 4, 1, 1),
                  (2, 128, 4, 2, 2), (2, 64, 4, 2, 2), (4, 64, 4, 2, 2), (4, 128, 4, 1, 2),
                  (3, 64, 4, 2, 2), (8, 64, 4, 1, 2),
                  (4, 64, 4, 2, 0), (2, 128, 4, 2, 0), (4, 128, 4, 1, 0)]]
    for causal in (False, True):
        q, k, v = sets[0]
        ref = attention_reference(q, k, v, is_causal=causal)[0]
        variants = {"sdpa": lambda q, k, v, o, c=causal: F.scaled_dot_product_attention(
            q, k, v, is_causal=c),
            "dispatch": lambda q, k, v, o, c=causal: flashcore.attention(q, k, v, is_causal=c)}
        for sp in splits:
            variants[sp.name] = (lambda q, k, v, o, sp=sp, c=causal: sp(q, k, v, c, o))
        for name, fn in variants.items():
            err = (fn(q, k, v, torch.full_like(q, float("nan"))).double() - ref).abs().max().item()
            if not name.endswith("-nc") and not err < 2e-3:
                print(f"  {name} WRONG err {err}", flush=True)
        times: dict[str, list[float]] = {}
        names = list(variants)
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                fn = variants[name]
                t = time_cuda_graph([lambda t=t, o=o, fn=fn: fn(*t, o)
                                     for t, o in zip(sets, outs, strict=True)])
                times.setdefault(name, []).append(t.median_us)
        sdpa = statistics.median(times["sdpa"])
        print(f"mission causal={int(causal)}: sdpa {sdpa:.2f} us", flush=True)
        for name, ts in sorted(times.items(), key=lambda kv: statistics.median(kv[1])):
            t = statistics.median(ts)
            print(f"    {name:22s} {t:7.2f} us [{min(ts):.2f}-{max(ts):.2f}] x{sdpa / t:.3f}",
                  flush=True)
            result["rows"].append(dict(causal=causal, variant=name, us=ts, median_us=t,
                                       sdpa_us=sdpa))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

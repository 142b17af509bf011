"""Device script: correctness + timing of Triton forward configs against SDPA, one call.

Usage (GPU): PYTHONPATH=. python scripts/triton_variants.py [--quick] > $OUT/variants.txt
Times with CUDA-graph replay over rotating input sets (cold L2), median of many replays.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import flashcore
from flashcore.api import _forward
from flashcore.backends.triton.config import TritonFwdConfig, is_valid
from flashcore.reference import attention_reference

L2 = 50 * 2**20


def graph_time_us(fns, reps=50, min_graph_us=300.0):
    for f in fns:
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for f in fns:
        f()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) / len(fns) * 1e6
    n_pass = max(1, math.ceil(min_graph_us / max(est, 1.0) / len(fns)))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g):
        for _ in range(n_pass):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / (n_pass * len(fns)))
    return statistics.median(ts)


def wall_us(fn, reps=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e6)
        if len(ts) % 50 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return statistics.median(ts)


def make_sets(b, h, s, d, dtype, causal):
    per = 4 * b * h * s * d * 2
    n = max(3, math.ceil(2 * L2 / per) + 1)
    n = min(n, 64)
    return [tuple(torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
            for _ in range(n)]


def check(cfg, q, k, v, causal):
    out = _forward(q, k, v, 1 / math.sqrt(q.shape[-1]), causal, "top_left", False, "triton",
                   config=cfg)[0]
    rows = torch.unique(torch.cat([torch.tensor([0, q.shape[2] - 1]),
                                   torch.randint(0, q.shape[2], (62,))])).cuda()
    ref, _ = attention_reference(q, k, v, is_causal=causal, compute_dtype=torch.float32,
                                 rows=rows)
    return (out[:, :, rows].float() - ref).abs().max().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    shapes = [
        (1, 8, 512, 64, False), (1, 8, 512, 64, True),
        (32, 32, 512, 64, False), (4, 32, 4096, 64, False),
        (32, 16, 512, 128, False), (4, 16, 4096, 128, False), (1, 16, 16384, 128, False),
        (4, 16, 4096, 128, True), (8, 8, 2048, 256, False),
    ]
    cands = [TritonFwdConfig(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64, 128)
             for w in (4, 8) for s in (2, 3, 4)]
    if args.quick:
        cands = [c for c in cands if c.num_stages == 3]
    rows = []
    for (b, h, s, d, causal) in shapes:
        dtype = torch.float16
        sets = make_sets(b, h, s, d, dtype, causal)
        flops = 4 * b * h * s * s * d * (0.5 if causal else 1)
        sdpa = graph_time_us([lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(
            q, k, v, is_causal=c) for q, k, v in sets])
        best = None
        for cfg in cands:
            if not is_valid(cfg, d):
                continue
            try:
                err = check(cfg, *sets[0], causal)
                if not err < 2e-2:
                    print(f"  {cfg.short()} MISMATCH {err}", flush=True)
                    continue
                t = graph_time_us([lambda q=q, k=k, v=v, c=cfg, ca=causal: _forward(
                    q, k, v, 0.125, ca, "top_left", False, "triton", config=c)
                    for q, k, v in sets])
            except Exception as e:  # noqa: BLE001
                print(f"  {cfg.short()} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows.append(dict(shape=(b, h, s, d, causal), cfg=cfg.short(), us=t, sdpa_us=sdpa))
            if best is None or t < best[1]:
                best = (cfg, t)
        heur = flashcore.api.select(sets[0][0], sets[0][1], causal, "triton").config
        print(f"B{b} H{h} S{s} D{d} causal={causal}: sdpa {sdpa:.2f} us "
              f"({flops / sdpa / 1e6:.0f} TF)  best {best[0].short()} {best[1]:.2f} us "
              f"({flops / best[1] / 1e6:.0f} TF, x{sdpa / best[1]:.2f})  heuristic "
              f"{heur.short()}", flush=True)
        del sets
        torch.cuda.empty_cache()
    # Eager wall time at the mission shape.
    q, k, v = (torch.randn(1, 8, 512, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    op = torch.ops.flashcore.attention_fwd
    walls = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "flashcore.attention": lambda: flashcore.attention(q, k, v),
        "custom-op": lambda: op(q, k, v, 0.125, False, "top_left", False, "triton"),
        "_forward": lambda: _forward(q, k, v, 0.125, False, "top_left", False, "triton"),
        "torch.empty_like": lambda: torch.empty_like(q),
    }
    print("wall us/call: " + "  ".join(f"{n} {wall_us(f):.1f}" for n, f in walls.items()),
          flush=True)
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())

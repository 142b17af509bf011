"""Device script: correctness + timing of kernel configs against SDPA, in one call.

Usage (GPU): PYTHONPATH=. python scripts/variants.py --backend triton|cuda [--configs ...]
    [--shapes mission,sweep64,...] [--json OUT] [--no-wall]
Configs: "space" (every valid config), or short names like m64n128w4s3t / w4n64s2.
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
from flashcore.backends.cuda import config as cuda_config
from flashcore.backends.triton import config as triton_config
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


def check(cfg, q, k, v, causal, backend):
    out = _forward(q, k, v, 1 / math.sqrt(q.shape[-1]), causal, "top_left", False, backend,
                   config=cfg)[0]
    rows = torch.unique(torch.cat([torch.tensor([0, q.shape[2] - 1]),
                                   torch.randint(0, q.shape[2], (62,))])).cuda()
    ref, _ = attention_reference(q, k, v, is_causal=causal, compute_dtype=torch.float32,
                                 rows=rows)
    return (out[:, :, rows].float() - ref).abs().max().item()


SHAPES = {
    "mission": [(1, 8, 512, 64, False), (1, 8, 512, 64, True)],
    "sweep64": [(32, 32, 512, 64, False), (4, 32, 4096, 64, False), (1, 32, 16384, 64, False)],
    "sweep128": [(32, 16, 512, 128, False), (4, 16, 4096, 128, False),
                 (1, 16, 16384, 128, False)],
    "causal128": [(32, 16, 512, 128, True), (4, 16, 4096, 128, True)],
    "sweep256": [(8, 8, 2048, 256, False)],
}


def parse_config(name, backend):
    import re

    if backend == "triton":
        m = re.fullmatch(r"m(\d+)n(\d+)w(\d+)s(\d+)(t?)(ws)?", name)
        bm, bn, w, st, t, ws = m.groups()
        return triton_config.TritonFwdConfig(int(bm), int(bn), int(w), int(st), int(bool(t)),
                                              int(bool(ws)))
    m = re.fullmatch(r"w(\d+)n(\d+)s(\d+)(?:g(\d+))?", name)
    w, n, st, g = m.groups()
    return cuda_config.CudaFwdConfig(int(w), int(n), int(st), int(g or 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="triton", choices=("triton", "cuda"))
    ap.add_argument("--configs", default="space")
    ap.add_argument("--shapes", default="mission,sweep64,sweep128,causal128")
    ap.add_argument("--json")
    ap.add_argument("--no-wall", action="store_true")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, args.backend, flush=True)
    shapes = [s for name in args.shapes.split(",") for s in SHAPES[name]]
    rows = []
    for (b, h, s, d, causal) in shapes:
        if args.backend == "cuda" and d not in cuda_config.SUPPORTED_HEAD_DIMS:
            continue
        if args.configs == "space":
            cands = (triton_config.search_space(d) if args.backend == "triton"
                     else cuda_config.search_space(d))
        else:
            cands = [parse_config(c, args.backend) for c in args.configs.split(",")]
        dtype = torch.float16
        sets = make_sets(b, h, s, d, dtype, causal)
        flops = 4 * b * h * s * s * d * (0.5 if causal else 1)
        sdpa = graph_time_us([lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(
            q, k, v, is_causal=c) for q, k, v in sets])
        best = None
        for cfg in cands:
            try:
                err = check(cfg, *sets[0], causal, args.backend)
                if not err < 2e-2:
                    print(f"  {cfg.short()} MISMATCH {err}", flush=True)
                    continue
                t = graph_time_us([lambda q=q, k=k, v=v, c=cfg, ca=causal: _forward(
                    q, k, v, 0.125, ca, "top_left", False, args.backend, config=c)
                    for q, k, v in sets])
            except Exception as e:  # noqa: BLE001
                print(f"  {cfg.short()} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows.append(dict(shape=(b, h, s, d, causal), cfg=cfg.short(), us=t, sdpa_us=sdpa,
                             backend=args.backend))
            if best is None or t < best[1]:
                best = (cfg, t)
        if best is None:
            print(f"B{b} H{h} S{s} D{d} causal={causal}: no config ran", flush=True)
            continue
        heur = flashcore.api.select(sets[0][0], sets[0][1], causal, args.backend).config
        top = sorted((r for r in rows if r["shape"] == (b, h, s, d, causal)),
                     key=lambda r: r["us"])[:4]
        print(f"B{b} H{h} S{s} D{d} causal={causal}: sdpa {sdpa:.2f} us "
              f"({flops / sdpa / 1e6:.0f} TF)  best {best[0].short()} {best[1]:.2f} us "
              f"({flops / best[1] / 1e6:.0f} TF, x{sdpa / best[1]:.2f})  heuristic "
              f"{heur.short()}  top: " + ", ".join(f"{r['cfg']} {r['us']:.1f}" for r in top),
              flush=True)
        del sets
        torch.cuda.empty_cache()
    if not args.no_wall:
        q, k, v = (torch.randn(1, 8, 512, 64, device="cuda", dtype=torch.float16)
                   for _ in range(3))
        op = torch.ops.flashcore.attention_fwd
        walls = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            "flashcore.attention": lambda: flashcore.attention(q, k, v),
            "flashcore-cuda": lambda: flashcore.attention(q, k, v, backend="cuda"),
            "custom-op": lambda: op(q, k, v, 0.125, False, "top_left", False, "triton"),
            "torch.empty_like": lambda: torch.empty_like(q),
        }
        print("wall us/call: " + "  ".join(f"{n} {wall_us(f):.1f}" for n, f in walls.items()),
              flush=True)
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())

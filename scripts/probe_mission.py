"""Device script: a timeline of a KSPLIT (64-tile, mission) launch from in-kernel probes.

Usage (GPU):
    PYTHONPATH=. python scripts/probe_mission.py [--config h64n128w8s4k] [--causal]
        [--shape 1,8,512,64] [--json OUT]

Builds the probed copy of the Gluon kernel (``scripts/make_probe_kernel.py``), checks its output
against an fp64 reference, captures ``--calls`` launches over rotating inputs in one CUDA graph
and replays it, then reads every program's probes: per point (producer entry, Q landed, each
block's QK^T / softmax / PV, merge, O store) the median and p90 over programs of the SM clock
since the producer's entry, converted to ns with the clock rate the probes measure; the kernel's
span from the globaltimer, and the gap to the next launch's first program. Slots a program never
reaches (a causal tile with fewer blocks) are left out. The probes add time of their own and
the short replays may run below the top clock: the timeline says where time goes (in cycles),
not how long the kernel takes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys

import torch

from flashcore.backends.triton.config import TritonFwdConfig
from flashcore.reference import attention_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_probe_kernel  # noqa: E402

spec = importlib.util.spec_from_file_location("probe_mod", make_probe_kernel.make())
pm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pm)
NS = int(pm.PROBE_SLOTS.value) if hasattr(pm.PROBE_SLOTS, "value") else int(pm.PROBE_SLOTS)

NAMES = {  # (role, slot) -> label
    (2, 0): "producer entry", (2, 1): "producer: first K/V issued", (2, 2): "producer done",
    (0, 0): "c0 entry", (0, 1): "c0 Q landed", (0, 2): "c0 blk0 QK done",
    (0, 3): "c0 blk0 softmax done", (0, 4): "c0 blk0 PV done", (0, 5): "c0 blk1 QK done",
    (0, 6): "c0 blk1 softmax done", (0, 7): "c0 blk1 PV done", (0, 8): "c0 blk2+ QK done",
    (0, 9): "c0 blk2+ softmax done", (0, 10): "c0 blk2+ PV done", (0, 14): "c0 blocks done",
    (0, 15): "c0 merged", (0, 13): "c0 O store issued", (0, 12): "c0 store_wait done",
    (1, 0): "c1 entry", (1, 1): "c1 Q landed", (1, 2): "c1 blk0 QK done",
    (1, 3): "c1 blk0 softmax done", (1, 4): "c1 blk0 PV done", (1, 5): "c1 blk1 QK done",
    (1, 6): "c1 blk1 softmax done", (1, 7): "c1 blk1 PV done", (1, 8): "c1 blk2+ QK done",
    (1, 9): "c1 blk2+ softmax done", (1, 10): "c1 blk2+ PV done", (1, 14): "c1 blocks done",
    (1, 15): "c1 published",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="h64n128w8s4k")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--shape", default="1,8,512,64")
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    b, h, s, d = (int(x) for x in args.shape.split(","))
    cfg = TritonFwdConfig.from_short(args.config)
    sets = [tuple(torch.randn(b, h, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
            for _ in range(args.calls)]
    outs = [torch.empty_like(t[0]) for t in sets]
    plan = pm.HopperFwdPlan(sets[0][0], sets[0][1], scale=1 / math.sqrt(d),
                            is_causal=args.causal, causal_off=0, return_lse=False, config=cfg)
    grid = plan.grid[0]
    probes = [torch.zeros(grid * 3 * NS * 2 * 128, device="cuda", dtype=torch.float32)
              for _ in sets]
    for t, o, p in zip(sets, outs, probes, strict=True):
        plan(*t, o, p)
    torch.cuda.synchronize()
    ref = attention_reference(*sets[0], is_causal=args.causal)[0]
    err = (outs[0].double() - ref).abs().max().item()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(300):
        a @ a
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(g, stream=side):
            for t, o, p in zip(sets, outs, probes, strict=True):
                plan(*t, o, p)
    torch.cuda.synchronize()
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    g.replay()
    ev1.record()
    torch.cuda.synchronize()
    per_call = ev0.elapsed_time(ev1) * 1000 / len(sets)
    # Probes hold raw 32-bit clock / timer values in fp32 slots (bit casts).
    P = [p.view(grid, 3, NS, 2, 128).view(torch.int32).cpu().long() & 0xFFFFFFFF
         for p in probes]

    def ns(x):  # differences of 32-bit counters (clock, globaltimer_lo), wrap-safe
        return ((x + 2**31) % 2**32) - 2**31

    spans, gaps, starts = [], [], []
    deltas: dict = {key: [] for key in NAMES}
    freq = []
    t_ref = P[0][0, 2, 0, 1, 0].item()
    first, last = [], []
    for p in P:
        st = ns(p[:, 2, 0, 1, 0] - t_ref)  # producer entry per CTA, ns
        en = ns(p[:, 0, 12, 1, 0] - t_ref)  # c0 store_wait done per CTA
        first.append(st.min().item())
        last.append(en.max().item())
        spans.append(en.max().item() - st.min().item())
        starts.append(st.max().item() - st.min().item())
        c0 = p[:, 2, 0, 0, 0]
        for key in NAMES:
            r, sl = key
            hit = (p[:, r, sl, 0, 0] != 0) | (p[:, r, sl, 1, 0] != 0)  # 0: never reached
            dc = ns(p[:, r, sl, 0, 0] - c0)  # signed 32-bit wrap, like the timer's
            # A point after the program's end (or before its start) is not this launch's.
            ok = hit & (dc >= 0) & (dc <= ((p[:, 0, 12, 0, 0] - c0) % 2**32))
            deltas[key].extend(dc[ok].tolist())
        dcy = (p[:, 0, 12, 0, 0] - c0) % 2**32
        dns = ns(p[:, 0, 12, 1, 0] - p[:, 2, 0, 1, 0])
        freq.extend((dcy[dns > 500] / dns[dns > 500]).tolist())
    gaps = [first[i + 1] - last[i] for i in range(len(P) - 1)]
    ghz = statistics.median(freq) if freq else float("nan")
    rows = []
    print(f"{args.config} {args.shape} causal={int(args.causal)}: max err {err:.2e}; graph "
          f"{per_call:.2f} us/call; grid {grid}; SM clock from probes {ghz:.2f} GHz")
    print(f"  kernel span (first CTA start -> last store done): median "
          f"{statistics.median(spans):.0f} ns; CTA start spread {statistics.median(starts):.0f}"
          f" ns; gap to next kernel's first CTA {statistics.median(gaps):.0f} ns")
    reached = {k: v for k, v in NAMES.items() if deltas[k]}
    for key, lab in sorted(reached.items(), key=lambda kv: statistics.median(deltas[kv[0]])):
        xs = deltas[key]
        med = statistics.median(xs)
        q9 = sorted(xs)[int(0.9 * (len(xs) - 1))]
        rows.append(dict(role=key[0], slot=key[1], label=lab, cycles_median=med, cycles_p90=q9,
                         ns_median=med / ghz))
        print(f"    {lab:28s} {med:7.0f} cyc  {med / ghz:7.0f} ns   (p90 {q9 / ghz:6.0f} ns)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=args.config, shape=args.shape, causal=args.causal, err=err,
                           per_call_us=per_call, ghz=ghz, span_ns=spans, gap_ns=gaps,
                           start_spread_ns=starts, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

"""Device script: correctness + timing of kernel configs against SDPA, in one call.

Usage (GPU):
    PYTHONPATH=. python scripts/variants.py --shapes "mission;1,16,1024,128" \
        --configs dispatch,m64n64w4s3,h64n128w8s4k [--masks 0,1] [--rounds 2] [--floor] \
        [--odd h64n128w8s4k,...] [--warm-l2] [--json OUT]

Configs: any ``TritonFwdConfig.short()`` name (``m64n64w4s3t``, ``h64n128w8s2oP``,
``h64n128w8s4ok``, ...) or ``dispatch`` (what ``flashcore.attention`` picks); a ``-x0`` suffix
runs it with the cross-tile pipeline off (``FLASHCORE_CROSS_TILE=0``); every variant runs with
the opt-in stream-K last wave on (``FLASHCORE_STREAM_K=1``: ``dispatch`` is then what
``flashcore.attention`` picks with it on) unless suffixed ``-k0``; an ``-old`` suffix
(after ``-x0`` / ``-k0``) launches the Gluon kernel of ``--old-kernel FILE`` instead (an earlier
``fwd_hopper.py``, for an A/B of a kernel change in one run); ``-old2``, ... the second, ...
``--old-kernel``. Shapes: a group
name from ``SHAPES`` or ``B,H,S,D``, separated by ``;`` (fp16 or bf16, non-causal and causal).
Each config is first checked against the fp32 reference under the bench's rule (outputs
poisoned with NaN), then timed by the bench's CUDA-graph timer over rotating input sets (cold
L2); SDPA is timed in the same round, and rounds repeat in alternating order so drift shows as
spread. ``--warm-l2`` times one input set instead (the graph then holds few calls, so its
replay overhead inflates the per-call time: compare only within one setting).
``--floor`` also times an empty kernel: the graph timer's per-call floor. ``--odd CONFIGS``
checks those Hopper configs on ragged shapes, both causal alignments, GQA and bf16 before
anything is timed. ``--time-wrong`` also times ``-old`` variants whose output fails the check
(upper-bound probes that drop work on purpose, e.g. a kernel without its row sums).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import flashcore
from flashcore.api import _forward
from flashcore.backends.triton import fwd as triton_fwd
from flashcore.backends.triton.config import (
    CROSS_TILE_ENV,
    STREAM_K_ENV,
    TritonFwdConfig,
    is_valid,
)
from flashcore.bench.check import compare, make_reference, sample_rows
from flashcore.bench.timing import cold_l2_sets, time_cuda_graph

SHAPES = {
    "mission": [(1, 8, 512, 64)],
    "small": [(1, 16, 1024, 128), (2, 8, 2048, 64), (1, 32, 512, 128)],
    "sweep64": [(32, 32, 512, 64), (8, 32, 2048, 64), (1, 32, 16384, 64)],
    "sweep128": [(32, 16, 512, 128), (16, 16, 1024, 128), (4, 16, 4096, 128),
                 (1, 16, 16384, 128)],
}
ODD = [  # b, hq, hkv, sq, sk, dtype, causal, align
    (1, 2, 2, 1, 1, torch.float16, False, "top_left"),
    (1, 2, 2, 17, 17, torch.bfloat16, True, "top_left"),
    (2, 3, 3, 203, 203, torch.float16, True, "top_left"),
    (1, 2, 2, 113, 799, torch.bfloat16, False, "top_left"),
    (1, 4, 2, 799, 113, torch.float16, True, "bottom_right"),
    (1, 2, 2, 300, 100, torch.float16, True, "bottom_right"),
    (2, 8, 2, 1024, 1024, torch.bfloat16, True, "bottom_right"),
    (1, 8, 8, 512, 512, torch.float16, True, "top_left"),
    # Key lengths a multiple of 128 (the persistent grid's cross-tile pipeline), ragged Sq.
    (3, 16, 4, 1000, 1024, torch.float16, False, "top_left"),
    (2, 8, 2, 1100, 128, torch.bfloat16, False, "top_left"),
]


def parse_config(name: str) -> TritonFwdConfig:
    try:
        return TritonFwdConfig.from_short(name)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def parse_shapes(spec: str) -> list[tuple[int, int, int, int]]:
    out = []
    for part in spec.split(";"):
        if part in SHAPES:
            out += SHAPES[part]
        else:
            out.append(tuple(int(x) for x in part.split(",")))
    return out


@triton.jit
def _noop(X):
    tl.store(X + tl.program_id(0), 1.0)


def floor_us() -> dict:
    x = torch.zeros(132, device="cuda")
    return {f"empty grid={g}": time_cuda_graph([lambda g=g: _noop[(g,)](x)]).median_us
            for g in (1, 64, 132)}


def poisoned(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


_OLD: dict = {}  # suffix ("-old", "-old2", ...) -> HopperFwdPlan of that --old-kernel


def load_old_kernel(path: str) -> None:
    """Import an earlier fwd_hopper.py as a sibling module (its relative imports resolve)."""
    import importlib.util

    i = len(_OLD) + 1
    name = f"flashcore.backends.triton._fwd_hopper_old{i}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    _OLD["-old" if i == 1 else f"-old{i}"] = mod.HopperFwdPlan


def run_cfg(cfg, q, k, v, causal, align="top_left", cross=True, old="", sk=True):
    from flashcore.backends.triton import fwd_hopper

    # Launch plans read FLASHCORE_CROSS_TILE / _STREAM_K when they are built: set them for
    # this call only.
    os.environ[CROSS_TILE_ENV] = "1" if cross else "0"
    os.environ[STREAM_K_ENV] = "1" if sk else "0"
    flashcore.api._PLANS.clear()
    new_plan = fwd_hopper.HopperFwdPlan
    if old:  # fwd.py imports HopperFwdPlan from the module when it builds a plan
        fwd_hopper.HopperFwdPlan = _OLD[old]
    try:
        scale = 1.0 / math.sqrt(q.shape[-1])
        if cfg == "dispatch":
            return flashcore.attention(q, k, v, is_causal=causal, causal_align=align,
                                       enable_gqa=q.shape[1] != k.shape[1])
        return _forward(q, k, v, scale, causal, align, False, "triton", config=cfg)[0]
    finally:
        os.environ.pop(CROSS_TILE_ENV, None)
        os.environ.pop(STREAM_K_ENV, None)
        fwd_hopper.HopperFwdPlan = new_plan


def odd_checks(cfgs) -> list[str]:
    """Ragged shapes, both causal alignments, GQA, bf16: every Hopper config."""
    from flashcore.reference import attention_reference

    fails = []
    for cfg in cfgs:
        if cfg == "dispatch" or not cfg.hopper:
            continue
        for i, (b, hq, hkv, sq, sk, dt, causal, align) in enumerate(ODD):
            d = 64 if i % 2 == 0 else 128
            if not is_valid(cfg, d):
                continue
            g = torch.Generator(device="cuda").manual_seed(100 + i)
            q = torch.randn(b, hq, sq, d, device="cuda", dtype=dt, generator=g)
            k = torch.randn(b, hkv, sk, d, device="cuda", dtype=dt, generator=g)
            v = torch.randn(b, hkv, sk, d, device="cuda", dtype=dt, generator=g)
            out = run_cfg(cfg, q, k, v, causal, align)
            kk = k.repeat_interleave(hq // hkv, 1)
            vv = v.repeat_interleave(hq // hkv, 1)
            ref, _ = attention_reference(q, kk, vv, is_causal=causal, causal_align=align,
                                         compute_dtype=torch.float64)
            low, _ = attention_reference(q, kk, vv, is_causal=causal, causal_align=align,
                                         compute_dtype=dt)
            tol = 2 * (low.double() - ref).abs().max().item() + 4 * (
                2.0**-10 if dt == torch.float16 else 2.0**-7) * ref.abs().max().item()
            err = (out.double() - ref).abs().max().item()
            if not (err <= tol):  # NaN fails too
                fails.append(f"{cfg.short()} {b},{hq},{hkv},{sq},{sk} d{d} {dt} "
                             f"causal={causal} {align}: err {err:.3g} > {tol:.3g}")
    return fails


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="mission")
    ap.add_argument("--configs", default="dispatch")
    ap.add_argument("--masks", default="0,1", help="causal settings to run: 0, 1 or 0,1")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--floor", action="store_true")
    ap.add_argument("--odd", default="", help="Hopper configs to check on ragged shapes first")
    ap.add_argument("--warm-l2", action="store_true", help="one input set: inputs stay in L2")
    ap.add_argument("--old-kernel", action="append", default=[],
                    help="an earlier fwd_hopper.py for the -old (-old2, ...) variants")
    ap.add_argument("--time-wrong", action="store_true",
                    help="time -old variants whose output is wrong (upper-bound probes that drop "
                         "work on purpose)")
    ap.add_argument("--json")
    args = ap.parse_args()
    for path in args.old_kernel:
        load_old_kernel(path)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.max.sm,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    env = dict(gpu=torch.cuda.get_device_name(), smi=smi, torch=torch.__version__,
               triton=triton.__version__)
    print(env, flush=True)
    cfgs = []
    for c in args.configs.split(","):
        m = re.fullmatch(r"(.*?)(-old\d*)?", c)
        c, old = m.group(1), m.group(2) or ""
        if old and old not in _OLD:
            raise SystemExit(f"{c}{old} needs another --old-kernel")
        base, cross, sk = c, True, True
        while base.endswith(("-x0", "-k0")):  # in either order
            cross, sk = cross and not base.endswith("-x0"), sk and not base.endswith("-k0")
            base = base[:-3]
        cfgs.append(("dispatch" if base == "dispatch" else parse_config(base), cross, old, sk))
    result: dict = dict(env=env, floor={}, odd_failures=[], rows=[])
    alloc_out = triton_fwd._alloc_out
    # Checks start from NaN (unwritten rows fail); timed calls allocate as the library does
    # (a NaN fill per call would add a kernel to every timed call).
    triton_fwd._alloc_out = poisoned

    if args.odd:
        result["odd_failures"] = odd_checks([parse_config(c) for c in args.odd.split(",")])
        print(f"odd-shape checks: {len(result['odd_failures'])} failures", flush=True)
        for f in result["odd_failures"]:
            print("  FAIL", f, flush=True)
    if args.floor:
        result["floor"] = floor_us()
        print("floor (us/call):", {k: round(v, 2) for k, v in result["floor"].items()},
              flush=True)

    # Clocks ramp from idle: keep the GPU busy for a second before the first timing.
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(400):
        a @ a
    torch.cuda.synchronize()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for b, h, s, d in parse_shapes(args.shapes):
        for causal in (bool(int(x)) for x in args.masks.split(",")):
            per = 4 * b * h * s * d * 2
            n = 1 if args.warm_l2 else min(cold_l2_sets(per, l2), 256)
            sets = [tuple(torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
                    for _ in range(n)]
            ref = make_reference(*sets[0], causal, sample_rows(s, 128))
            flops = 4 * b * h * s * s * d * (0.5 if causal else 1)
            variants = []
            outs: dict[str, torch.Tensor] = {}
            for cfg, cross, old, sk in cfgs:
                if cfg != "dispatch" and not is_valid(cfg, d):
                    continue
                name = ((cfg if cfg == "dispatch" else cfg.short()) + ("" if cross else "-x0")
                        + ("" if sk else "-k0") + old)
                try:
                    out = run_cfg(cfg, *sets[0], causal, cross=cross, old=old, sk=sk)
                    chk = compare(out, ref)
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                if not chk.ok:
                    print(f"  {name} WRONG {chk.detail}", flush=True)
                    if not (old and args.time_wrong):
                        continue
                variants.append((name, cfg, cross, old, sk, chk))
                outs[name] = out
            # A kernel change meant to reorder work only: its output against the -old one's.
            for name in list(outs):
                if name.endswith("-old"):
                    for other in outs:
                        if other.startswith(name[:-4].replace("-x0", "")) and other != name:
                            same = torch.equal(outs[other], outs[name])
                            print(f"  {other} vs {name}: {'bit-identical' if same else 'DIFFER'}",
                                  flush=True)
                            result.setdefault("identical", []).append(
                                dict(b=b, h=h, s=s, d=d, causal=causal, a=other, b_=name,
                                     same=same))
            outs.clear()
            triton_fwd._alloc_out = alloc_out
            times: dict[str, list[float]] = {"sdpa": []}
            for r in range(args.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                times["sdpa"].append(time_cuda_graph(
                    [lambda q=q, k=k, v=v, ca=causal: F.scaled_dot_product_attention(
                        q, k, v, is_causal=ca) for q, k, v in sets], reps=args.reps).median_us)
                for name, cfg, cross, old, sk, _ in order:
                    t = time_cuda_graph([lambda q=q, k=k, v=v, c=cfg, ca=causal, x=cross, o=old,
                                         s=sk: run_cfg(c, q, k, v, ca, cross=x, old=o, sk=s)
                                         for q, k, v in sets], reps=args.reps)
                    times.setdefault(name, []).append(t.median_us)
            sdpa = statistics.median(times["sdpa"])
            sel = flashcore.api.select_for(sets[0][0].device, dtype, b, h, h, s, s, d, causal,
                                           "triton")
            print(f"B{b} H{h} S{s} D{d} causal={int(causal)} {args.dtype}: sdpa "
                  f"{sdpa:.2f} us ({flops / sdpa / 1e6:.0f} TF); dispatch picks "
                  f"{sel.config.short()} ({sel.reason})", flush=True)
            for name, ts in sorted(times.items(), key=lambda kv: statistics.median(kv[1])):
                t = statistics.median(ts)
                chk = next((v[5] for v in variants if v[0] == name), None)
                err = chk.max_err if chk is not None else None
                wrong = chk is not None and not chk.ok  # timed under --time-wrong
                print(f"    {name:24s} {t:9.2f} us  [{min(ts):.2f}-{max(ts):.2f}]  "
                      f"{flops / t / 1e6:6.0f} TF  x{sdpa / t:.3f}"
                      f"{'  (wrong output)' if wrong else ''}", flush=True)
                result["rows"].append(dict(b=b, h=h, s=s, d=d, causal=causal, dtype=args.dtype,
                                           variant=name, us=ts, median_us=t, sdpa_us=sdpa,
                                           tflops=flops / t / 1e6, x_sdpa=sdpa / t,
                                           max_err=err, tol=ref.tol, wrong=wrong))
            triton_fwd._alloc_out = poisoned
            del sets
            torch.cuda.empty_cache()
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
    return 1 if result["odd_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

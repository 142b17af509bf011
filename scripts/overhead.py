"""Device script: where the host time of one eager flashcore.attention call goes.

PYTHONPATH=. python scripts/overhead.py   (mission shape B1 H8 S512 D64 fp16)
Each piece runs in a tight loop; rounds alternate between pieces so drift hits all alike.
"""

import statistics
import time

import torch
import torch.nn.functional as F

import flashcore
from flashcore import api

q, k, v = (torch.randn(1, 8, 512, 64, device="cuda", dtype=torch.float16) for _ in range(3))
flashcore.attention(q, k, v)
flashcore.attention(q, k, v, backend="triton")
# The backend="triton" call's plan (the "auto" one may be the CUDA backend's).
plan = next(p for key, p in api._PLANS.items() if "triton" in key)
hop = plan.hopper  # the Gluon kernel's launch state (None: the tl.dot path serves it)
out0 = torch.empty_like(q)


def pkey():
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype,
            v.dtype, q.device, k.device, v.device, False, None, False, "top_left", False, "auto",
            0.0, True)


key = pkey()
pieces = {
    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
    "flashcore.attention": lambda: flashcore.attention(q, k, v),
    "attention triton": lambda: flashcore.attention(q, k, v, backend="triton"),
    "plan(q,k,v)": lambda: plan(q, k, v),
    "plan key tuple": pkey,
    "plans dict get": lambda: api._PLANS.get(key),
    "torch.empty_like": lambda: torch.empty_like(q),
    "3x data_ptr": lambda: (q.data_ptr(), k.data_ptr(), v.data_ptr()),
    "raw stream": lambda: torch._C._cuda_getCurrentRawStream(0),
    "current_device": torch.cuda.current_device,
    "is_compiling": torch.compiler.is_compiling,
}
if hop is not None:
    pieces["hopper(q,k,v,out,lse)"] = lambda: hop(q, k, v, out0, out0)
    if hasattr(hop, "_map"):
        pieces["4x _map"] = lambda: (hop._map(0, q), hop._map(1, k), hop._map(2, v),
                                     hop._map(3, out0))
res = {n: [] for n in pieces}
for _ in range(5):
    for n, f in pieces.items():
        for _ in range(50):
            f()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(400):
            f()
        res[n].append((time.perf_counter() - t) / 400 * 1e6)
        torch.cuda.synchronize()
print(f"plan: {type(plan).__name__}, hopper: {hop.config.short() if hop else None}")
for n, v_ in res.items():
    print(f"{n:24s} {statistics.median(v_):7.2f} us  (rounds: {', '.join(f'{x:.1f}' for x in v_)})")

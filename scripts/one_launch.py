"""Warm up one FlashCore forward then launch it once more: a target for ncu/compute-sanitizer.

PYTHONPATH=. python scripts/one_launch.py B,Hq,Sq,D [triton|cuda] [causal] [noref]
noref: skip the comparison with SDPA (under compute-sanitizer, so only our kernel is checked).
"""

import sys

import torch

import flashcore

b, h, s, d = (int(x) for x in sys.argv[1].split(","))
backend = sys.argv[2] if len(sys.argv) > 2 else "triton"
causal = len(sys.argv) > 3 and sys.argv[3] == "causal"
q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
for _ in range(4):
    out = flashcore.attention(q, k, v, is_causal=causal, backend=backend)
torch.cuda.synchronize()
if "noref" not in sys.argv:
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    print("max abs diff vs SDPA:", (out - ref).abs().max().item())

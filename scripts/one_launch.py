"""Warm up one FlashCore forward then launch it once more: a target for ncu/compute-sanitizer.

PYTHONPATH=. python scripts/one_launch.py B,Hq,Sq,D [triton|cuda] [causal] [noref] [cfg=NAME]
noref: skip the comparison with SDPA (under compute-sanitizer, so only our kernel is checked).
cfg=NAME: run this config instead of dispatch's (short name: m64n128w4s3t, w8n64s2g4, ...).
"""

import sys

import torch

import flashcore

b, h, s, d = (int(x) for x in sys.argv[1].split(","))
backend = sys.argv[2] if len(sys.argv) > 2 else "triton"
causal = len(sys.argv) > 3 and sys.argv[3] == "causal"
q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
cfg = next((a[4:] for a in sys.argv if a.startswith("cfg=")), None)
if cfg is None:
    def run():
        return flashcore.attention(q, k, v, is_causal=causal, backend=backend)
else:
    from flashcore.api import _forward
    from flashcore.backends.cuda.config import CudaFwdConfig
    from flashcore.backends.triton.config import TritonFwdConfig

    config = (CudaFwdConfig if backend == "cuda" else TritonFwdConfig).from_short(cfg)

    def run():
        return _forward(q, k, v, d**-0.5, causal, "top_left", False, backend, config=config)[0]
for _ in range(4):
    out = run()
torch.cuda.synchronize()
if "noref" not in sys.argv:
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    print("max abs diff vs SDPA:", (out - ref).abs().max().item())

"""Device script: one launch each of the Hopper kernel variants (old module, alternates, current
with cross-tile off/on) on one shape, for an ncu A/B (run under `ncu -k regex:hopper`)."""
import importlib.util
import math
import os
import sys

import torch

import flashcore
from flashcore.api import _forward
from flashcore.backends.triton import fwd_hopper
from flashcore.backends.triton.config import CROSS_TILE_ENV

b, h, s, d = (int(x) for x in sys.argv[1].split(","))
causal = sys.argv[2] == "1"
olds = sys.argv[3:]
q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
sel = flashcore.api.select_for(q.device, q.dtype, b, h, h, s, s, d, causal, "triton")
cfg = sel.config
print("config", cfg.short(), flush=True)
new_plan = fwd_hopper.HopperFwdPlan
variants = []
for i, path in enumerate(olds):
    spec = importlib.util.spec_from_file_location(f"flashcore.backends.triton._alt{i}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    variants.append((os.path.basename(path), mod.HopperFwdPlan, "0"))
variants += [("current-x0", new_plan, "0"), ("current", new_plan, "1")]
outs = []
for name, plan, cross in variants:
    os.environ[CROSS_TILE_ENV] = cross
    flashcore.api._PLANS.clear()
    fwd_hopper.HopperFwdPlan = plan
    torch.cuda.nvtx.range_push(name)
    out = _forward(q, k, v, 1 / math.sqrt(d), causal, "top_left", False, "triton", config=cfg)[0]
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    print("launched", name, flush=True)
    outs.append(out)
fwd_hopper.HopperFwdPlan = new_plan
print("identical:", [torch.equal(outs[0], o) for o in outs])

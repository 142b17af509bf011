"""The program ``flashcore profile`` runs under ncu: warm-up launches, then exactly one more.

ncu selects the last one by kernel name and ``--launch-skip <warmup>``, so this program must
launch the FlashCore kernel exactly ``warmup + 1`` times and nothing else under that name.
It writes what only the GPU process knows (device, clocks, versions, the config dispatch chose)
to ``--info`` as JSON. Not a public interface: run through ``flashcore profile``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..info import parse_shape


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashcore.tools.profile_driver")
    p.add_argument("--shape", type=parse_shape, required=True)
    p.add_argument("--backend", choices=("triton", "cuda"), required=True)
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--info", type=Path)
    a = p.parse_args(argv)

    import torch

    import flashcore
    from flashcore.api import select

    if not torch.cuda.is_available():
        print("profile driver: no CUDA device visible to torch", file=sys.stderr)
        return 3
    b, hq, sq, d, hkv, sk = a.shape
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=dt, generator=g)
    k = torch.randn(b, hkv, sk, d, device="cuda", dtype=dt, generator=g)
    v = torch.randn(b, hkv, sk, d, device="cuda", dtype=dt, generator=g)
    kw = dict(is_causal=a.causal, enable_gqa=hq != hkv, backend=a.backend)
    with torch.inference_mode():
        for _ in range(a.warmup):
            flashcore.attention(q, k, v, **kw)
        torch.cuda.synchronize()
        # The range only labels the launch for nsys/ncu GUIs; ncu selects it by launch count.
        torch.cuda.nvtx.range_push("flashcore_profile")
        flashcore.attention(q, k, v, **kw)
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
    if a.info is not None:
        props = torch.cuda.get_device_properties(0)
        sel = select(q, k, a.causal, a.backend)
        cfg = sel.config
        info = {
            "device": props.name,
            "cc": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "flashcore": flashcore.__version__,
            "selection": {
                "backend": sel.backend,
                "config": cfg.to_dict() if hasattr(cfg, "to_dict") else repr(cfg),
                "config_short": cfg.short() if hasattr(cfg, "short") else repr(cfg),
                "source": sel.source,
                "reason": sel.reason,
            },
        }
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
        a.info.parent.mkdir(parents=True, exist_ok=True)
        a.info.write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``flashcore info``: versions, GPU and backends; with --shape, the config dispatch would use."""

from __future__ import annotations

import argparse
import importlib
import platform

__all__ = ["add_arguments", "main", "parse_shape"]


def parse_shape(text: str) -> tuple[int, int, int, int, int, int]:
    """``B,Hq,Sq,D[,Hkv[,Sk]]`` -> (B, Hq, Sq, D, Hkv, Sk); Hkv defaults to Hq, Sk to Sq."""
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shape must be integers B,Hq,Sq,D[,Hkv[,Sk]], got {text!r}"
        ) from None
    if not 4 <= len(parts) <= 6 or min(parts) < 1:
        raise argparse.ArgumentTypeError(
            f"--shape must be 4 to 6 positive integers B,Hq,Sq,D[,Hkv[,Sk]], got {text!r}"
        )
    b, hq, sq, d = parts[:4]
    hkv = parts[4] if len(parts) > 4 else hq
    sk = parts[5] if len(parts) > 5 else sq
    return b, hq, sq, d, hkv, sk


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", type=parse_shape, help="B,Hq,Sq,D[,Hkv[,Sk]]: show the dispatch")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backend", choices=("auto", "triton", "cuda"), default="auto")


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "installed")
    except Exception as e:  # noqa: BLE001 - report, never fail `info`
        return f"not available ({type(e).__name__})"


def backends_available() -> dict[str, str]:
    """Backend -> 'yes' or why not, without compiling anything."""
    import torch

    out = {"reference": "yes (any device)"}
    has_gpu = torch.cuda.is_available()
    tri = _version("triton")
    out["triton"] = (
        "yes"
        if has_gpu and not tri.startswith("not")
        else f"no GPU (triton {tri}; CPU only via TRITON_INTERPRET=1)"
    )
    core = _version("cuda.core")
    out["cuda"] = (
        "yes"
        if has_gpu and not core.startswith("not")
        else f"needs a GPU and cuda.core (cuda.core: {core})"
    )
    return out


def main(args: argparse.Namespace) -> int:
    import torch

    import flashcore

    print(f"flashcore  {flashcore.__version__}")
    print(f"python     {platform.python_version()}")
    print(f"torch      {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"triton     {_version('triton')}")
    print(f"cuda.core  {_version('cuda.core')}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(
            f"GPU        {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.0f} GiB"
        )
    else:
        print("GPU        none")
    for name, state in backends_available().items():
        print(f"backend    {name:10s} {state}")
    if args.shape is not None:
        _explain(args)
    return 0


def _explain(args: argparse.Namespace) -> None:
    import torch

    from .api import SUPPORTED_DTYPES, select_for

    b, hq, sq, d, hkv, sk = args.shape
    dtype = {v: k for k, v in SUPPORTED_DTYPES.items()}[args.dtype]
    dev = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )
    from .tuning.cache import cache_path
    from .tuning.tables import tables_dir

    sel = select_for(dev, dtype, b, hq, hkv, sq, sk, d, args.causal, args.backend)
    print(
        f"dispatch   shape B={b} Hq={hq} Sq={sq} D={d} Hkv={hkv} Sk={sk} {args.dtype} "
        f"causal={args.causal}"
    )
    print(f"           backend={sel.backend} config={sel.config} source={sel.source}")
    print(f"           why: {sel.reason}")
    print(f"           user cache {cache_path()}; shipped tables {tables_dir()}")

"""``flashcore bench``: time FlashCore against SDPA (each backend) and FlexAttention.

Examples::

    flashcore bench                                  # mission shape, every provider
    flashcore bench --suite sweep --plot             # the FlashAttention papers' sweep
    flashcore bench --shape 4,32,2048,128,8 --dtype bf16 --causal --providers sdpa,flex
    flashcore bench --suite mission --interpret      # CPU, tiny shapes, Triton interpreter
    flashcore bench --from-json a.json b.json --plot # re-make table/markdown/PNG from JSON

Writes ``<out>/<gpu>-<date>[-<tag>].json`` (every row and the environment), ``.md`` (README
tables) and, with ``--plot``, ``.png``. The tag defaults to the suite (none for ``all``).
Exit status: 0; 1 if a row was a mismatch or an error; 2 without CUDA (and no --interpret)
or on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flashcore.info import parse_shape

from .suites import DTYPES, SUITES, Case, interpret_cases, suite_cases

__all__ = ["add_arguments", "main"]

_NO_CUDA = (
    "flashcore bench: no CUDA GPU is visible (torch {torch}, built with CUDA {cuda}). The "
    "benchmark times GPU kernels; run it on a machine with an NVIDIA GPU, or pass --interpret "
    "for a tiny CPU run through the Triton interpreter that exercises the whole pipeline "
    "(its times mean nothing)."
)


def _provider_list(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _nonnegative(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return x


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .runner import ORDERS
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--suite", choices=(*SUITES, "all"), default="mission",
                   help="named set of shapes (default: mission)")
    p.add_argument("--shape", type=parse_shape, metavar="B,Hq,Sq,D[,Hkv[,Sk]]",
                   help="one shape instead of a suite (with --dtype, --causal)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of --shape (default fp16); with a suite, keep only this dtype")
    p.add_argument("--causal", action="store_true",
                   help="causal --shape; with a suite, keep only its causal cases")
    p.add_argument("--providers", nargs="+", type=_provider_list, metavar="NAME",
                   help="subset of providers (space or comma separated; default: all). SDPA "
                        "default is always added: it is the ratio's denominator")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="output directory (default: benchmarks/results)")
    p.add_argument("--tag", default=None,
                   help="file-name suffix after <gpu>-<date> (default: the suite; '' for none)")
    p.add_argument("--plot", action="store_true", help="also write the PNG (needs matplotlib)")
    p.add_argument("--interpret", action="store_true",
                   help="CPU run of tiny shapes through the Triton interpreter (tests)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per row (default 100; 3 with --interpret)")
    p.add_argument("--wall-reps", type=int, default=None,
                   help="eager wall-time calls per row, at most (default 200; 3 interpret)")
    p.add_argument("--check-rows", type=int, default=128,
                   help="query rows compared with the reference before timing (default 128)")
    p.add_argument("--max-seconds-per-case", type=float, default=60.0,
                   help="skip a (case, provider) whose timing is projected to take longer "
                        "(default 60; 0 disables)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", choices=ORDERS, default="registry",
                   help="provider order within a case: registry (SDPA first, default), "
                        "reverse, or alternate (reversed on every second case); rows are "
                        "reported in registry order. Each cell in both orders: run once with "
                        "registry and once with reverse")
    p.add_argument("--gap-s", type=_nonnegative, default=0.0, metavar="S",
                   help="sleep S seconds before each provider's timed round (the card idles)")
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="time a case's providers in N interleaved rounds of reps/N, the order "
                        "reversing every round (A B, B A, ...), so each is timed across the "
                        "same stretch of the card's clock and power state (default 4; 1: one "
                        "block per provider)")
    p.add_argument("--from-json", nargs="+", type=Path, metavar="JSON",
                   help="no run: load result JSON(s), merge, write markdown (and --plot PNG)")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _enable_interpreter() -> str | None:
    """Make the Triton kernels run on the CPU interpreter; an error message if too late.

    Triton picks interpreter or compiler when a kernel is decorated, i.e. when
    flashcore.backends.triton.fwd is imported; the env var must be set before that."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    fwd = sys.modules.get("flashcore.backends.triton.fwd")
    if fwd is not None and not getattr(fwd, "INTERPRET", False):
        return ("flashcore bench --interpret: the Triton backend was imported before "
                "TRITON_INTERPRET=1 was set; rerun with TRITON_INTERPRET=1 in the environment")
    os.environ["TRITON_INTERPRET"] = "1"
    return None


def _select_cases(args: argparse.Namespace) -> list[Case]:
    if args.shape is not None:
        b, hq, sq, d, hkv, sk = args.shape
        return [Case(b, hq, hkv, sq, sk, d, args.dtype or "fp16", args.causal, "custom")]
    cases = suite_cases(args.suite)
    if args.dtype:
        cases = [c for c in cases if c.dtype == args.dtype]
    if args.causal:
        cases = [c for c in cases if c.causal]
    return interpret_cases(cases) if args.interpret else cases


def _default_tag(args: argparse.Namespace) -> str:
    if args.tag is not None:
        return args.tag
    if args.shape is not None:
        return "custom"
    return "" if args.suite == "all" else args.suite


def _write_views(result, out: Path, stem: str, plot: bool, json_paths: list[Path]) -> list[Path]:
    from . import report

    written = [report.write_markdown(result, out / f"{stem}.md")]
    if plot:
        png = out / f"{stem}.png"
        if report.write_plot(result, png):
            written.append(png)
        else:
            _say("flashcore bench: matplotlib is not installed, no PNG written; re-make it "
                 "elsewhere with: flashcore bench --plot --from-json "
                 + " ".join(map(str, json_paths)))
    return written


def _from_json(args: argparse.Namespace) -> int:
    from . import report

    try:
        result = report.merge_results([report.load_json(p) for p in args.from_json])
    except (OSError, ValueError, KeyError) as e:
        _say(f"flashcore bench --from-json: {e}")
        return 2
    if args.tag is not None:
        stem = report.output_stem(result.env, args.tag)
    elif len(args.from_json) == 1:
        stem = args.from_json[0].stem
    else:
        stem = report.output_stem(result.env)
    print(report.format_console(result))
    written = []
    if len(args.from_json) > 1:  # the merged result is itself a result file
        written.append(report.write_json(result, args.out / f"{stem}.json"))
    written += _write_views(result, args.out, stem, args.plot, args.from_json)
    for path in written:
        _say(f"wrote {path}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.from_json:
        return _from_json(args)
    # Arguments first, so a typo is reported as such on any machine.
    from .providers import PROVIDERS

    names = None
    if args.providers:
        names = [n for group in args.providers for n in group]
        unknown = [n for n in names if n not in PROVIDERS]
        if unknown:
            _say(f"flashcore bench: unknown provider(s) {unknown}; choose from {list(PROVIDERS)}")
            return 2
        if "sdpa" not in names:
            names.insert(0, "sdpa")
    cases = _select_cases(args)
    if not cases:
        _say("flashcore bench: no case left after the --dtype/--causal filters")
        return 2
    if args.interpret:
        reps, wall_reps = args.reps or 3, args.wall_reps or 3
    else:
        reps, wall_reps = args.reps or 100, args.wall_reps or 200
    rounds = args.rounds if args.rounds is not None else (1 if args.interpret else min(4, reps))
    if not 1 <= rounds <= reps:
        _say(f"flashcore bench: --rounds must be between 1 and --reps ({reps}), got {rounds}")
        return 2
    if args.interpret:
        err = _enable_interpreter()
        if err:
            _say(err)
            return 2

    import torch

    if not args.interpret and not torch.cuda.is_available():
        _say(_NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda))
        return 2

    from . import report
    from .env import collect_env
    from .gpustate import GpuStateSampler, nvml_reader
    from .providers import get_providers
    from .runner import ERROR, MISMATCH, RunConfig, run_bench
    from .timing import CpuWallTimer, CudaGraphTimer

    providers = get_providers(names)

    if args.interpret:
        device = torch.device("cpu")
        timer = CpuWallTimer()
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        timer = CudaGraphTimer()
    # The card's clock, power and temperature during each row's timed replays (NVML; rows
    # carry None where it cannot be read).
    reader = None if args.interpret else nvml_reader(device.index or 0)
    sampler = GpuStateSampler(reader) if reader is not None else None
    if reps < 100 and not args.interpret:
        _say(f"flashcore bench: --reps {reps} is below the methodology's 100")
    cfg = RunConfig(
        reps=reps, wall_reps=wall_reps, min_wall_reps=min(20, wall_reps),
        check_rows=args.check_rows, seed=args.seed, order=args.order, gap_s=args.gap_s,
        rounds=rounds,
        max_seconds_per_case=(args.max_seconds_per_case or None) if not args.interpret else None,
    )
    env = collect_env(device, interpret=args.interpret)
    _say(f"flashcore bench: {len(cases)} case(s) x {len(providers)} provider(s) "
         f"({', '.join(p.name for p in providers)}) on {env['gpu']}")
    stem = report.output_stem(env, _default_tag(args))
    json_path = args.out / f"{stem}.json"
    run_info = {"suite": "custom" if args.shape is not None else args.suite,
                "providers": [p.name for p in providers], "interpret": args.interpret}

    def save(result) -> Path:
        result.env = env
        result.settings.update(run_info)
        return report.write_json(result, json_path)

    if sampler is None and not args.interpret:
        _say("flashcore bench: NVML not readable: rows carry no SM clock / power samples")
    result = run_bench(cases, providers, timer, device=device, config=cfg, progress=_say,
                       checkpoint=save, sampler=sampler)
    print(report.format_console(result))
    written = [save(result)]
    written += _write_views(result, args.out, stem, args.plot, [json_path])
    for path in written:
        _say(f"wrote {path}")
    bad = [r for r in result.rows if r.status in (MISMATCH, ERROR)]
    if bad:
        _say(f"flashcore bench: {len(bad)} row(s) failed (mismatch or error): see the table")
    return 1 if bad else 0

"""``flashcore tune``: run EvoTuner on the GPU and record what it finds.

Examples (on the GPU)::

    flashcore tune --shape 4,32,2048,128 --causal            # one shape -> user cache
    flashcore tune --suite all --write-table flashcore/tuning/tables/h100.json
    flashcore tune --suite mission --compare-grid --json evidence.json

Each problem (deduplicated by its bucketed :class:`~flashcore.tuning.key.ProblemKey`) is tuned
with the heuristic default in the first population, so the recorded config is never slower than
the heuristic as measured. Results go to the user cache (unless ``--no-cache``), optionally to a
shipped-table file (``--write-table``) and a JSON report (``--json``). ``--compare-grid`` also
measures the exhaustive grid and prints the evidence table: EvoTuner's best against the grid's
best, and the evaluations each needed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "main", "resource_gate"]

SUITES = ("mission", "sweep", "gqa", "headdims", "all")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..info import parse_shape

    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--suite", choices=SUITES, help="tune every shape of a bench suite")
    what.add_argument("--shape", type=parse_shape, help="B,Hq,Sq,D[,Hkv[,Sk]]: tune one shape")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                   help="dtype for --shape (suites carry their own)")
    p.add_argument("--causal", action="store_true",
                   help="causal, for --shape; with --suite, only the suite's causal shapes")
    p.add_argument("--head-dims", type=int, nargs="+", default=None, metavar="D",
                   help="with --suite: only the suite's shapes with these head dims (retune "
                        "what a kernel change touched; --write-table keeps the other entries)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, metavar="S",
                   help="with --suite: only the suite's shapes with these query lengths")
    p.add_argument("--backend", choices=("triton", "cuda", "both"), default="triton",
                   help="kernel(s) to tune; 'both' lets backend='auto' choose the faster")
    p.add_argument("--budget", type=int, default=None, metavar="N",
                   help="evaluations per problem (default: 25%% of the grid, at least 8)")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="wall-clock budget per problem and backend")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (reproducible search)")
    p.add_argument("--confirm", type=int, default=0, metavar="N",
                   help="after the search, time the heuristic, the best and the runner-up "
                        "again in N interleaved rounds and keep the lowest median (0: off; "
                        "under a power cap, one back-to-back timing per config wanders by a "
                        "few percent)")
    p.add_argument("--try", dest="try_configs", nargs="+", default=[], metavar="NAME",
                   help="configs to measure in the first generation, next to the heuristic "
                        "(short names as the report prints them: h64n64w8s2P, m64n64w4s3t, "
                        "w8n64s2g4); a name outside a problem's valid grid is skipped there")
    p.add_argument("--population", type=int, default=None, help="EvoTuner population size")
    p.add_argument("--reps", type=int, default=100, help="timed graph replays per evaluation")
    p.add_argument("--gate", choices=("auto", "ptxas", "predicate"), default="auto",
                   help="resource gate before any GPU time: ptxas (flashcore.tools.gate), the "
                        "config space's predicate only, or auto (ptxas when available)")
    p.add_argument("--write-table", type=Path, default=None, metavar="PATH",
                   help="also merge the results into a shipped-table JSON file")
    p.add_argument("--no-cache", action="store_true", help="do not write the user cache")
    p.add_argument("--compare-grid", action="store_true",
                   help="also measure the exhaustive grid; print EvoTuner vs grid evidence")
    p.add_argument("--replay-seeds", type=int, default=10, metavar="N",
                   help="with --compare-grid: rerun EvoTuner with N more seeds on the grid's "
                        "measurements (no GPU time) to show how often it gets within 3%%")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write a JSON report")
    p.add_argument("--resume", action="store_true",
                   help="skip problems already tuned (current fingerprint) in the --write-table "
                        "file, else the user cache; keep an existing --json report's problems")
    p.add_argument("--stop-after", type=float, default=None, metavar="S",
                   help="start no new problem after S seconds (finish cleanly inside a job's "
                        "time limit; continue with --resume)")
    p.add_argument("--precompile", action="store_true",
                   help="compile every valid config of every problem class, and run the "
                        "resource gate on it, in parallel worker processes while the search "
                        "measures (cuts a suite's wall time several-fold)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# -- gate hook ---------------------------------------------------------------------------------


def resource_gate(kind: str, backend: str, problem: Any) -> tuple[Callable | None, str]:
    """(gate or None, description). The hook for the ptxas resource gate.

    Contract expected from ``flashcore.tools.gate``::

        make_config_gate(backend: str, *, head_dim: int, dtype: str, causal: bool)
            -> Callable[[config], bool]   # compile + ptxas check, no GPU time; True = keep

    The config space's prune predicate always runs first, gate or not.
    """
    if kind == "predicate":
        return None, "config space predicate"
    try:
        from ..tools.gate import make_config_gate  # type: ignore[attr-defined]
    except (ImportError, AttributeError) as e:
        if kind == "ptxas":
            raise SystemExit(
                "flashcore tune: --gate ptxas needs flashcore.tools.gate.make_config_gate "
                f"({type(e).__name__}: {e})"
            ) from None
        return None, "config space predicate (ptxas gate not available)"
    gate = make_config_gate(
        backend, head_dim=problem.d, dtype=problem.dtype, causal=problem.causal
    )
    return gate, "config space predicate + ptxas resource gate"


# -- problems ----------------------------------------------------------------------------------


def _problems(args: argparse.Namespace) -> list[Any]:
    from .fitness import Problem

    if args.shape is not None:
        for flag, given in (("--head-dims", args.head_dims), ("--seq-lens", args.seq_lens)):
            if given:
                raise SystemExit(f"flashcore tune: {flag} filters a --suite; with --shape the "
                                 "shape says it")
        b, hq, sq, d, hkv, sk = args.shape
        return [Problem(b, hq, hkv, sq, sk, d, args.dtype, bool(args.causal))]
    try:
        from ..bench.suites import suite_cases
    except ImportError as e:
        raise SystemExit(f"flashcore tune: --suite needs flashcore.bench.suites ({e})") from None
    probs = [Problem.from_case(c) for c in suite_cases(args.suite)]
    # Retune what a kernel change touched (e.g. the short causal cells); --write-table and the
    # cache keep every other entry.
    keep = {"head dim": (args.head_dims, lambda p: p.d in args.head_dims),
            "query length": (args.seq_lens, lambda p: p.sq in args.seq_lens),
            "causal mask": (args.causal, lambda p: p.causal)}
    for given, ok in keep.values():
        if given:
            probs = [p for p in probs if ok(p)]
    if not probs:
        asked = ", ".join(f"{what} in {given}" if given is not True else what
                          for what, (given, _) in keep.items() if given)
        raise SystemExit(f"flashcore tune: suite {args.suite!r} has no shape with {asked}")
    return probs


def _fmt_us(t: float | None) -> str:
    return f"{t:8.2f}" if t is not None else "       -"


def _describe(cfg: Any) -> str:
    if cfg is None:
        return "-"
    short = getattr(cfg, "short", None)
    return short() if callable(short) else repr(cfg)


def _env(gpu: str, cc: str) -> dict[str, Any]:
    import torch

    from .cache import _dist_version, fingerprint

    try:
        from ..bench.env import git_commit

        commit = git_commit()
    except ImportError:
        commit = "unknown"
    return {
        "gpu": gpu, "cc": cc, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _dist_version("triton"), "fingerprint": fingerprint(), "git_commit": commit,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# -- main --------------------------------------------------------------------------------------


def _confirm(rounds: int, fitness: Any, res: Any, cmp: Any, heur: Any) -> Any:
    """:func:`~flashcore.tuning.evo.confirm_picks` over the two fastest configs the search (and
    the grid, with --compare-grid) measured, plus the heuristic; None when off or nothing
    passed."""
    if not rounds:
        return None
    from .evo import confirm_picks

    pool = dict(res.measured())
    if cmp is not None:
        for c, t in cmp.grid.measured().items():
            pool.setdefault(c, t)
    if not pool:
        return None
    ranked = sorted(pool, key=pool.__getitem__)
    cands = ranked[:2] + ([heur] if heur in pool else [])
    return confirm_picks(fitness, cands, rounds)


def _tried_configs(names: list[str], backend: str) -> list[Any]:
    """The ``--try`` names that are configs of ``backend`` (the others belong to the other
    backend of ``--backend both``; :func:`main` has checked that each names one of them)."""
    if backend == "triton":
        from ..backends.triton.config import TritonFwdConfig as cls
    else:
        from ..backends.cuda.config import CudaFwdConfig as cls
    out = []
    for n in names:
        try:
            out.append(cls.from_short(n))
        except ValueError:
            pass
    return out


def _check_try_names(names: list[str], backend: str) -> str | None:
    """Why a ``--try`` name is unusable with ``--backend`` (None when all are fine)."""
    backends = ("triton", "cuda") if backend == "both" else (backend,)
    for n in names:
        if not any(_tried_configs([n], b) for b in backends):
            return (f"flashcore tune: --try {n!r} is not a config name of backend "
                    f"{' or '.join(backends)} (Triton: m64n64w4s3t, h64n128w8s2oP; CUDA: "
                    "w8n64s2g4; the names `flashcore tune` and `flashcore info` print)")
    return None


def main(args: argparse.Namespace) -> int:
    import torch

    why = _check_try_names(getattr(args, "try_configs", []), args.backend)
    if why is None and getattr(args, "confirm", 0) < 0:
        why = f"flashcore tune: --confirm must be >= 0 rounds, got {args.confirm}"
    if why is not None:
        print(why, file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            "flashcore tune: no CUDA GPU (torch.cuda.is_available() is False). Tuning times "
            "candidate configs on the GPU; without one, dispatch uses the shipped tables and "
            "the heuristic (see `flashcore info --shape ...`).",
            file=sys.stderr,
        )
        return 2
    try:
        return _run(args)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2


def _already_tuned(args: argparse.Namespace) -> set[str]:
    """Keys with a current entry where this run writes (the table if --write-table, else the
    user cache): skipped by --resume, so a long tuning can span several limited jobs."""
    from .cache import TuningCache, default_cache, fingerprint, read_json

    fp = fingerprint()
    if args.write_table is not None:
        data, _ = read_json(args.write_table)
        entries = data.get("entries", {}) if isinstance(data, dict) else {}
    else:
        cache: TuningCache = default_cache()
        entries = cache.entries()
    return {
        k for k, e in entries.items()
        if isinstance(e, dict) and e.get("fingerprint", fp) == fp
    }


def _run(args: argparse.Namespace) -> int:
    import torch

    from .space import space_for

    t_start = time.perf_counter()
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    gpu, cc, sms = props.name, f"{props.major}.{props.minor}", props.multi_processor_count
    backends = ("triton", "cuda") if args.backend == "both" else (args.backend,)
    progress = not args.quiet

    # One tuning per bucketed key: the first problem of a bucket stands for it.
    jobs: dict[str, tuple[Any, str]] = {}
    for prob in _problems(args):
        for b in backends:
            jobs.setdefault(prob.key(gpu, cc, b).to_str(), (prob, b))
    skipped = 0
    if args.resume:
        done = _already_tuned(args)
        skipped = sum(1 for k in jobs if k in done)
        jobs = {k: v for k, v in jobs.items() if k not in done}
    print(f"flashcore tune: {len(jobs)} problem(s) on {gpu} (cc {cc})"
          + (f", {skipped} already tuned (--resume)" if skipped else ""), file=sys.stderr)

    report: dict[str, dict[str, Any]] = _previous_report(args) if args.resume else {}
    prefetcher = None
    if args.precompile:
        from .fitness import Prefetcher

        prefetcher = Prefetcher(cc, gate=args.gate != "predicate")
        queued = sum(
            prefetcher.submit(prob, b, space_for(b, prob.d, prob.dtype).valid_configs())
            for prob, b in jobs.values()
        )
        print(f"flashcore tune: {queued} compile + gate jobs queued on {prefetcher.workers} "
              "worker processes", file=sys.stderr)
    try:
        return _tune_all(args, jobs, report, prefetcher, t_start, gpu, cc, sms, progress)
    finally:
        if prefetcher is not None:
            prefetcher.close()


def _tune_all(
    args: argparse.Namespace, jobs: dict[str, tuple[Any, str]], report: dict[str, dict[str, Any]],
    prefetcher: Any, t_start: float, gpu: str, cc: str, sms: int, progress: bool,
) -> int:
    import torch

    from .cache import default_cache, make_entry
    from .dispatch import heuristic_config
    from .evo import EvoTuner, FatalFitnessError, compare_search, summarize_replay
    from .fitness import GpuFitness
    from .space import space_for
    from .tables import write_table

    n_written = failed = 0
    status = 0
    for keystr, (prob, backend) in jobs.items():
        if args.stop_after is not None and time.perf_counter() - t_start > args.stop_after:
            print(f"flashcore tune: --stop-after {args.stop_after:g} s reached; "
                  f"{len(jobs) - n_written - failed} problem(s) left for a --resume run",
                  file=sys.stderr)
            break
        key = prob.key(gpu, cc, backend)
        space = space_for(backend, prob.d, prob.dtype)
        grid_size = len(space.valid_configs())
        label = f"{prob.label()} [{backend}]"
        if grid_size == 0:
            print(f"  skip {label}: no valid config (unsupported dtype or head dim)",
                  file=sys.stderr)
            continue
        heur = heuristic_config(key, prob.batch_heads, prob.sq, prob.sk, sms)
        gate, gate_desc = resource_gate(args.gate, backend, prob)
        if prefetcher is not None:
            gate = prefetcher.wrap_gate(gate, prob, backend)
        tries = []
        for cfg in _tried_configs(args.try_configs, backend):
            if space.contains(cfg):
                tries.append(cfg)
            else:
                print(f"  {label}: --try {cfg.short()} is not in the valid grid here; skipped",
                      file=sys.stderr)
        kw = dict(population=args.population, max_evals=args.budget,
                  max_seconds=args.max_seconds, seeds=[heur, *tries])
        try:
            fitness = GpuFitness(prob, backend, reps=args.reps)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for the inputs: next problem
            print(f"  {label}: cannot set up ({type(e).__name__}: {e}); skipped",
                  file=sys.stderr)
            failed += 1
            torch.cuda.empty_cache()
            continue
        cmp = conf = None
        try:
            if args.compare_grid:
                cmp = compare_search(
                    space, fitness, label=label, seed=args.seed, gate=gate, progress=progress,
                    replay_seeds=range(args.seed + 1, args.seed + 1 + args.replay_seeds), **kw,
                )
                res = cmp.evo
            else:
                res = EvoTuner(
                    space, fitness, seed=args.seed, gate=gate, progress=progress, label=label,
                    **kw,
                ).run()
            conf = _confirm(args.confirm, fitness, res, cmp, heur)
        except FatalFitnessError as e:
            print(f"flashcore tune: {label}: {e}", file=sys.stderr)
            status = 1
            break
        finally:
            # Per-config correctness/timing details for the report, then free the inputs.
            details = {space.describe(c): d for c, d in fitness.details.items()}
            del fitness
            torch.cuda.empty_cache()
        measured = res.measured()
        best, best_us, method = res.best, res.best_us, "evo"
        if cmp is not None and cmp.grid.best_us is not None and (
            best_us is None or cmp.grid.best_us < best_us
        ):
            # The grid measured everything: record its best (it is what a user would want).
            best, best_us, method = cmp.grid.best, cmp.grid.best_us, "grid"
        heur_us = measured.get(heur)
        if heur_us is None and cmp is not None:
            heur_us = cmp.grid.measured().get(heur)
        if conf is not None and conf.best is not None:
            # The interleaved re-timing decides, and both times come from it (the heuristic's
            # from the search only if it failed a round there).
            best, best_us, method = conf.best, conf.best_us, method + "+confirm"
            heur_us = conf.median_us(heur) or heur_us
        row: dict[str, Any] = {
            "key": keystr, "problem": prob.to_dict(), "label": label, "backend": backend,
            "gate": gate_desc, "heuristic": space.to_dict(heur), "heuristic_us": heur_us,
            "best": space.to_dict(best) if best is not None else None, "best_us": best_us,
            "evo": res.to_dict(space), "details": details,
        }
        if conf is not None:
            row["confirm"] = conf.to_dict(space)
        if cmp is not None:
            row["comparison"] = cmp.to_dict(space)
            row["comparison"].pop("evo")  # already under "evo"
        report[keystr] = row
        if best is None:
            failed += 1
            print(f"  {label}: no config passed the correctness check", file=sys.stderr)
        else:
            entry = make_entry(
                backend, space.to_dict(best), best_us, heuristic_time_us=heur_us, method=method,
                evaluations=res.evaluations + (cmp.grid.evaluations if cmp is not None else 0),
                grid_size=grid_size,
            )
            # Saved problem by problem: a job killed at its time limit keeps what it finished.
            if not args.no_cache:
                default_cache().put(keystr, entry)
            if args.write_table is not None:
                write_table(args.write_table, gpu, cc, {keystr: entry})
            n_written += 1
            speedup = f"{heur_us / best_us:5.2f}x" if heur_us else "    -"
            confirmed = f", confirmed over {conf.rounds} rounds" if conf is not None else ""
            print(
                f"  {label:44s} heuristic {_describe(heur):12s}{_fmt_us(heur_us)} us  best "
                f"{_describe(best):12s}{_fmt_us(best_us)} us  {speedup}  "
                f"{res.evaluations}/{grid_size} evals, {res.seconds:.0f} s{confirmed}",
                flush=True,
            )
            if cmp is not None:
                print(f"  {'':44s} replay: {summarize_replay(cmp)}", flush=True)
        if args.json is not None:
            _write_report(args, gpu, cc, report)

    if n_written and not args.no_cache:
        print(f"flashcore tune: {n_written} entries -> {default_cache().path}", file=sys.stderr)
    if n_written and args.write_table is not None:
        print(f"flashcore tune: {n_written} entries -> {args.write_table}", file=sys.stderr)
    if args.compare_grid:
        _print_evidence(list(report.values()))
    if args.json is not None:
        _write_report(args, gpu, cc, report)
        print(f"flashcore tune: report -> {args.json}", file=sys.stderr)
    return status or (1 if failed else 0)


def _previous_report(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Problems of an earlier report at --json (so a --resume run's report covers them too)."""
    from .cache import read_json

    if args.json is None:
        return {}
    data, _ = read_json(args.json)
    rows = data.get("problems") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        return {}
    return {r["key"]: r for r in rows if isinstance(r, dict) and isinstance(r.get("key"), str)}


def _write_report(
    args: argparse.Namespace, gpu: str, cc: str, report: dict[str, dict[str, Any]]
) -> None:
    from .cache import atomic_write_json

    atomic_write_json(args.json, {
        "env": _env(gpu, cc), "args": _jsonable_args(args), "problems": list(report.values()),
    })


def _jsonable_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k != "func"}


def _print_evidence(report: list[dict[str, Any]]) -> None:
    """The closing note's table: EvoTuner's best vs the grid's best and evaluations used."""
    rows = [r for r in report if "comparison" in r]
    if not rows:
        return
    print()
    print("| problem | grid best (us) | evo best (us) | gap | gap, same timing | evo evals / "
          "grid | evals to best | replay seeds within 3% |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["comparison"]
        gap = f"{c['gap_pct']:+.1f}%" if c["gap_pct"] is not None else "-"
        same = f"{c['gap_same_pct']:+.1f}%" if c["gap_same_pct"] is not None else "-"
        ev = r["evo"]
        print(
            f"| {r['label']} | {c['grid_best_name']} {_fmt_us(c['grid_best_us']).strip()} | "
            f"{c['evo_best_name']} {_fmt_us(c['evo_best_us']).strip()} | {gap} | {same} | "
            f"{ev['evaluations']}/{c['grid_size']} ({100 * ev['evals_fraction']:.0f}%) | "
            f"{ev['evals_to_best']} | {c['replay_hits']}/{len(c['replay'])} |"
        )

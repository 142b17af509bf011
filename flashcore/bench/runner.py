"""The benchmark loop: for each case, inputs and reference once; per provider setup, first
call, correctness check, fused check and prepared replays; then the timed rounds, interleaved
across the providers (``RunConfig.rounds``); the wall time, in rounds interleaved the same
way; derived metrics.

A row is timed only after its output matched the reference; every other outcome is a status
with a reason (``unsupported``, ``mismatch``, ``unfused-fallback``, ``error``, ``skipped``),
never a silent gap or a number for a different kernel.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

from .check import Reference, compare, make_reference, sample_rows
from .gpustate import GpuStateSampler, summarize_samples
from .providers import Provider, UnfusedFallback, Unsupported
from .suites import Case
from .timing import Replays, Timer, TimingStats, cold_l2_sets

__all__ = [
    "BenchResult",
    "Row",
    "RunConfig",
    "STATUSES",
    "derive_metrics",
    "make_inputs",
    "round_reps",
    "run_bench",
]

OK, UNSUPPORTED, MISMATCH, FALLBACK, ERROR, SKIPPED = (
    "ok", "unsupported", "mismatch", "unfused-fallback", "error", "skipped"
)
STATUSES = (OK, UNSUPPORTED, MISMATCH, FALLBACK, ERROR, SKIPPED)
BASELINE = "sdpa"  # ratios are against SDPA's default dispatch, measured in the same run


@dataclass
class Row:
    """One (case, provider) result. Times are per call in microseconds."""

    case: Case
    provider: str
    status: str
    reason: str = ""
    max_err: float | None = None  # vs the reference on the checked rows
    tol: float | None = None
    first_call_s: float | None = None  # includes compilation (Flex, Triton) on first use
    n_sets: int = 0  # rotating input sets
    l2_cold: bool | None = None  # whether the sets' total exceeded the L2
    gpu: TimingStats | None = None
    wall: TimingStats | None = None
    tflops: float | None = None
    pct_peak: float | None = None
    speedup_vs_sdpa: float | None = None  # SDPA default's GPU median / this one (> 1: faster)
    wall_speedup_vs_sdpa: float | None = None  # the same for eager wall time
    # The card during the timed replays (gpustate.summarize_samples: SM clock, power,
    # temperature, clock-event reasons); None where NVML could not be read.
    gpu_state: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("case")
        d = {**self.case.to_dict(), "flops": self.case.flops(), **d}
        d["gpu"] = self.gpu.to_dict() if self.gpu else None
        d["wall"] = self.wall.to_dict() if self.wall else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        names = set(cls.__dataclass_fields__) - {"case"}
        kw = {k: v for k, v in d.items() if k in names}
        kw["gpu"] = TimingStats.from_dict(d["gpu"]) if d.get("gpu") else None
        kw["wall"] = TimingStats.from_dict(d["wall"]) if d.get("wall") else None
        return cls(case=Case.from_dict(d), **kw)


@dataclass
class BenchResult:
    rows: list[Row]
    env: dict = field(default_factory=dict)  # GPU, versions, commit, date (see .env)
    settings: dict = field(default_factory=dict)  # how it was measured
    peak_tflops: float | None = None  # measured bf16 matmul, same run


ORDERS = ("registry", "reverse", "alternate")  # RunConfig.order


@dataclass
class RunConfig:
    reps: int = 100  # timed repetitions (graph replays) per row
    wall_reps: int = 200  # eager wall-time calls per row, at most ...
    wall_budget_s: float = 0.25  # ... and about this long: the calls queue up on the GPU
    min_wall_reps: int = 20
    check_rows: int = 128  # query rows compared with the reference
    seed: int = 0
    min_sets: int = 3  # rotating input sets, at least ...
    max_sets: int = 512  # ... and at most (tiny problems would need thousands to fill the L2)
    max_seconds_per_case: float | None = None  # skip a (case, provider) projected to be slower
    # Which provider runs first in each case: "registry" (SDPA first), "reverse", or
    # "alternate" (registry order on odd cases, reversed on even ones: a cell keeps one order,
    # so to time every cell both ways, run once with "registry" and once with "reverse"). Rows
    # are reported in registry order whatever the order they ran in. A provider timed right
    # after another may find the card in a different state (clocks, power, temperature).
    order: str = "registry"
    gap_s: float = 0.0  # host sleep before each provider's timed round (the card idles, cools)
    # A case's providers are timed in ``rounds`` interleaved rounds of ``reps / rounds``
    # repetitions, the provider order reversing every round (A B, B A, A B, ...), and each
    # provider's statistics pool its rounds. Under a power cap the clock depends on the last
    # ~second of work, so a provider timed right after another one inherits its clock (NVML on
    # the H200: up to 300 MHz apart, back to back); interleaved, every provider is timed
    # across the same stretch of the card's state. The price: every provider of a case holds
    # its prepared graphs (their memory pools, workspaces) until the rounds are done. The
    # eager wall time is then taken in interleaved rounds too (after every graph is freed).
    # 1: the previous method, each provider set up, timed and torn down in turn.
    rounds: int = 1

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if not self.gap_s >= 0:
            raise ValueError(f"gap_s must be >= 0 seconds, got {self.gap_s!r}")
        if not (isinstance(self.rounds, int) and 1 <= self.rounds <= self.reps):
            raise ValueError(f"rounds must be an int in [1, reps={self.reps}], "
                             f"got {self.rounds!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def make_inputs(
    case: Case, device: torch.device, n_sets: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``n_sets`` fresh random-normal (q [B, Hq, Sq, D], k, v [B, Hkv, Sk, D]) sets."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(h: int, s: int) -> torch.Tensor:
        return torch.randn(case.b, h, s, case.d, device=device, dtype=dtype, generator=gen)

    return [(rand(case.hq, case.sq), rand(case.hkv, case.sk), rand(case.hkv, case.sk))
            for _ in range(n_sets)]


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def _classify(e: Exception, caught: Sequence[warnings.WarningMessage]) -> tuple[str, str]:
    """(status, reason) for an exception raised while preparing or first calling a provider."""
    from flashcore import FlashCoreArgumentError

    if isinstance(e, Unsupported):
        return UNSUPPORTED, str(e)
    if isinstance(e, UnfusedFallback) or type(e).__name__ in (
        "FailOnRecompileLimitHit", "RecompileLimitExceeded"
    ):
        return FALLBACK, _first_line(e)
    if isinstance(e, FlashCoreArgumentError):
        # The message is a header line then one "  - problem" line per problem.
        lines = [ln.strip(" -") for ln in str(e).splitlines()[1:]] or [str(e)]
        return UNSUPPORTED, "; ".join(lines)[:300]
    if isinstance(e, ImportError):
        return UNSUPPORTED, f"backend not available ({type(e).__name__}: {_first_line(e)})"
    msg = str(e)
    if isinstance(e, RuntimeError) and ("No available kernel" in msg
                                        or "No viable backend" in msg):
        # SDPA pinned to a backend that rejects the input: its warnings say why.
        why = list(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught
                                 if str(w.message).strip()))
        return UNSUPPORTED, ("; ".join(why) or _first_line(e))[:300]
    if isinstance(e, NotImplementedError) or "NYI" in msg:
        return UNSUPPORTED, _first_line(e)
    return ERROR, f"{type(e).__name__}: {_first_line(e)}"


WALL_ROUNDS = 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Timing:
    """A (case, provider) between its check and its wall timing: the prepared replays and the
    samples and card states of the rounds timed so far."""

    row: Row
    prov: Provider
    calls: list
    replays: Replays | None = None
    samples: list[float] = field(default_factory=list)
    states: list = field(default_factory=list)  # gpustate.GpuSample, over every round


def _fail(row: Row, e: Exception, caught: Sequence[warnings.WarningMessage] = ()) -> None:
    row.status, row.reason = _classify(e, list(caught))
    row.gpu = row.wall = None
    if isinstance(e, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()


def _teardown(t: _Timing) -> None:
    """Tear the provider down and drop its calls. A teardown that raises (e.g. an asynchronous
    kernel fault surfacing at a sync) makes a so-far good row an error and does not stop the
    other providers' teardowns."""
    try:
        t.prov.teardown()
    except Exception as e:  # noqa: BLE001
        if t.row.status == OK:
            _fail(t.row, e)
    finally:
        t.calls = []


def _prepare_one(
    case: Case, prov: Provider, sets: list, ref: Reference, timer: Timer, cfg: RunConfig,
    device: torch.device, l2_cold: bool,
) -> _Timing:
    """Set up, run once, check against the reference, verify, prepare the timed replays.
    The provider stays set up when its replays are ready (``replays`` not None); otherwise
    its row says why and it is torn down."""
    t = _Timing(Row(case, prov.name, OK, n_sets=len(sets), l2_cold=l2_cold), prov, [])
    row = t.row
    label = f"{case.label()} {prov.name}"
    caught: list[warnings.WarningMessage] = []
    try:
        prov.setup(case, device)
        with prov.context():
            t.calls = [prov.closure(case, *s) for s in sets]
            # Poison (best effort): the caching allocator hands the next output-sized request
            # the block freed last, i.e. the previous provider's output on these same inputs,
            # the right answer. NaN there makes elements a kernel never writes fail the check.
            q0 = sets[0][0]
            torch.full_like(q0, float("nan"))
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = t.calls[0]()
                _sync(device)
            row.first_call_s = time.perf_counter() - t0
            chk = compare(out, ref)
            del out
            row.max_err, row.tol = chk.max_err, chk.tol
            if not chk.ok:
                row.status, row.reason = MISMATCH, chk.detail
            else:
                prov.verify(t.calls[0])
                est_us = timer.estimate_us(t.calls[0], label=label)
                # Warm-up (a few replays before each round), the graph-sizing pass, the
                # timed replays, the wall calls.
                projected_s = est_us * 1e-6 * (len(t.calls) * (cfg.reps + 5 + 3 * cfg.rounds)
                                               + cfg.wall_reps)
                if (cfg.max_seconds_per_case is not None
                        and projected_s > cfg.max_seconds_per_case):
                    row.status = SKIPPED
                    row.reason = (f"projected {projected_s:.0f} s > --max-seconds-per-case "
                                  f"{cfg.max_seconds_per_case:g} (one call ~{est_us:.0f} us)")
                else:
                    t.replays = timer.prepare_calls(t.calls, label=label)
    except Exception as e:  # noqa: BLE001 - one provider's failure must not end the run
        _fail(row, e, caught)
    if t.replays is None:
        _teardown(t)
    return t


def _time_round(t: _Timing, reps: int, sampler: GpuStateSampler | None) -> None:
    """One round of ``t``'s timed repetitions (warm-up first), samples and card state kept.
    In the provider's context: the CPU timer and the CUDA-events fallback run the calls
    eagerly here, and a backend pin must hold for them as it did for the check."""
    try:
        with t.prov.context():
            t.replays.warm_up()
            # The card is sampled over the timed repetitions only, not the warm-up that
            # follows an idle gap or another provider.
            with sampler.sampling() if sampler else nullcontext([]) as states:
                t.samples += t.replays.time(reps)
        t.states += states
    except Exception as e:  # noqa: BLE001
        _fail(t.row, e)
        t.replays.close()
        t.replays = None
        _teardown(t)


def _pool(t: _Timing) -> None:
    """Pool the rounds into the row's GPU time and close the replays (their graphs and
    memory go before any wall call); on failure the row says why and the provider is torn
    down."""
    try:
        try:
            t.row.gpu = t.replays.stats(t.samples)
            t.row.gpu_state = summarize_samples(t.states)
        finally:
            t.replays.close()  # before the wall calls, and even if the stats failed
            t.replays = None
    except Exception as e:  # noqa: BLE001
        _fail(t.row, e)
        _teardown(t)


def _wall_round(t: _Timing, timer: Timer, cfg: RunConfig, rounds: list) -> None:
    """One of a provider's WALL_ROUNDS rounds of eager calls, appended to ``rounds``."""
    try:
        # Enough wall reps for a median, but bounded in time: unsynchronised calls queue
        # up on the GPU, which must then run them all.
        wall_reps = int(cfg.wall_budget_s * 1e6 / max(t.row.gpu.median_us, 1e-3))
        wall_reps = max(cfg.min_wall_reps, min(cfg.wall_reps, wall_reps))
        per_round = max(1, wall_reps // WALL_ROUNDS)
        with t.prov.context():
            rounds.append(timer.time_wall(t.calls[0], reps=per_round,
                                          label=f"{t.row.case.label()} {t.prov.name}"))
    except Exception as e:  # noqa: BLE001
        _fail(t.row, e)
        _teardown(t)


def _finish(timings: Sequence[_Timing], timer: Timer, cfg: RunConfig) -> None:
    """Pool each provider's GPU rounds, then time the eager wall of all of them in
    interleaved rounds, tear down.

    Host time drifts with whatever else the machine runs (seen on the lent cards: medians of
    12-18 us, and 16 or 27 us for SDPA at the mission, for the same call run to run). Each
    provider gets WALL_ROUNDS short rounds and keeps its quietest; the rounds alternate
    between the providers (A B, B A, ...), so the ones compared faced the same conditions."""
    live = [t for t in timings if t.replays is not None]
    for t in live:
        _pool(t)
    live = [t for t in live if t.calls]
    walls: dict[int, list] = {id(t): [] for t in live}
    for r in range(WALL_ROUNDS):
        for t in live if r % 2 == 0 else live[::-1]:
            if t.calls:
                _wall_round(t, timer, cfg, walls[id(t)])
    for t in live:
        if t.calls:
            t.row.wall = min(walls[id(t)], key=lambda s: s.median_us)
            _teardown(t)  # the input sets are freed with the case


def round_reps(reps: int, rounds: int) -> list[int]:
    """``reps`` split into ``rounds`` near-equal parts (the first ones one larger)."""
    q, r = divmod(reps, rounds)
    return [q + (i < r) for i in range(rounds)]


def _tflops(case: Case, median_us: float) -> float:
    return case.flops() / median_us / 1e6


def derive_metrics(rows: list[Row], peak_tflops: float | None) -> None:
    """Fill TFLOP/s, % of peak and the ratios to SDPA default (same case, same run) in place."""
    base: dict[Case, Row] = {
        r.case: r for r in rows if r.provider == BASELINE and r.status == OK and r.gpu
    }
    for r in rows:
        if r.status != OK or r.gpu is None:
            continue
        r.tflops = _tflops(r.case, r.gpu.median_us)
        r.pct_peak = 100.0 * r.tflops / peak_tflops if peak_tflops else None
        b = base.get(r.case)
        if b is not None:
            r.speedup_vs_sdpa = b.gpu.median_us / r.gpu.median_us
            if b.wall and r.wall:
                r.wall_speedup_vs_sdpa = b.wall.median_us / r.wall.median_us


def _progress_line(i: int, n: int, row: Row, t_start: float) -> str:
    head = f"[{i:>{len(str(n))}}/{n}] {row.case.label():<32} {row.provider:<17}"
    if row.status == OK and row.gpu is not None:
        tf = _tflops(row.case, row.gpu.median_us)
        body = f"{row.gpu.median_us:10.1f} us {tf:7.1f} TFLOP/s"
        if row.wall is not None:
            body += f"  wall {row.wall.median_us:8.1f} us"
    else:
        body = f"{row.status}: {row.reason[:90]}"
    first = (f"  (first call {row.first_call_s:.1f} s)"
             if row.first_call_s and row.first_call_s >= 1.0 else "")
    return f"{head} {body}{first}  [{time.perf_counter() - t_start:.0f} s]"


def _settings(cfg: RunConfig, timer: Timer, l2: int, t_start: float, done: bool) -> dict:
    return {
        **cfg.to_dict(), "timer": timer.method, "l2_bytes": l2, "baseline": BASELINE,
        "elapsed_s": round(time.perf_counter() - t_start, 1), "complete": done,
        # The wall rounds alternate across a case's providers whenever the GPU rounds do.
        "wall_rounds": "interleaved" if cfg.rounds > 1 else "per provider",
        "flops": "4*B*Hq*D*visible_pairs; causal Sq==Sk: half of dense",
        "check": "max|out-ref| <= 2*max|ref_lowp-ref| + 4*eps(dtype)*max|ref| on sampled rows",
    }


def provider_order(n: int, order: str, case_index: int) -> list[int]:
    """Indices of ``n`` providers in the order they run on case ``case_index`` (1-based)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    fwd = list(range(n))
    if order == "reverse" or (order == "alternate" and case_index % 2 == 0):
        return fwd[::-1]
    return fwd


def _run_case(
    case: Case, providers: Sequence[Provider], sets: list, ref: Reference, timer: Timer,
    cfg: RunConfig, device: torch.device, l2_cold: bool, sampler: GpuStateSampler | None,
    order: list[int], done: Callable[[Row], None],
) -> dict[int, _Timing]:
    """Every provider of one case, in ``order``; ``done(row)`` as each row is final."""

    def time_round(t: _Timing, reps: int) -> None:
        if t.replays is not None:
            if cfg.gap_s > 0:
                time.sleep(cfg.gap_s)
            _time_round(t, reps, sampler)

    timings: dict[int, _Timing] = {}
    if cfg.rounds == 1:
        # One provider at a time: only one holds its graphs and workspaces.
        for j in order:
            timings[j] = _prepare_one(case, providers[j], sets, ref, timer, cfg, device, l2_cold)
            time_round(timings[j], cfg.reps)
            _finish([timings[j]], timer, cfg)
            done(timings[j].row)
        return timings
    for j in order:
        timings[j] = _prepare_one(case, providers[j], sets, ref, timer, cfg, device, l2_cold)
    for r, reps in enumerate(round_reps(cfg.reps, cfg.rounds)):
        for j in order if r % 2 == 0 else order[::-1]:
            time_round(timings[j], reps)
    _finish([timings[j] for j in order], timer, cfg)
    for j in order:
        done(timings[j].row)
    return timings


def run_bench(
    cases: Sequence[Case],
    providers: Sequence[Provider],
    timer: Timer,
    *,
    device: torch.device,
    config: RunConfig | None = None,
    progress: Callable[[str], None] | None = None,
    checkpoint: Callable[[BenchResult], None] | None = None,
    sampler: GpuStateSampler | None = None,
) -> BenchResult:
    """Run every provider on every case. Progress: one line per (case, provider).

    ``checkpoint`` gets the result so far after each case (``settings["complete"]`` False), so
    a run killed by a time limit still leaves its finished cases on disk. ``sampler`` records
    the card's clock, power and temperature during each row's timed replays."""
    cfg = config or RunConfig()
    say = progress or (lambda s: None)
    t_start = time.perf_counter()
    rows: list[Row] = []
    with torch.no_grad():
        peak = timer.peak_tflops()
        say(f"measured bf16 matmul peak: {peak:.1f} TFLOP/s ({timer.method})")
        l2 = timer.l2_bytes()
        for i, case in enumerate(cases, 1):
            n_sets = min(cold_l2_sets(case.input_bytes(), l2, cfg.min_sets), cfg.max_sets)
            sets = make_inputs(case, device, n_sets, cfg.seed + i)
            ref = make_reference(*sets[0], case.causal,
                                 sample_rows(case.sq, cfg.check_rows, cfg.seed + i))
            timings = _run_case(case, providers, sets, ref, timer, cfg, device,
                                n_sets * case.input_bytes() > l2, sampler,
                                provider_order(len(providers), cfg.order, i),
                                lambda row, i=i: say(_progress_line(i, len(cases), row,
                                                                    t_start)))
            rows.extend(timings[j].row for j in sorted(timings))
            del sets, ref
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if checkpoint is not None and i < len(cases):
                derive_metrics(rows, peak)
                checkpoint(BenchResult(list(rows), {}, _settings(cfg, timer, l2, t_start, False),
                                       peak))
    derive_metrics(rows, peak)
    return BenchResult(rows=rows, env={}, settings=_settings(cfg, timer, l2, t_start, True),
                       peak_tflops=peak)

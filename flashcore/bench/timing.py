"""Timing methodology: CUDA-graph replay with a cold L2, eager wall time, the matmul peak.

What is measured, precisely:

- **GPU time** (:func:`time_cuda_graph`): one CUDA graph holds ``passes`` passes over the
  rotating input sets (one call per set per pass); calls long enough on their own get one
  single-call graph per set, replayed in rotation. Each replay is bracketed by CUDA events on
  the replaying stream; the per-call time of a replay is its event time divided by the calls in
  the graph. Graph replay removes the CPU launch overhead (what remains is the GPU's
  kernel-to-kernel gap inside a graph, ~1 us); rotating through input sets whose total exceeds
  the L2 means each call reads its inputs from HBM, as in a model where the previous layer
  evicted them. Replays are enqueued back to back and synchronised once at the end, so the
  stream stays busy and the events time the GPU, not the host.
- **Eager wall time** (:func:`time_eager_wall`): ``time.perf_counter`` around each Python
  call, with no synchronisation inside the loop: the host time one call costs the caller
  (Python, argument checks, dispatch, launch). The GPU runs asynchronously, so this is what an
  eager loop pays per call when it is launch-bound (small shapes); when the GPU time is larger,
  the loop runs at the GPU time instead. The device is synchronised before the first timed call
  so the launch queue starts empty.
- **Peak** (:func:`measure_matmul_peak_tflops`): a large bf16 matmul of random data timed by
  the same graph timer, so "% of peak" is against what this card reaches in this run (clocks,
  power limit), not a datasheet number.

Statistics are per call over the repetitions: median, p10, p90 (linear interpolation between
order statistics, numpy's default), mean, min.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch

__all__ = [
    "CpuWallTimer",
    "CudaGraphTimer",
    "Timer",
    "Replays",
    "TimingStats",
    "cold_l2_sets",
    "measure_matmul_peak_tflops",
    "prepare_cuda_events",
    "prepare_cuda_graph",
    "stats_from_samples",
    "time_cuda_graph",
    "time_eager_wall",
]

# Hopper's L2 (50 MiB on H100 SXM); used only when torch cannot report the device's.
_DEFAULT_L2_BYTES = 50 * 2**20


@dataclass
class TimingStats:
    """Per-call times in microseconds over ``reps`` repetitions of ``calls_per_rep`` calls."""

    median_us: float
    p10_us: float
    p90_us: float
    mean_us: float
    min_us: float
    reps: int
    calls_per_rep: int
    method: str = ""  # "cuda-graph", "cuda-events", "wall", ...: how the samples were taken

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TimingStats:
        return cls(**d)


def stats_from_samples(
    samples_us: Sequence[float], calls_per_rep: int, method: str = ""
) -> TimingStats:
    """Per-call statistics from one sample per repetition.

    Args:
        samples_us: [reps] time of each whole repetition in microseconds; a repetition is
            ``calls_per_rep`` calls (e.g. one graph replay), so a call took sample / calls.
        calls_per_rep: calls in each repetition (>= 1).
    """
    if calls_per_rep < 1:
        raise ValueError(f"calls_per_rep must be >= 1, got {calls_per_rep}")
    if len(samples_us) == 0:
        raise ValueError("need at least one sample")
    x = np.asarray(samples_us, dtype=np.float64) / calls_per_rep
    if not np.all(np.isfinite(x)):
        raise ValueError("samples must be finite")
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return TimingStats(
        median_us=float(p50), p10_us=float(p10), p90_us=float(p90), mean_us=float(x.mean()),
        min_us=float(x.min()), reps=len(x), calls_per_rep=int(calls_per_rep), method=method,
    )


class Replays:
    """Prepared, timed repetitions of one set of calls, sampled in one go or in several rounds
    (the bench interleaves the providers of a case round by round, so each provider is timed
    across the same stretch of the card's clock and power state).

    ``rep(reps)`` runs ``reps`` repetitions and returns each one's time in microseconds (one
    repetition = ``calls_per_rep`` calls); ``warm()`` runs one untimed repetition. The calls
    run eagerly under the CUDA-events fallback and the CPU timer, so whatever context the calls
    need (a provider's backend pin) must be entered around sampling, not only around the
    preparation. A failure while sampling is the caller's (prepared graphs do not fall back to
    events then: an error in a replay is usually sticky for the whole CUDA context).
    """

    def __init__(self, rep: Callable[[int], list[float]], warm: Callable[[], None],
                 calls_per_rep: int, method: str, warmup: int) -> None:
        self._rep, self._warm = rep, warm
        self.calls_per_rep, self.method, self.warmup = calls_per_rep, method, warmup

    def warm_up(self) -> None:
        """``warmup`` untimed repetitions: clocks, instruction caches, whatever ran before."""
        if self._warm is None:
            raise RuntimeError("these replays were closed")
        for _ in range(self.warmup):
            self._warm()

    def time(self, reps: int) -> list[float]:
        """``reps`` timed repetitions, no warm-up: [reps] times of whole repetitions in us."""
        if self._rep is None:
            raise RuntimeError("these replays were closed")
        return self._rep(reps)

    def sample(self, reps: int) -> list[float]:
        """:meth:`warm_up`, then :meth:`time` ``reps``."""
        self.warm_up()
        return self.time(reps)

    def stats(self, samples_us: Sequence[float]) -> TimingStats:
        return stats_from_samples(samples_us, self.calls_per_rep, self.method)

    def close(self) -> None:
        """Drop the graphs (their memory pools) now rather than when the object goes."""
        self._rep = self._warm = None


def cold_l2_sets(bytes_per_set: int, l2_bytes: int, min_sets: int = 3) -> int:
    """How many distinct input sets to rotate so that their total exceeds the L2.

    The smallest ``n >= min_sets`` with ``n * bytes_per_set > l2_bytes``: when set ``i`` comes
    round again, at least an L2's worth of other data has been read since.
    """
    if bytes_per_set <= 0:
        raise ValueError(f"bytes_per_set must be > 0, got {bytes_per_set}")
    if l2_bytes < 0 or min_sets < 1:
        raise ValueError(f"need l2_bytes >= 0 and min_sets >= 1, got {l2_bytes}, {min_sets}")
    return max(min_sets, l2_bytes // bytes_per_set + 1)


def _elapsed_us(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
    return start.elapsed_time(end) * 1e3  # elapsed_time is in milliseconds


def _capture(
    calls: Sequence[Callable[[], object]], passes: int, stream: torch.cuda.Stream, pool=None
) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        for _ in range(passes):
            for fn in calls:
                fn()  # outputs are freed at once; the graph's pool reuses their memory
    return graph


def _replay_times_us(graphs: Sequence[torch.cuda.CUDAGraph], reps: int) -> list[float]:
    """Time ``reps`` replays, cycling through ``graphs``, each bracketed by events."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        s.record()
        graphs[i % len(graphs)].replay()
        e.record()
    torch.cuda.synchronize()
    return [_elapsed_us(s, e) for s, e in zip(starts, ends, strict=True)]


def time_cuda_graph(
    calls: Sequence[Callable[[], object]],
    *,
    reps: int = 100,
    warmup: int = 3,
    min_graph_us: float = 200.0,
    max_calls_per_graph: int = 4096,
) -> TimingStats:
    """GPU time per call by CUDA-graph replay (see the module docstring): the graphs of
    :func:`prepare_cuda_graph`, ``warmup`` untimed replays, ``reps`` timed ones."""
    r = prepare_cuda_graph(calls, warmup=warmup, min_graph_us=min_graph_us,
                           max_calls_per_graph=max_calls_per_graph)
    try:
        return r.stats(r.sample(reps))
    finally:
        r.close()


def prepare_cuda_graph(
    calls: Sequence[Callable[[], object]],
    *,
    warmup: int = 3,
    min_graph_us: float = 200.0,
    max_calls_per_graph: int = 4096,
) -> Replays:
    """CUDA graphs of ``calls`` ready to replay (what :func:`time_cuda_graph` times).

    Two shapes of graph, by the duration of one call as a one-pass graph replays it (not as
    the first eager pass ran it: host work there can dwarf a short kernel):

    - short calls (< ``min_graph_us``): one graph of ``passes`` passes over all sets, sized so
      a replay lasts at least ``min_graph_us``; a sample is a replay / its calls.
    - long calls: one single-call graph per set, replayed in rotation; a sample is one call on
      the next set (the L2 is still cold), so 100 reps cost 100 calls rather than 100 passes.

    Args:
        calls: zero-argument closures, one per rotating input set; each launches one call.
        warmup: untimed replays before each sampling (clocks ramp, instruction caches fill).
        min_graph_us: shortest replay: long enough that the host stays ahead of the GPU and
            the events time the GPU only.
        max_calls_per_graph: bound on passes * len(calls) (graph size, capture time).
    """
    if not calls:
        raise ValueError("need at least one call")
    n = len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    # One eager call of each first, on the capture stream: compilation, autotuning, lazy
    # handles (cuBLAS/cuDNN workspaces) must not happen inside the capture.
    with torch.cuda.stream(side):
        start.record()
        for fn in calls:
            fn()
        end.record()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    eager_call_us = _elapsed_us(start, end) / n  # includes launch gaps: an upper bound

    # The eager pass is only an upper bound: host work per call (a launcher building TMA
    # descriptors for a new input set, a plan cache evicting) can make a 7 us kernel read
    # hundreds of us there, and a single-call graph then times the graph launch instead of the
    # kernel (seen in the H100 tuning runs: Hopper configs at the mission read 22 us, not 7).
    # So a call counts as long only if a one-pass graph says so too.
    graph = None
    one_pass_us = eager_call_us * n
    # Per call: no launcher's host work reaches 5 ms, so such a call is long by any measure
    # and the extra pass is skipped (it would cost 3 passes of it). Skipped only when the
    # call is also >= min_graph_us, so the short branch below always has its graph.
    if eager_call_us < max(5_000.0, min_graph_us):
        graph = _capture(calls, 1, side)
        one_pass_us = float(np.median(_replay_times_us([graph], 3)))
    if one_pass_us / n >= min_graph_us:
        del graph
        pool = torch.cuda.graph_pool_handle()  # outputs are never read: one pool serves all
        graphs = [_capture([fn], 1, side, pool) for fn in calls]
        calls_per_rep = 1
    else:
        # Sized from the one-pass graph's replay time, not the eager time, which includes the
        # launch overhead the graph removes and would undercount passes for tiny kernels.
        passes = max(1, math.ceil(min_graph_us / max(one_pass_us, 1e-3)))
        passes = min(passes, max(1, max_calls_per_graph // n))
        if passes > 1:
            del graph
            graph = _capture(calls, passes, side)
        graphs = [graph]
        calls_per_rep = passes * n
    turn = [0]  # warm-up replays rotate through the graphs, as the timed ones do

    def warm() -> None:
        graphs[turn[0] % len(graphs)].replay()
        turn[0] += 1

    return Replays(lambda reps: _replay_times_us(graphs, reps), warm, calls_per_rep,
                   "cuda-graph", warmup)


def time_cuda_events(
    calls: Sequence[Callable[[], object]], *, reps: int = 100, warmup: int = 3
) -> TimingStats:
    """Fallback for calls that cannot be captured in a graph: CUDA events around one eager
    pass over the sets. Includes launch gaps, so tiny kernels read slower than by graph."""
    r = prepare_cuda_events(calls, warmup=warmup)
    return r.stats(r.sample(reps))


def prepare_cuda_events(calls: Sequence[Callable[[], object]], *, warmup: int = 3) -> Replays:
    """:func:`time_cuda_events`' repetitions (one eager pass each), ready to sample."""
    if not calls:
        raise ValueError("need at least one call")

    def one_pass() -> None:
        for fn in calls:
            fn()

    def rep(reps: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize()
        for s, e in zip(starts, ends, strict=True):
            s.record()
            one_pass()
            e.record()
        torch.cuda.synchronize()
        return [_elapsed_us(s, e) for s, e in zip(starts, ends, strict=True)]

    return Replays(rep, one_pass, len(calls), "cuda-events", warmup)


def time_eager_wall(
    fn: Callable[[], object],
    *,
    reps: int = 200,
    warmup: int = 20,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> TimingStats:
    """Host wall time per eager call: ``clock()`` (seconds) around each call, no sync inside
    the loop (see the module docstring). ``sync`` (default: ``torch.cuda.synchronize`` when
    CUDA is initialised) drains the device before the timed loop and after it."""
    if sync is None:
        sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(reps):
        t0 = clock()
        fn()
        samples.append((clock() - t0) * 1e6)
    sync()
    return stats_from_samples(samples, 1, "wall")


def _matmul_flops(n: int) -> int:
    return 2 * n**3


def measure_matmul_peak_tflops(
    dtype: torch.dtype = torch.bfloat16, n: int = 8192, reps: int = 100
) -> float:
    """TFLOP/s of an n x n x n matmul of random normal data, by :func:`time_cuda_graph`.

    Random data, not zeros: tensor-core power (and so the sustained clock) depends on the bits.
    """
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=dtype, generator=gen)
    b = torch.randn(n, n, device="cuda", dtype=dtype, generator=gen)
    out = torch.empty(n, n, device="cuda", dtype=dtype)
    st = time_cuda_graph([lambda: torch.mm(a, b, out=out)], reps=reps, min_graph_us=0.0)
    return _matmul_flops(n) / st.median_us / 1e6


class Timer(Protocol):
    """The clock the runner times with. Implementations: :class:`CudaGraphTimer` (GPU),
    :class:`CpuWallTimer` (``--interpret``), and fakes in the tests (no GPU in CI).

    ``label`` names the row being timed (progress, fakes); it does not change the measurement.
    """

    method: str  # recorded in the JSON: how "GPU time" was measured

    def l2_bytes(self) -> int:
        """Size of the cache that input rotation must exceed."""
        ...

    def estimate_us(self, fn: Callable[[], object], *, label: str = "") -> float:
        """Rough time of one call, synchronised (for the time guard and wall reps)."""
        ...

    def prepare_calls(
        self, calls: Sequence[Callable[[], object]], *, label: str = ""
    ) -> Replays:
        """The rotating ``calls`` ready to time (graphs captured, say): ``.sample(reps)`` as
        often as needed, then ``.stats(all samples)`` gives the per-call device time."""
        ...

    def time_wall(self, fn: Callable[[], object], *, reps: int, label: str = "") -> TimingStats:
        """Per-call host wall time of eager calls."""
        ...

    def peak_tflops(self) -> float:
        """Measured bf16 matmul TFLOP/s: the denominator of "% of peak"."""
        ...


class CudaGraphTimer:
    """The GPU timer: :func:`time_cuda_graph` (falling back to CUDA events when a provider
    cannot be captured: the stats' ``method`` says so), :func:`time_eager_wall`,
    :func:`measure_matmul_peak_tflops`."""

    method = "cuda-graph"

    def __init__(self, warmup: int = 3, min_graph_us: float = 200.0, wall_warmup: int = 20,
                 peak_n: int = 8192) -> None:
        self.warmup = warmup
        self.min_graph_us = min_graph_us
        self.wall_warmup = wall_warmup
        self.peak_n = peak_n
        self._peak: float | None = None

    def l2_bytes(self) -> int:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 0) or _DEFAULT_L2_BYTES)

    def estimate_us(self, fn: Callable[[], object], *, label: str = "") -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e6

    def prepare_calls(
        self, calls: Sequence[Callable[[], object]], *, label: str = ""
    ) -> Replays:
        try:
            return prepare_cuda_graph(calls, warmup=self.warmup, min_graph_us=self.min_graph_us)
        except RuntimeError as e:
            # E.g. a host sync inside the call. Say so in the method rather than fail the row.
            torch.cuda.synchronize()
            r = prepare_cuda_events(calls, warmup=self.warmup)
            r.method = f"cuda-events (graph capture failed: {str(e).splitlines()[0][:120]})"
            return r

    def time_wall(self, fn: Callable[[], object], *, reps: int, label: str = "") -> TimingStats:
        return time_eager_wall(fn, reps=reps, warmup=self.wall_warmup,
                               sync=torch.cuda.synchronize)

    def peak_tflops(self) -> float:
        if self._peak is None:
            self._peak = measure_matmul_peak_tflops(torch.bfloat16, self.peak_n)
        return self._peak


class CpuWallTimer:
    """``--interpret`` (CPU): "device time" is wall time per pass over the sets, divided by the
    calls in it; the peak is a small bf16 CPU matmul. Exercises the pipeline, not a benchmark.
    """

    method = "cpu-wall"

    def __init__(self, warmup: int = 1, wall_warmup: int = 1, peak_n: int = 256) -> None:
        self.warmup = warmup
        self.wall_warmup = wall_warmup
        self.peak_n = peak_n
        self._peak: float | None = None

    def l2_bytes(self) -> int:
        return 0  # rotation still uses min_sets sets, which is what the pipeline needs to show

    def estimate_us(self, fn: Callable[[], object], *, label: str = "") -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    def prepare_calls(
        self, calls: Sequence[Callable[[], object]], *, label: str = ""
    ) -> Replays:
        def one_pass() -> None:
            for fn in calls:
                fn()

        def rep(reps: int) -> list[float]:
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                one_pass()
                samples.append((time.perf_counter() - t0) * 1e6)
            return samples

        return Replays(rep, one_pass, len(calls), self.method, self.warmup)

    def time_wall(self, fn: Callable[[], object], *, reps: int, label: str = "") -> TimingStats:
        return time_eager_wall(fn, reps=reps, warmup=self.wall_warmup, sync=lambda: None)

    def peak_tflops(self) -> float:
        if self._peak is None:
            n = self.peak_n
            a = torch.randn(n, n, dtype=torch.bfloat16)
            b = torch.randn(n, n, dtype=torch.bfloat16)
            st = time_eager_wall(lambda: torch.mm(a, b), reps=5, warmup=1, sync=lambda: None)
            self._peak = _matmul_flops(n) / st.median_us / 1e6
        return self._peak

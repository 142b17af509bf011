"""Timing statistics, cold-L2 sizing and the graph timer's logic against a fake CUDA clock."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from flashcore.bench import timing
from flashcore.bench.timing import (
    CudaGraphTimer,
    TimingStats,
    cold_l2_sets,
    stats_from_samples,
    time_eager_wall,
)


def test_stats_from_known_samples():
    # 1..101 shuffled: median 51, p10 11, p90 91 exactly (linear interpolation lands on them).
    samples = list(np.random.default_rng(0).permutation(np.arange(1, 102)).astype(float))
    st = stats_from_samples(samples, calls_per_rep=1)
    assert (st.median_us, st.p10_us, st.p90_us) == (51.0, 11.0, 91.0)
    assert st.mean_us == pytest.approx(51.0) and st.min_us == 1.0
    assert (st.reps, st.calls_per_rep) == (101, 1)


def test_stats_are_per_call():
    st = stats_from_samples([40.0, 80.0, 60.0], calls_per_rep=4)
    assert st.median_us == 15.0 and st.min_us == 10.0 and st.mean_us == 15.0
    assert st.calls_per_rep == 4 and st.reps == 3


def test_stats_interpolate_between_order_statistics():
    st = stats_from_samples([0.0, 10.0], calls_per_rep=1)
    assert (st.p10_us, st.median_us, st.p90_us) == pytest.approx((1.0, 5.0, 9.0))


def test_stats_reject_bad_input():
    with pytest.raises(ValueError):
        stats_from_samples([], 1)
    with pytest.raises(ValueError):
        stats_from_samples([1.0], 0)
    with pytest.raises(ValueError):
        stats_from_samples([1.0, math.nan], 1)


def test_timing_stats_round_trip():
    st = stats_from_samples([3.0, 1.0, 2.0], 1, "wall")
    assert TimingStats.from_dict(st.to_dict()) == st


@pytest.mark.parametrize(
    "per_set,l2,min_sets,expected",
    [
        (10, 100, 3, 11),  # 10 sets are exactly the L2: one more to exceed it
        (11, 100, 3, 10),  # 10 * 11 = 110 > 100
        (40, 100, 3, 3),  # 3 * 40 = 120 > 100
        (1000, 100, 3, 3),  # a set larger than the L2 still rotates min_sets
        (1000, 100, 5, 5),
        (1, 0, 1, 1),
    ],
)
def test_cold_l2_sets(per_set, l2, min_sets, expected):
    n = cold_l2_sets(per_set, l2, min_sets)
    assert n == expected
    assert n * per_set > l2 and n >= min_sets
    assert n == min_sets or (n - 1) * per_set <= l2  # the smallest such n


def test_cold_l2_sets_mission_on_h100():
    mission = 3 * 1 * 8 * 512 * 64 * 2  # q, k, v in fp16: 1.5 MiB
    assert cold_l2_sets(mission, 50 * 2**20) == 34  # 33 sets are 49.5 MiB, 34 are 51
    with pytest.raises(ValueError):
        cold_l2_sets(0, 100)


def test_eager_wall_times_each_call_with_the_clock():
    ticks = iter([0.0, 1e-6, 10e-6, 13e-6, 20e-6, 22e-6])  # calls take 1, 3, 2 us
    calls = []
    syncs = []
    st = time_eager_wall(lambda: calls.append(1), reps=3, warmup=2, sync=lambda: syncs.append(1),
                         clock=lambda: next(ticks))
    assert len(calls) == 5  # 2 warm-up + 3 timed
    assert len(syncs) == 2  # before and after the timed loop, never inside it
    assert st.median_us == pytest.approx(2.0) and st.min_us == pytest.approx(1.0)
    assert st.calls_per_rep == 1 and st.method == "wall"


class FakeCuda:
    """Just enough of torch.cuda for time_cuda_graph: a GPU clock that advances by each
    launched call's cost when run eagerly or by the captured calls' costs on replay."""

    def __init__(self, fail_capture: bool = False) -> None:
        self.now_us = 0.0
        self.capturing: list | None = None
        self.eager_calls = 0
        self.graphs: list[FakeCuda.Graph] = []
        self.fail_capture = fail_capture
        self.events = 0
        self.pools: list[object] = []
        fake = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                self.t = None
                fake.events += 1

            def record(self) -> None:
                self.t = fake.now_us

            def elapsed_time(self, end) -> float:
                return (end.t - self.t) / 1e3  # ms, like torch

        class Graph:
            def __init__(self) -> None:
                self.calls: list[float] = []
                self.replays = 0
                fake.graphs.append(self)

            def replay(self) -> None:
                self.replays += 1
                fake.replay_order.append(self)
                fake.now_us += sum(self.calls)

        @contextlib.contextmanager
        def graph(g, pool=None, stream=None):
            fake.pools.append(pool)
            fake.capturing = g.calls
            try:
                yield
                if fake.fail_capture:
                    raise RuntimeError("operation not permitted when stream is capturing")
            finally:
                fake.capturing = None

        class Stream:
            def wait_stream(self, other) -> None:
                pass

        self.Event, self.CUDAGraph, self.graph, self.Stream = Event, Graph, graph, Stream
        self.current_stream = lambda: Stream()
        self.stream = lambda s: contextlib.nullcontext()
        self.synchronize = lambda *a: None
        self.graph_pool_handle = lambda: ("pool", len(self.pools))
        self.replay_order: list[FakeCuda.Graph] = []

    def launch(self, cost_us: float) -> None:
        if self.capturing is not None:
            self.capturing.append(cost_us)
        else:
            self.eager_calls += 1
            self.now_us += cost_us + 5.0  # eager calls pay a launch gap the graph removes


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    for name in ("Event", "CUDAGraph", "graph", "Stream", "current_stream", "stream",
                 "synchronize", "graph_pool_handle"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def test_graph_timer_rotates_sets_and_divides_by_calls(fake_cuda):
    costs = [2.0, 4.0, 6.0]  # three input sets; a pass costs 12 us
    calls = [lambda c=c: fake_cuda.launch(c) for c in costs]
    st = timing.time_cuda_graph(calls, reps=7, warmup=2, min_graph_us=100.0)
    assert fake_cuda.eager_calls == 3  # each set once before capture (compile, caches)
    sizing, final = fake_cuda.graphs
    assert sizing.calls == costs  # a one-pass graph sizes the real one
    passes = math.ceil(100.0 / 12.0)
    assert final.calls == costs * passes  # the sets cycle, pass after pass
    assert final.replays == 2 + 7
    assert st.calls_per_rep == passes * 3 and st.reps == 7
    assert st.median_us == pytest.approx(4.0)  # the mean call cost, without the launch gap
    assert st.method == "cuda-graph"


def test_graph_timer_keeps_one_pass_when_a_pass_is_long_enough(fake_cuda):
    calls = [lambda: fake_cuda.launch(100.0) for _ in range(3)]  # a call < 200 us, a pass 300
    st = timing.time_cuda_graph(calls, reps=5, min_graph_us=200.0)
    assert len(fake_cuda.graphs) == 1  # the sizing graph is already long enough
    assert st.calls_per_rep == 3 and st.median_us == pytest.approx(100.0)


def test_graph_timer_rotates_single_call_graphs_for_long_kernels(fake_cuda):
    costs = [400.0, 500.0, 600.0]  # each call alone outlasts min_graph_us
    calls = [lambda c=c: fake_cuda.launch(c) for c in costs]
    st = timing.time_cuda_graph(calls, reps=9, warmup=3, min_graph_us=200.0)
    sizing, *graphs = fake_cuda.graphs
    assert sizing.calls == costs and sizing.replays == 3  # the one-pass graph says "long"
    assert [g.calls for g in graphs] == [[c] for c in costs]  # one graph per set
    pools = fake_cuda.pools[1:]  # the sizing graph had its own
    assert len({id(p) for p in pools}) == 1 and pools[0] is not None
    # Replays cycle through the sets (warm-up included), one call per sample.
    order = [graphs.index(g) for g in fake_cuda.replay_order[sizing.replays:]]
    assert order == [0, 1, 2] * 4
    assert st.calls_per_rep == 1 and st.reps == 9
    assert (st.min_us, st.median_us) == pytest.approx((400.0, 500.0))


def _slow_first_calls(fake: FakeCuda, n_sets: int, kernel_us: float = 7.0) -> list:
    """Calls of a launcher that does host work on each set's first call (TMA descriptors for
    new pointers): the eager pass reads 500 us more per call than the kernel takes."""
    seen: set[int] = set()

    def call(i: int) -> None:
        if i not in seen:
            seen.add(i)
            fake.now_us += 500.0
        fake.launch(kernel_us)

    return [lambda i=i: call(i) for i in range(n_sets)]


def test_graph_timer_sizes_by_the_graph_not_a_slow_first_eager_pass(fake_cuda):
    st = timing.time_cuda_graph(_slow_first_calls(fake_cuda, 4), reps=5, min_graph_us=200.0)
    passes = math.ceil(200.0 / 28.0)
    assert st.calls_per_rep == passes * 4  # not one single-call graph per set
    assert st.median_us == pytest.approx(7.0)


def test_graph_timer_sizes_by_the_graph_with_many_sets(fake_cuda):
    # 120 sets: the eager pass is long (60 ms) but each call is short; still multi-call graphs.
    st = timing.time_cuda_graph(_slow_first_calls(fake_cuda, 120), reps=3, min_graph_us=200.0)
    assert st.calls_per_rep == 120 and st.median_us == pytest.approx(7.0)


def test_graph_timer_skips_the_sizing_pass_for_very_long_calls(fake_cuda):
    calls = [lambda: fake_cuda.launch(30_000.0) for _ in range(3)]  # 30 ms per call
    st = timing.time_cuda_graph(calls, reps=3, min_graph_us=200.0)
    assert [g.calls for g in fake_cuda.graphs] == [[30_000.0]] * 3  # no one-pass graph
    assert st.calls_per_rep == 1 and st.median_us == pytest.approx(30_000.0)


def test_graph_timer_bounds_graph_size(fake_cuda):
    calls = [lambda: fake_cuda.launch(0.01) for _ in range(4)]
    st = timing.time_cuda_graph(calls, reps=3, min_graph_us=1e6, max_calls_per_graph=100)
    assert st.calls_per_rep == 100
    assert len(fake_cuda.graphs[-1].calls) == 100


def test_cuda_timer_falls_back_to_events_when_capture_fails(fake_cuda):
    fake_cuda.fail_capture = True
    calls = [lambda: fake_cuda.launch(10.0) for _ in range(3)]
    r = CudaGraphTimer(warmup=1).prepare_calls(calls)
    st = r.stats(r.sample(4))
    assert st.method.startswith("cuda-events (graph capture failed")
    assert st.median_us == pytest.approx(15.0)  # eager: kernel + launch gap, and it says so
    assert st.calls_per_rep == 3


def test_prepared_graphs_sample_in_rounds_with_a_warm_up_before_each(fake_cuda):
    """The bench interleaves providers round by round: each round re-warms (another
    provider ran in between), the samples pool, and a closed one cannot be sampled."""
    costs = [2.0, 4.0, 6.0]
    calls = [lambda c=c: fake_cuda.launch(c) for c in costs]
    r = timing.prepare_cuda_graph(calls, warmup=2, min_graph_us=100.0)
    _, final = fake_cuda.graphs
    assert final.replays == 0  # prepared, nothing timed yet
    samples = r.sample(3) + r.sample(4)
    assert final.replays == (2 + 3) + (2 + 4) and len(samples) == 7
    st = r.stats(samples)
    assert st.reps == 7 and st.median_us == pytest.approx(4.0) and st.method == "cuda-graph"
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.sample(1)

"""The runner with a fake timer (no GPU): statuses, the check-before-timing rule, metrics;
the correctness gate; the Flex fused-kernel classifier."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from flashcore.bench.check import compare, make_reference, sample_rows
from flashcore.bench.providers import (
    FlashCoreProvider,
    Provider,
    SdpaProvider,
    UnfusedFallback,
    Unsupported,
    classify_flex_kernels,
    get_providers,
)
from flashcore.bench.runner import (
    RunConfig,
    derive_metrics,
    make_inputs,
    provider_order,
    round_reps,
    run_bench,
)
from flashcore.bench.suites import Case
from flashcore.bench.timing import CpuWallTimer, Replays, TimingStats
from flashcore.reference import attention_reference

CPU = torch.device("cpu")


class FakeTimer:
    """Per-provider fixed times; records what it was asked to time."""

    method = "fake"

    def __init__(self, gpu_us: dict[str, float], l2: int = 0, est_us: float = 10.0) -> None:
        self.gpu_us = gpu_us
        self.l2 = l2
        self.est_us = est_us
        self.timed: list[tuple[str, int, int]] = []  # (label, number of calls, reps)
        self.wall: list[tuple[str, int]] = []

    def l2_bytes(self) -> int:
        return self.l2

    def estimate_us(self, fn, *, label=""):
        return self.est_us

    def _prov(self, label: str) -> str:
        return label.rsplit(" ", 1)[1]

    def prepare_calls(self, calls, *, label=""):
        us = self.gpu_us[self._prov(label)]

        def rep(reps):
            for fn in calls:
                fn()  # the closures must run
            self.timed.append((label, len(calls), reps))
            return [us * len(calls)] * reps

        return Replays(rep, lambda: None, len(calls), "fake", 0)

    def time_wall(self, fn, *, reps, label=""):
        self.wall.append((label, reps))
        us = 2 * self.gpu_us[self._prov(label)]
        return TimingStats(us, us, us, us, us, reps, 1, "fake-wall")

    def peak_tflops(self) -> float:
        return 100.0


class RefProvider(Provider):
    """Correct output (the reference itself), for timing bookkeeping."""

    def __init__(self, name: str) -> None:
        self.name = name

    def closure(self, case, q, k, v):
        return lambda: attention_reference(q, k, v, is_causal=case.causal,
                                           compute_dtype=torch.float32)[0].to(q.dtype)


class WrongProvider(RefProvider):
    """Off-by-one causal mask on the first row: plausible-looking but wrong."""

    def closure(self, case, q, k, v):
        def call():
            out = attention_reference(q, k, v, is_causal=case.causal,
                                      compute_dtype=torch.float32)[0]
            out[:, :, 0] = v[:, :, :2].float().mean(dim=2)  # row 0 also saw key 1
            return out.to(q.dtype)
        return call


class NanProvider(RefProvider):
    def closure(self, case, q, k, v):
        return lambda: torch.full_like(q, math.nan)


class BrokenProvider(RefProvider):
    def closure(self, case, q, k, v):
        def call():
            raise ValueError("kernel exploded")
        return call


class UnsupportedProvider(RefProvider):
    def setup(self, case, device):
        raise Unsupported("needs a bigger GPU")


class FallbackProvider(RefProvider):
    def verify(self, call):
        raise UnfusedFallback("no fused flex kernel ran (2 kernels: gemm, softmax)")


class Tracked(RefProvider):
    """Appends its name to ``torn`` at each teardown."""

    def __init__(self, name: str, torn: list[str]) -> None:
        super().__init__(name)
        self.torn = torn

    def teardown(self):
        self.torn.append(self.name)


def _run_rounds(timer, providers, wall_reps=10):
    """One case, two interleaved rounds: the failure-path tests' run."""
    return run_bench([_case()], providers, timer, device=CPU, config=RunConfig(
        reps=4, wall_reps=wall_reps, min_wall_reps=1, rounds=2))


def _case(causal=True, hkv=2):
    return Case(1, 2, hkv, 24, 24, 16, "fp16", causal, "unit")


def test_run_bench_statuses_and_check_before_timing():
    providers = [SdpaProvider("sdpa", None), RefProvider("fast"), WrongProvider("wrong"),
                 NanProvider("nan"), BrokenProvider("broken"), UnsupportedProvider("unsup"),
                 FallbackProvider("fallback"), FlashCoreProvider("cuda")]
    timer = FakeTimer({"sdpa": 20.0, "fast": 10.0})
    res = run_bench([_case()], providers, timer, device=CPU,
                    config=RunConfig(reps=7, wall_reps=9, min_wall_reps=1))
    assert res.settings["wall_rounds"] == "per provider"  # rounds=1: one provider at a time
    by = {r.provider: r for r in res.rows}
    assert {p: r.status for p, r in by.items()} == {
        "sdpa": "ok", "fast": "ok", "wrong": "mismatch", "nan": "mismatch",
        "broken": "error", "unsup": "unsupported", "fallback": "unfused-fallback",
        "flashcore-cuda": "unsupported",
    }
    # Only rows that passed the check (and the fused check) were timed, each over 3 sets.
    assert sorted(label.rsplit(" ", 1)[1] for label, _, _ in timer.timed) == ["fast", "sdpa"]
    assert all(n == 3 and reps == 7 for _, n, reps in timer.timed)
    for r in res.rows:
        assert (r.gpu is None) == (r.status != "ok")
    assert by["wrong"].max_err > by["wrong"].tol and "row=0" in by["wrong"].reason
    assert by["nan"].max_err == math.inf and "non-finite" in by["nan"].reason
    assert "kernel exploded" in by["broken"].reason
    assert by["unsup"].reason == "needs a bigger GPU"
    assert "gemm" in by["fallback"].reason
    assert "cuda" in by["flashcore-cuda"].reason
    assert by["sdpa"].max_err <= by["sdpa"].tol


def test_run_bench_metrics_against_sdpa_in_the_same_run():
    c = _case(causal=False)
    timer = FakeTimer({"sdpa": 20.0, "fast": 10.0})
    res = run_bench([c], [SdpaProvider("sdpa", None), RefProvider("fast")], timer, device=CPU,
                    config=RunConfig(reps=5, wall_reps=9, min_wall_reps=1))
    sdpa, fast = res.rows
    assert res.peak_tflops == 100.0
    assert fast.tflops == pytest.approx(c.flops() / 10e-6 / 1e12)
    assert fast.pct_peak == pytest.approx(100 * fast.tflops / 100.0)
    assert fast.speedup_vs_sdpa == pytest.approx(2.0) and sdpa.speedup_vs_sdpa == 1.0
    assert fast.wall_speedup_vs_sdpa == pytest.approx(2.0)
    assert fast.wall.median_us == 20.0
    assert res.settings["reps"] == 5 and res.settings["timer"] == "fake"


def test_run_bench_rotates_enough_sets_to_exceed_l2():
    c = _case()
    l2 = 10 * c.input_bytes()
    timer = FakeTimer({"sdpa": 1.0})
    res = run_bench([c], [SdpaProvider("sdpa", None)], timer, device=CPU,
                    config=RunConfig(reps=2, wall_reps=2, min_wall_reps=1))
    assert res.rows[0].n_sets == 3 and res.rows[0].l2_cold  # l2 = 0 here
    timer = FakeTimer({"sdpa": 1.0}, l2=l2)
    res = run_bench([c], [SdpaProvider("sdpa", None)], timer, device=CPU,
                    config=RunConfig(reps=2, wall_reps=2, min_wall_reps=1))
    assert timer.timed[0][1] == 11 == res.rows[0].n_sets and res.rows[0].l2_cold


def test_wall_reps_are_bounded_by_time():
    timer = FakeTimer({"sdpa": 5000.0})  # 5 ms a call: 0.25 s buys 50 calls
    run_bench([_case()], [SdpaProvider("sdpa", None)], timer, device=CPU,
              config=RunConfig(reps=2, wall_reps=200, min_wall_reps=20))
    # 50 calls in all, as 5 rounds of 10 (the quietest round is kept).
    assert [w[1] for w in timer.wall] == [10] * 5


class NoisyWallTimer(FakeTimer):
    """Wall rounds with a drifting host: medians 30, 12, 25, 18, 40 us."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.round_medians = iter([30.0, 12.0, 25.0, 18.0, 40.0])

    def time_wall(self, fn, *, reps, label=""):
        self.wall.append((label, reps))
        us = next(self.round_medians)
        return TimingStats(us, us, us, us, us, reps, 1, "fake-wall")


def test_wall_keeps_the_quietest_round():
    timer = NoisyWallTimer({"sdpa": 5.0})
    res = run_bench([_case()], [SdpaProvider("sdpa", None)], timer, device=CPU,
                    config=RunConfig(reps=2, wall_reps=100, min_wall_reps=20))
    assert len(timer.wall) == 5
    assert res.rows[0].wall.median_us == 12.0


def test_time_guard_skips_without_timing():
    timer = FakeTimer({"sdpa": 1.0}, est_us=1e6)  # one call a second
    res = run_bench([_case()], [SdpaProvider("sdpa", None)], timer, device=CPU,
                    config=RunConfig(reps=100, max_seconds_per_case=30.0))
    assert res.rows[0].status == "skipped" and "projected" in res.rows[0].reason
    assert timer.timed == []


def test_gqa_runs_through_sdpa_with_enable_gqa():
    res = run_bench([_case(hkv=1)], [SdpaProvider("sdpa", None)], FakeTimer({"sdpa": 1.0}),
                    device=CPU, config=RunConfig(reps=2, wall_reps=2, min_wall_reps=1))
    assert res.rows[0].status == "ok"


def test_progress_reports_every_row():
    lines: list[str] = []
    run_bench([_case(False), _case(True)], [SdpaProvider("sdpa", None), BrokenProvider("b")],
              FakeTimer({"sdpa": 3.0}), device=CPU,
              config=RunConfig(reps=2, wall_reps=2, min_wall_reps=1), progress=lines.append)
    rows = [ln for ln in lines if ln.startswith("[")]
    assert len(rows) == 4
    assert rows[0].startswith("[1/2]") and "sdpa" in rows[0] and "us" in rows[0]
    assert rows[3].startswith("[2/2]") and "error: ValueError: kernel exploded" in rows[3]


def test_checkpoint_after_each_case_keeps_finished_rows():
    saved = []
    cases = [_case(False), _case(True), _case(True, hkv=1)]
    res = run_bench(cases, [SdpaProvider("sdpa", None)], FakeTimer({"sdpa": 3.0}), device=CPU,
                    config=RunConfig(reps=2, wall_reps=2, min_wall_reps=1),
                    checkpoint=saved.append)
    assert [len(r.rows) for r in saved] == [1, 2]  # the final result is the caller's to write
    assert all(not r.settings["complete"] for r in saved) and res.settings["complete"]
    assert saved[1].rows[1].tflops is not None and saved[1].peak_tflops == 100.0


def test_derive_metrics_without_baseline_leaves_ratio_empty():
    res = run_bench([_case()], [RefProvider("fast")], FakeTimer({"fast": 2.0}), device=CPU,
                    config=RunConfig(reps=2, wall_reps=2, min_wall_reps=1))
    assert res.rows[0].tflops is not None and res.rows[0].speedup_vs_sdpa is None
    derive_metrics(res.rows, None)
    assert res.rows[0].pct_peak is None


def test_make_inputs_are_distinct_random_normal():
    c = Case(2, 4, 2, 32, 48, 16, "bf16", False)
    sets = make_inputs(c, CPU, 3, seed=1)
    assert len(sets) == 3
    q, k, v = sets[0]
    assert q.shape == (2, 4, 32, 16) and k.shape == v.shape == (2, 2, 48, 16)
    assert q.dtype == torch.bfloat16 and q.is_contiguous()
    assert not torch.equal(sets[0][0], sets[1][0]) and not torch.equal(k, v)
    # Not zero-filled (a bf16 randn draw may round to an exact 0 now and then).
    assert 0.8 < q.float().std().item() < 1.2 and (q != 0).float().mean() > 0.99


# ---- the correctness gate ------------------------------------------------------------------


def test_sample_rows_include_first_and_last():
    rows = sample_rows(1000, 128, seed=3)
    assert len(rows) == 128 and rows[0] == 0 and rows[-1] == 999
    assert len(set(rows.tolist())) == 128 and torch.equal(rows, rows.sort().values)
    assert torch.equal(sample_rows(50, 128), torch.arange(50))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_check_passes_pytorch_and_fails_perturbed(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 32, generator=g).to(dtype) for _ in range(3))
    rows = sample_rows(300, 64)
    ref = make_reference(q, k, v, True, rows)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert compare(sdpa, ref).ok
    bad = sdpa.clone()
    bad[0, 1, 299, 5] += 8 * ref.tol  # one wrong element, in the last row
    res = compare(bad, ref)
    assert not res.ok and "h=1, row=299, d=5" in res.detail
    # Scale bug: softmax with the wrong scale gives plausible values, but not these.
    wrong = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    assert not compare(wrong, ref).ok


@pytest.mark.parametrize("dtype,eps", [(torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)])
def test_check_tolerance_is_twice_pytorch_lowp_error_plus_4_eps(dtype, eps):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 200, 64, generator=g).to(dtype) for _ in range(3))
    rows = sample_rows(200, 32)
    ref32, _ = attention_reference(q, k, v, is_causal=False, compute_dtype=torch.float32,
                                   rows=rows)
    lowp, _ = attention_reference(q, k, v, is_causal=False, compute_dtype=dtype, rows=rows)
    lowp_err = (lowp.float() - ref32).abs().max().item()
    ref = make_reference(q, k, v, False, rows)
    assert lowp_err > 0
    assert ref.tol == pytest.approx(2 * lowp_err + 4 * eps * ref32.abs().max().item())
    assert torch.equal(ref.out, ref32)


# ---- Flex fused-kernel detection -------------------------------------------------------------


def test_classify_flex_kernels():
    # What a compiled call records on CUDA (wrappers + Inductor's kernel launch records).
    compiled = ["Torch-Compiled Region: 0/0", "## Call CompiledFxGraph abc ##",
                "aten::empty_strided", "triton_tem_fused_flex_attention_0"]
    fused, why = classify_flex_kernels(compiled)
    assert fused and "triton_tem_fused_flex_attention_0" in why
    assert classify_flex_kernels(["triton_tem_fused_flex_decoding_0"])[0]
    assert classify_flex_kernels(["triton_tem_fused_0"])[0]  # non-descriptive kernel names
    # A compiled graph whose launches are not recorded (seen on CPU): no matmul op ran.
    fused, why = classify_flex_kernels(compiled[:3])
    assert fused and "not recorded" in why
    # The unfused path (recorded on CPU from eager flex_attention): score matrix by matmuls.
    eager = ["FlexAttentionAutogradOp", "Torch-Compiled Region: 1/0", "aten::matmul",
             "aten::bmm", "aten::_safe_softmax", "aten::_softmax", "aten::logsumexp"]
    fused, why = classify_flex_kernels(eager)
    assert not fused and "aten::_softmax" in why and "aten::bmm" in why
    # A fused kernel beside matmuls is not the fused path either.
    assert not classify_flex_kernels(compiled + ["aten::bmm"])[0]
    # The op's own name is not a kernel.
    assert not classify_flex_kernels(["flex_attention", "FlexAttentionHOP"])[0]
    assert classify_flex_kernels([]) == (False, "no fused flex kernel ran (0 events: "
                                                "nothing recorded)")


def test_provider_registry():
    names = [p.name for p in get_providers()]
    assert names == ["sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex",
                     "flashcore-triton", "flashcore-cuda"]
    assert [p.name for p in get_providers(["flex", "sdpa"])] == ["sdpa", "flex"]
    with pytest.raises(ValueError, match="unknown provider"):
        get_providers(["sdpa-math"])


def test_provider_order_reverse_and_alternate():
    assert provider_order(3, "registry", 2) == [0, 1, 2]
    assert provider_order(3, "reverse", 1) == [2, 1, 0]
    assert [provider_order(2, "alternate", i) for i in (1, 2, 3)] == [[0, 1], [1, 0], [0, 1]]
    with pytest.raises(ValueError, match="order must be one of"):
        provider_order(2, "random", 1)
    with pytest.raises(ValueError, match="order must be one of"):
        RunConfig(order="random")  # before any GPU time is spent
    with pytest.raises(ValueError, match="gap_s must be >= 0"):
        RunConfig(gap_s=-1.0)


def test_run_bench_alternate_order_runs_reversed_but_reports_in_registry_order(monkeypatch):
    cases = [_case(causal=False), _case(causal=True)]
    timer = FakeTimer({"sdpa": 20.0, "fast": 10.0})
    slept: list[float] = []
    monkeypatch.setattr("flashcore.bench.runner.time.sleep", slept.append)
    res = run_bench(cases, [SdpaProvider("sdpa", None), RefProvider("fast")], timer,
                    device=CPU, config=RunConfig(reps=3, wall_reps=3, min_wall_reps=1,
                                                 order="alternate", gap_s=0.5))
    ran = [label.rsplit(" ", 1)[1] for label, _, _ in timer.timed]
    assert ran == ["sdpa", "fast", "fast", "sdpa"]  # second case reversed
    assert [r.provider for r in res.rows] == ["sdpa", "fast", "sdpa", "fast"]
    assert slept == [0.5] * 4  # before each provider's (one) timed round of each case
    assert res.rows[3].speedup_vs_sdpa == pytest.approx(2.0)
    assert res.settings["order"] == "alternate" and res.settings["gap_s"] == 0.5


def test_rounds_interleave_providers_and_pool_their_samples(monkeypatch):
    class DriftingTimer(FakeTimer):
        """The card slows down as the run goes on: each round is slower than the last."""

        def prepare_calls(self, calls, *, label=""):
            base = self.gpu_us[self._prov(label)]

            def rep(reps):
                self.timed.append((label, len(calls), reps))
                slow = 1.0 + 0.1 * (len(self.timed) - 1)
                return [base * slow * len(calls)] * reps

            return Replays(rep, lambda: None, len(calls), "fake", 0)

    timer = DriftingTimer({"sdpa": 10.0, "fast": 10.0})
    slept: list[float] = []
    monkeypatch.setattr("flashcore.bench.runner.time.sleep", slept.append)
    res = run_bench([_case()], [SdpaProvider("sdpa", None), RefProvider("fast")], timer,
                    device=CPU, config=RunConfig(reps=10, wall_reps=3, min_wall_reps=1,
                                                 rounds=4, gap_s=0.25))
    ran = [(label.rsplit(" ", 1)[1], reps) for label, _, reps in timer.timed]
    assert ran == [("sdpa", 3), ("fast", 3), ("fast", 3), ("sdpa", 3),
                   ("sdpa", 2), ("fast", 2), ("fast", 2), ("sdpa", 2)]  # A B, B A, A B, B A
    sdpa, fast = res.rows
    assert sdpa.gpu.reps == fast.gpu.reps == 10  # the rounds' samples pooled
    # Same drift for both: equal means, which one block per provider (A then B) would not give.
    assert sdpa.gpu.mean_us == pytest.approx(fast.gpu.mean_us)
    assert slept == [0.25] * 8  # before each timed round
    assert res.settings["rounds"] == 4


def test_rounds_are_checked_before_any_timing():
    with pytest.raises(ValueError, match=r"rounds must be an int in \[1, reps=5\], got 6"):
        RunConfig(reps=5, rounds=6)
    with pytest.raises(ValueError, match="rounds must be"):
        RunConfig(rounds=0)
    assert round_reps(10, 4) == [3, 3, 2, 2] and round_reps(100, 1) == [100]


def test_a_provider_failing_in_a_round_is_an_error_row_and_the_others_go_on():
    class FlakyTimer(FakeTimer):
        def prepare_calls(self, calls, *, label=""):
            r = super().prepare_calls(calls, label=label)
            if label.endswith("flaky"):
                def boom(reps):
                    raise RuntimeError("illegal memory access")
                return Replays(boom, lambda: None, len(calls), "fake", 0)
            return r

    torn: list[str] = []
    timer = FlakyTimer({"sdpa": 10.0, "flaky": 5.0})
    res = _run_rounds(timer, [SdpaProvider("sdpa", None), Tracked("flaky", torn)], wall_reps=2)
    sdpa, flaky = res.rows
    assert flaky.status == "error" and "illegal memory access" in flaky.reason
    assert flaky.gpu is None and torn == ["flaky"]  # torn down once, when it failed
    assert sdpa.status == "ok" and sdpa.gpu.reps == 4


def test_a_provider_failing_in_a_wall_round_is_an_error_row_and_the_others_go_on():
    class FlakyWallTimer(FakeTimer):
        def time_wall(self, fn, *, reps, label=""):
            if label.endswith("flaky") and sum(w[0] == label for w in self.wall) == 2:
                raise RuntimeError("device-side assert")
            return super().time_wall(fn, reps=reps, label=label)

    torn: list[str] = []
    timer = FlakyWallTimer({"sdpa": 10.0, "flaky": 5.0})
    res = _run_rounds(timer, [Tracked("sdpa", torn), Tracked("flaky", torn)])
    sdpa, flaky = res.rows
    assert flaky.status == "error" and "device-side assert" in flaky.reason
    assert flaky.gpu is None and flaky.wall is None
    assert sdpa.status == "ok" and sdpa.wall.reps == 2
    assert sum(w[0].endswith("sdpa") for w in timer.wall) == 5  # sdpa's rounds all ran
    assert sorted(torn) == ["flaky", "sdpa"] and torn[0] == "flaky"  # each once


def test_a_provider_whose_samples_cannot_be_pooled_is_an_error_row_and_the_others_go_on():
    closed: list[str] = []

    class BadStats(Replays):
        def stats(self, samples):
            raise RuntimeError("no samples")

        def close(self):
            closed.append("bad")
            super().close()

    class BadStatsTimer(FakeTimer):
        def prepare_calls(self, calls, *, label=""):
            r = super().prepare_calls(calls, label=label)
            if label.endswith("bad"):
                return BadStats(lambda reps: [1.0] * reps, lambda: None, len(calls), "fake", 0)
            return r

    torn: list[str] = []
    timer = BadStatsTimer({"sdpa": 10.0, "bad": 5.0})
    res = _run_rounds(timer, [Tracked("sdpa", torn), Tracked("bad", torn)])
    sdpa, bad = res.rows
    assert bad.status == "error" and "no samples" in bad.reason and bad.wall is None
    assert closed == ["bad"]  # its graphs are freed even though the stats failed
    assert not any(w[0].endswith("bad") for w in timer.wall)  # no wall rounds for it
    assert sdpa.status == "ok" and sdpa.wall is not None
    assert sorted(torn) == ["bad", "sdpa"]


def test_a_teardown_that_raises_is_an_error_row_and_the_others_are_still_torn_down():
    """E.g. an asynchronous fault that surfaces at the teardown's sync: the row's timings
    cannot be trusted, and the case's other providers must still be torn down."""
    torn: list[str] = []

    class Faulty(Tracked):
        def teardown(self):
            super().teardown()
            raise RuntimeError("an illegal memory access was encountered")

    rows = []
    res = run_bench([_case()], [Faulty("faulty", torn), Tracked("sdpa", torn)], FakeTimer(
        {"faulty": 5.0, "sdpa": 10.0}), device=CPU, progress=rows.append,
        config=RunConfig(reps=4, wall_reps=2, min_wall_reps=1, rounds=2))
    faulty, sdpa = res.rows
    assert faulty.status == "error" and "illegal memory access" in faulty.reason
    assert faulty.gpu is None and faulty.wall is None
    assert sdpa.status == "ok" and sdpa.wall is not None
    assert torn == ["faulty", "sdpa"]
    assert sum(line.startswith("[1/1]") for line in rows) == 2  # every row reported once


class PinnedProvider(RefProvider):
    """Records, for every call of its closure, whether its context (a backend pin) was on."""

    def __init__(self, name):
        super().__init__(name)
        self.pinned = False
        self.calls_outside: list[int] = []
        self.n_calls = 0

    @contextlib.contextmanager
    def _pin(self):
        self.pinned = True
        try:
            yield
        finally:
            self.pinned = False

    def context(self):
        return self._pin()

    def closure(self, case, q, k, v):
        inner = super().closure(case, q, k, v)

        def call():
            self.n_calls += 1
            if not self.pinned:
                self.calls_outside.append(self.n_calls)
            return inner()
        return call


@pytest.mark.parametrize("rounds", [1, 3])
def test_every_call_runs_in_the_providers_context(rounds):
    """The CPU timer (like the CUDA-events fallback) runs the calls eagerly while timing: a
    backend pin must hold there too, or a pinned row times the default dispatch."""
    a, b = PinnedProvider("a"), PinnedProvider("b")
    res = run_bench([_case()], [SdpaProvider("sdpa", None), a, b], CpuWallTimer(), device=CPU,
                    config=RunConfig(reps=3, wall_reps=2, min_wall_reps=1, rounds=rounds))
    assert all(r.status == "ok" for r in res.rows), [r.reason for r in res.rows]
    for p in (a, b):
        assert p.n_calls > 3 * 3 and p.calls_outside == []  # checked, warmed, timed, wall


def test_each_provider_is_closed_timed_for_wall_and_torn_down_once_in_that_order():
    log: list[tuple[str, str]] = []

    class LoggedReplays(Replays):
        def close(self):
            log.append(("close", self.label))
            super().close()

    class LoggingTimer(FakeTimer):
        def prepare_calls(self, calls, *, label=""):
            us = self.gpu_us[self._prov(label)]

            def warm():
                log.append(("warm", self._prov(label)))

            def rep(reps):
                log.append(("time", self._prov(label)))
                return [us * len(calls)] * reps

            r = LoggedReplays(rep, warm, len(calls), "fake", 1)
            r.label = self._prov(label)
            return r

        def time_wall(self, fn, *, reps, label=""):
            log.append(("wall", self._prov(label)))
            return super().time_wall(fn, reps=reps, label=label)

    class Logged(RefProvider):
        def teardown(self):
            log.append(("teardown", self.name))

    class Sampler:
        @contextlib.contextmanager
        def sampling(self):
            log.append(("sample", "on"))
            yield []
            log.append(("sample", "off"))

    res = run_bench([_case()], [Logged("sdpa"), Logged("fast")], LoggingTimer(
        {"sdpa": 10.0, "fast": 5.0}), device=CPU, sampler=Sampler(),
        config=RunConfig(reps=4, wall_reps=2, min_wall_reps=1, rounds=2))
    assert res.settings["wall_rounds"] == "interleaved"
    rounds = [e for e in log if e[0] in ("warm", "sample", "time")]
    # Round 1: sdpa then fast; round 2 reversed. The card is sampled over the timed part only.
    expect = []
    for p in ("sdpa", "fast", "fast", "sdpa"):
        expect += [("warm", p), ("sample", "on"), ("time", p), ("sample", "off")]
    assert rounds == expect
    for p in ("sdpa", "fast"):
        mine = [e[0] for e in log if e[1] == p and e[0] in ("close", "wall", "teardown")]
        assert mine == ["close", "wall", "wall", "wall", "wall", "wall", "teardown"]
    # Every provider's graphs are closed before the first wall call, and the wall rounds
    # alternate like the GPU rounds (host drift then hits both providers alike).
    kinds = [e[0] for e in log if e[0] in ("close", "wall", "teardown")]
    assert kinds == ["close"] * 2 + ["wall"] * 10 + ["teardown"] * 2
    walls = [e[1] for e in log if e[0] == "wall"]
    assert walls == ["sdpa", "fast", "fast", "sdpa"] * 2 + ["sdpa", "fast"]

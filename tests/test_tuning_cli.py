"""`flashcore tune` end to end with the GPU faked, and the GPU fitness's correctness gate run
on the CPU (kernel launches and timing replaced; the logic around them is what is tested)."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from flashcore import cli
from flashcore.backends.cuda.config import CudaFwdConfig
from flashcore.backends.triton.config import TritonFwdConfig
from flashcore.reference import attention_reference
from flashcore.tuning import tables as tables_mod
from flashcore.tuning.cache import CACHE_ENV, default_cache
from flashcore.tuning.dispatch import select_config
from flashcore.tuning.fitness import GpuFitness, Problem
from flashcore.tuning.space import space_for

FAKE_GPU = "Fake GPU 80GB"
BEST = TritonFwdConfig(64, 128, 8, 2)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(tables_mod.TABLES_ENV, str(tmp_path / "tables"))
    yield


def test_tune_without_gpu_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["tune", "--shape", "1,2,128,64"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


class FakeFitness:
    """Stands in for GpuFitness: a landscape smooth in each field's axis position, with its
    unique optimum at BEST (Triton) or w4 n64 s3 (CUDA)."""

    instances: list[FakeFitness] = []

    def __init__(self, problem, backend, *, reps=100):
        self.problem, self.backend, self.details = problem, backend, {}
        self.space = space_for(backend, problem.d, problem.dtype)
        best = BEST if backend == "triton" else CudaFwdConfig(4, 64, 3)
        self.opt = self.space.coords(best)
        self.calls = 0
        FakeFitness.instances.append(self)

    def __call__(self, cfg):
        self.calls += 1
        self.details[cfg] = {"median_us": 0.0}
        d = [a - b for a, b in zip(self.space.coords(cfg), self.opt, strict=True)]
        return 20.0 * (1 + 0.15 * sum(x * x for x in d))


@pytest.fixture
def fake_gpu(monkeypatch):
    props = types.SimpleNamespace(name=FAKE_GPU, major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    import flashcore.tuning.fitness as fitness_mod

    monkeypatch.setattr(fitness_mod, "GpuFitness", FakeFitness)
    FakeFitness.instances.clear()
    yield


def test_tune_shape_compare_grid_writes_cache_table_and_report(tmp_path, capsys, fake_gpu):
    table = tmp_path / "tables" / "fake.json"
    report = tmp_path / "report.json"
    rc = cli.main([
        "tune", "--shape", "4,32,2048,128", "--compare-grid", "--replay-seeds", "4",
        "--write-table", str(table), "--json", str(report), "--quiet", "--gate", "predicate",
    ])
    out = capsys.readouterr()
    assert rc == 0, out.err
    # Evidence table on stdout.
    assert "| problem | grid best" in out.out and "B4 H32 S2048 D128 fp16 [triton]" in out.out
    rep = json.loads(report.read_text())
    (row,) = rep["problems"]
    c = row["comparison"]
    grid_size = len(space_for("triton", 128).valid_configs())
    assert c["grid_size"] == grid_size and c["grid_evaluations"] == grid_size
    assert c["grid_best"] == BEST.to_dict() and c["gap_pct"] is not None
    assert row["evo"]["evaluations"] <= math.floor(0.25 * grid_size)
    assert len(c["replay"]) == 4 and rep["env"]["gpu"] == FAKE_GPU
    assert row["heuristic_us"] is not None  # the heuristic is always measured (seeded)
    # The user cache and the table now serve this shape on this (fake) GPU.
    from flashcore.tuning.fitness import Problem as P

    key = P(4, 32, 32, 2048, 2048, 128).key(FAKE_GPU, "9.0", "triton")
    entry, _ = default_cache().lookup(key.to_str())
    assert entry["config"] == BEST.to_dict() and entry["grid_size"] == grid_size
    data = json.loads(table.read_text())
    assert data["gpu"] == FAKE_GPU and key.to_str() in data["entries"]
    sel = select_config(key, 128, 2048, 2048, 132)
    assert (sel.source, sel.config) == ("cache", BEST)


def test_tune_suite_dedups_buckets_and_respects_budget(tmp_path, capsys, fake_gpu, monkeypatch):
    Case = types.SimpleNamespace
    cases = [
        Case(b=2, hq=16, hkv=16, sq=1024, sk=1024, d=64, dtype="fp16", causal=True, suite="x"),
        Case(b=2, hq=16, hkv=16, sq=1000, sk=1000, d=64, dtype="fp16", causal=True, suite="x"),
        Case(b=1, hq=32, hkv=8, sq=512, sk=512, d=128, dtype="bf16", causal=False, suite="x"),
        Case(b=1, hq=8, hkv=8, sq=512, sk=512, d=96, dtype="fp16", causal=False, suite="x"),
    ]
    suites = types.ModuleType("flashcore.bench.suites")
    suites.suite_cases = lambda name: cases if name == "gqa" else []
    monkeypatch.setitem(sys.modules, "flashcore.bench.suites", suites)
    rc = cli.main(["tune", "--suite", "gqa", "--budget", "6", "--quiet", "--backend", "both",
                   "--no-cache", "--gate", "predicate"])
    err = capsys.readouterr().err
    assert rc == 0, err
    # 3 buckets (the first two cases share one); cuda runs only where it supports the case
    # (D=64/128 fp16/bf16), so D=96 is skipped for it.
    backends = sorted((f.problem.d, f.backend) for f in FakeFitness.instances)
    assert backends == [(64, "cuda"), (64, "triton"), (96, "triton"), (128, "cuda"),
                        (128, "triton")]
    assert "skip B1 H8 S512 D96 fp16 [cuda]" in err
    assert all(f.calls <= 6 for f in FakeFitness.instances)
    assert not default_cache().path.exists()  # --no-cache


def test_tune_suite_head_dims_filter(tmp_path, capsys, fake_gpu, monkeypatch):
    Case = types.SimpleNamespace
    cases = [Case(b=2, hq=16, hkv=16, sq=1024, sk=1024, d=d, dtype="fp16", causal=False,
                  suite="x") for d in (64, 128, 256)]
    suites = types.ModuleType("flashcore.bench.suites")
    suites.suite_cases = lambda name: cases
    monkeypatch.setitem(sys.modules, "flashcore.bench.suites", suites)
    base = ["tune", "--suite", "sweep", "--budget", "4", "--quiet", "--no-cache", "--gate",
            "predicate"]
    assert cli.main(base + ["--head-dims", "256", "64"]) == 0
    assert sorted(f.problem.d for f in FakeFitness.instances) == [64, 256]
    capsys.readouterr()
    assert cli.main(base + ["--head-dims", "96"]) != 0
    assert "no shape with head dim in [96]" in capsys.readouterr().err
    assert cli.main(["tune", "--shape", "1,8,512,64", "--head-dims", "64"]) != 0
    assert "--head-dims filters a --suite" in capsys.readouterr().err


def test_tune_suite_causal_and_seq_len_filters(tmp_path, capsys, fake_gpu, monkeypatch):
    """The short causal cells alone: --causal and --seq-lens narrow a suite like --head-dims."""
    Case = types.SimpleNamespace
    cases = [Case(b=16384 // s, hq=16, hkv=16, sq=s, sk=s, d=128, dtype="fp16", causal=c,
                  suite="x") for s in (512, 1024, 4096) for c in (False, True)]
    suites = types.ModuleType("flashcore.bench.suites")
    suites.suite_cases = lambda name: cases
    monkeypatch.setitem(sys.modules, "flashcore.bench.suites", suites)
    base = ["tune", "--suite", "sweep", "--budget", "4", "--quiet", "--no-cache", "--gate",
            "predicate"]
    assert cli.main(base + ["--causal", "--seq-lens", "512", "1024"]) == 0
    assert sorted((f.problem.sq, f.problem.causal) for f in FakeFitness.instances) == [
        (512, True), (1024, True)]
    capsys.readouterr()
    assert cli.main(base + ["--causal", "--seq-lens", "2048", "--head-dims", "128"]) != 0
    assert ("no shape with head dim in [128], query length in [2048], causal mask"
            in capsys.readouterr().err)
    assert cli.main(["tune", "--shape", "1,8,512,64", "--seq-lens", "512"]) != 0
    assert "--seq-lens filters a --suite" in capsys.readouterr().err


@pytest.mark.parametrize("backend,d", [("triton", 64), ("triton", 128), ("triton", 256),
                                       ("cuda", 64), ("cuda", 128)])
def test_config_names_round_trip(backend, d):
    """from_short inverts short() over the whole grid (the names --try and the reports use)."""
    cls = TritonFwdConfig if backend == "triton" else CudaFwdConfig
    configs = space_for(backend, d).valid_configs()
    assert configs
    for cfg in configs:
        assert cls.from_short(cfg.short()) == cfg


@pytest.mark.parametrize("name", ["bogus", "h064n128w8s2", "h64n128w8s2x", "m64n64w4s3tt"])
def test_triton_config_name_rejected(name):
    with pytest.raises(ValueError, match=f"config name '{name}' is not a Triton config name"):
        TritonFwdConfig.from_short(name)


@pytest.mark.parametrize("name", ["w4n64s2g0", "w4n64s2g1", "w04n64s2", "h64n64w8s2"])
def test_cuda_config_name_rejected(name):
    with pytest.raises(ValueError, match=f"config name '{name}' is not a CUDA config name"):
        CudaFwdConfig.from_short(name)


def test_tune_try_configs_are_measured_first(tmp_path, capsys, fake_gpu):
    """--try puts named configs in the first generation (measured even on a budget that the
    heuristic and they fill); a name outside the problem's grid is skipped with a message, a
    name of no backend is an error before any work."""
    tried = ["h64n64w8s2P", "m64n64w4s3t", "h64n64w4s2"]  # the last: 4 warps = no consumer
    rc = cli.main(["tune", "--shape", "2,16,1024,128", "--causal", "--budget", "3", "--quiet",
                   "--no-cache", "--gate", "predicate", "--try", *tried])
    err = capsys.readouterr().err
    assert rc == 0, err
    (fit,) = FakeFitness.instances
    measured = {c.short() for c in fit.details}
    assert {"h64n64w8s2P", "m64n64w4s3t"} <= measured and len(measured) == 3
    assert "--try h64n64w4s2 is not in the valid grid here; skipped" in err
    FakeFitness.instances.clear()
    assert cli.main(["tune", "--shape", "2,16,1024,128", "--try", "w8n64s2g4"]) == 2
    assert "--try 'w8n64s2g4' is not a config name of backend triton" in capsys.readouterr().err
    assert cli.main(["tune", "--shape", "2,16,1024,128", "--try", "bogus"]) == 2
    assert "--try 'bogus' is not a config name" in capsys.readouterr().err
    assert not FakeFitness.instances


def test_tune_resume_skips_tuned_problems_and_keeps_report(tmp_path, capsys, fake_gpu):
    table = tmp_path / "t.json"
    report = tmp_path / "r.json"
    base = ["tune", "--budget", "6", "--quiet", "--gate", "predicate", "--write-table",
            str(table), "--json", str(report), "--resume"]
    assert cli.main(base + ["--shape", "1,8,512,64"]) == 0
    assert len(FakeFitness.instances) == 1
    # A second run over two shapes tunes only the new one, and its report holds both.
    FakeFitness.instances.clear()
    assert cli.main(base + ["--shape", "1,8,512,64"]) == 0
    assert FakeFitness.instances == []
    assert "1 already tuned" in capsys.readouterr().err
    assert cli.main(base + ["--shape", "1,8,1024,64"]) == 0
    assert len(FakeFitness.instances) == 1
    assert len(json.loads(table.read_text())["entries"]) == 2
    assert len(json.loads(report.read_text())["problems"]) == 2


def test_tune_stop_after_starts_no_new_problem(tmp_path, capsys, fake_gpu):
    rc = cli.main(["tune", "--shape", "1,8,512,64", "--backend", "both", "--budget", "6",
                   "--quiet", "--gate", "predicate", "--stop-after", "0"])
    assert rc == 0 and FakeFitness.instances == []
    assert "--stop-after 0 s reached; 2 problem(s) left" in capsys.readouterr().err


# -- GpuFitness's correctness gate, on the CPU -------------------------------------------------


class FakeStats(types.SimpleNamespace):
    pass


@pytest.fixture
def cpu_fitness_env(monkeypatch):
    """Fake bench timing + a fake _forward that runs the reference through the Triton
    launcher's output allocator (so the fitness's NaN poisoning is exercised)."""
    timing = types.ModuleType("flashcore.bench.timing")
    timing.cold_l2_sets = lambda bytes_per_set, l2_bytes, min_sets=3: 3
    timed = []

    def time_cuda_graph(calls, *, reps=100, warmup=3, min_graph_us=200.0):
        for c in calls:
            c()
        timed.append(len(calls))
        return FakeStats(median_us=10.0, p10_us=9.0, p90_us=11.0, mean_us=10.0, min_us=9.0,
                         reps=reps, calls_per_rep=len(calls))

    timing.time_cuda_graph = time_cuda_graph
    monkeypatch.setitem(sys.modules, "flashcore.bench.timing", timing)
    import flashcore.api as api
    import flashcore.backends.triton.fwd as fwd

    def fake_forward(q, k, v, scale, is_causal, align, return_lse, backend, config=None):
        out = fwd._alloc_out(q)
        ref, _ = attention_reference(q, k, v, is_causal=is_causal, scale=scale,
                                     causal_align=align, compute_dtype=torch.float32)
        if config.block_m == 32:  # "forgets" the last row tile
            out[:, :, : q.shape[2] - 8].copy_(ref[:, :, : q.shape[2] - 8])
        elif config.block_n == 32:  # numerically wrong
            out.copy_(ref + 0.05)
        elif config.num_stages == 4:
            raise RuntimeError("out of resources: shared memory")
        else:
            out.copy_(ref)
        return out, None

    monkeypatch.setattr(api, "_forward", fake_forward)
    return timed


def test_gpu_fitness_correctness_is_a_hard_constraint(cpu_fitness_env):
    p = Problem(1, 2, 1, 40, 40, 64, "fp16", causal=True)
    f = GpuFitness(p, "triton", device="cpu", check_rows=16)
    assert len(f.sets) == 3 and f.rows[0] == 0 and f.rows[-1] == 39 and len(f.rows) == 16
    assert f(TritonFwdConfig(64, 64, 4, 2)) == 10.0
    assert cpu_fitness_env == [3]  # timed over the 3 rotating input sets
    assert f.details[TritonFwdConfig(64, 64, 4, 2)]["max_err"] <= f.tolerance
    # Unwritten rows: NaN from the poisoned allocator, rejected.
    assert f(TritonFwdConfig(32, 64, 4, 2)) is None
    assert "NaN" in f.details[TritonFwdConfig(32, 64, 4, 2)]["error"]
    assert f(TritonFwdConfig(64, 32, 4, 2)) is None
    assert "tolerance" in f.details[TritonFwdConfig(64, 32, 4, 2)]["error"]
    assert f(TritonFwdConfig(64, 64, 4, 4)) is None
    assert "out of resources" in f.details[TritonFwdConfig(64, 64, 4, 4)]["error"]
    assert cpu_fitness_env == [3]  # failing configs were never timed
    # The poisoned allocator was restored.
    import flashcore.backends.triton.fwd as fwd

    q = torch.zeros(1, 1, 2, 8)
    assert not torch.isnan(fwd._alloc_out(q).fill_(0)).any()


def test_precompile_fills_tritons_cache(tmp_path, monkeypatch):
    """Worker processes compile real Hopper variants (no GPU needed) into Triton's on-disk
    cache, where the search's own compile of the same variant then hits."""
    from flashcore.tuning.fitness import precompile

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    p = Problem(1, 2, 2, 64, 64, 64, "fp16", causal=False)
    cfgs = [TritonFwdConfig(64, 32, 4, 1)]
    ok, tried, _ = precompile(p, "triton", cfgs, cc="9.0", workers=1)
    assert (ok, tried) == (1, 1)
    assert any(f.suffix == ".cubin" for f in (tmp_path / "triton").rglob("*"))
    assert precompile(p, "cuda", cfgs, cc="9.0") == (0, 0, 0.0)



def test_prefetcher_compiles_and_gates_in_workers(tmp_path, monkeypatch):
    """The prefetcher's workers build the launcher's variant and return the resource gate's
    verdict; the wrapped gate answers from it (the search's own gate is never asked), and
    another problem of the same class shares the queued work."""
    from flashcore.tuning.fitness import Prefetcher

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    p = Problem(1, 2, 2, 64, 64, 64, "fp16", causal=True)
    good = TritonFwdConfig(64, 32, 4, 1)
    spills = TritonFwdConfig(64, 128, 4, 3)  # spills at fp16 D=64 (measured: the gate rejects)
    pf = Prefetcher("9.0", gate=True, workers=2)
    try:
        assert pf.submit(p, "triton", [good, spills]) == 2
        # Same class (dtype, head dim, causal), other sequence length: nothing new to queue.
        assert pf.submit(Problem(4, 2, 2, 2048, 2048, 64, "fp16", causal=True), "triton",
                         [good]) == 0
        asked = []
        gate = pf.wrap_gate(lambda c: asked.append(c) or True, p, "triton")
        assert gate(good) is True
        assert gate(spills) is False
        assert asked == []
        assert pf.verdict(p, "triton", TritonFwdConfig(64, 64, 4, 2)) is None  # not queued
    finally:
        pf.close()
    assert any(f.suffix == ".cubin" for f in (tmp_path / "triton").rglob("*"))


def test_tune_confirm_retimes_the_finalists_interleaved_and_picks_by_median(
        tmp_path, capsys, fake_gpu, monkeypatch):
    """--confirm N: the heuristic, the best and the runner-up are timed again in N rounds
    (A B C, C B A, ...); the entry takes the lowest median, with both times from the rounds.
    The fake fitness makes the search's best look fast once (a lucky timing) and slow after."""
    calls: list[str] = []
    seen: dict[str, int] = {}
    orig = FakeFitness.__call__

    def noisy(self, cfg):
        n = seen[cfg.short()] = seen.get(cfg.short(), 0) + 1
        calls.append(cfg.short())
        t = orig(self, cfg)
        return t * (0.5 if (cfg == BEST and n == 1) else 1.0) * (1.3 if cfg == BEST else 1.0)

    monkeypatch.setattr(FakeFitness, "__call__", noisy)
    report = tmp_path / "r.json"
    table = tmp_path / "t.json"
    rc = cli.main(["tune", "--shape", "4,32,2048,128", "--budget", "40", "--quiet", "--no-cache",
                   "--gate", "predicate", "--confirm", "3", "--json", str(report),
                   "--write-table", str(table)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    (row,) = json.loads(report.read_text())["problems"]
    conf = row["confirm"]
    assert conf["rounds"] == 3 and len(conf["times_us"]) == 3
    assert all(len(t) == 3 for t in conf["times_us"].values())
    # The search's best (BEST, lucky once) loses the re-timing to the runner-up.
    assert row["evo"]["best"] == BEST.to_dict()
    assert conf["best"] != BEST.short() and row["best"] != BEST.to_dict()
    assert row["best_us"] == pytest.approx(min(
        sorted(t)[1] for t in conf["times_us"].values()))
    entry = next(iter(json.loads(table.read_text())["entries"].values()))
    assert entry["method"] == "evo+confirm" and entry["time_us"] == row["best_us"]
    # Round order alternates: the last 9 calls are A B C, C B A, A B C.
    tail = calls[-9:]
    assert tail[:3] == tail[3:6][::-1] == tail[6:]
    assert "confirmed over 3 rounds" in out.out
    assert cli.main(["tune", "--shape", "4,32,2048,128", "--confirm", "-1"]) == 2
    assert "--confirm must be >= 0 rounds, got -1" in capsys.readouterr().err

"""Dispatch order (user cache > shipped table > heuristic) and what Selection.reason says."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from flashcore.backends.cuda.config import CudaFwdConfig
from flashcore.backends.triton.config import TritonFwdConfig
from flashcore.tuning import dispatch
from flashcore.tuning import tables as tables_mod
from flashcore.tuning.cache import CACHE_ENV, TuningCacheWarning, default_cache, make_entry
from flashcore.tuning.dispatch import DISPATCH_ENV, heuristic_config, select_config
from flashcore.tuning.key import ProblemKey

GPU, CC = "NVIDIA H100 80GB HBM3", "9.0"
SHAPE = dict(batch_heads=128, sq=2048, sk=2048, num_sms=132)
CACHED = TritonFwdConfig(64, 128, 8, 2)
TABLED = TritonFwdConfig(128, 32, 8, 2)


def key(backend: str = "triton", **kw) -> ProblemKey:
    args = dict(gpu=GPU, cc=CC, backend=backend, dtype="fp16", head_dim=128, causal=False,
                gqa=1, sq=2048, sk=2048, bh=128)
    args.update(kw)
    return ProblemKey.make(**args)


def triton_entry(cfg: TritonFwdConfig, t: float, **kw) -> dict:
    return make_entry("triton", cfg.to_dict(), t, **kw)


def cuda_entry(cfg: CudaFwdConfig, t: float, **kw) -> dict:
    return make_entry("cuda", cfg.to_dict(), t, **kw)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(tables_mod.TABLES_ENV, str(tmp_path / "tables"))
    monkeypatch.delenv(DISPATCH_ENV, raising=False)
    yield


def put_cache(k: ProblemKey, e: dict) -> None:
    default_cache().put(k.to_str(), e)


def put_table(tmp_path, k: ProblemKey, e: dict, name: str = "h100.json", gpu: str = GPU,
              cc: str = CC, fp: str | None = None) -> None:
    p = tmp_path / "tables" / name
    tables_mod.write_table(p, gpu, cc, {k.to_str(): e})
    if fp is not None:  # pretend the table was tuned for other kernel sources
        data = json.loads(p.read_text())
        data["fingerprint"] = fp
        for v in data["entries"].values():
            v["fingerprint"] = fp
        p.write_text(json.dumps(data))


def test_heuristic_without_tuned_entries():
    sel = select_config(key(), **SHAPE)
    assert sel.source == "heuristic" and sel.backend == "triton"
    assert sel.config == heuristic_config(key(), **SHAPE)
    assert sel.reason.startswith("heuristic: no tuned entry") and GPU in sel.reason
    assert sel.time_us is None


def test_table_then_cache_order(tmp_path):
    put_table(tmp_path, key(), triton_entry(TABLED, 45.0, heuristic_time_us=60.0))
    sel = select_config(key(), **SHAPE)
    assert (sel.source, sel.config) == ("table", TABLED)
    assert sel.reason.startswith("shipped table h100.json (tuned ")
    assert "45.0 us; heuristic 60.0 us" in sel.reason and "older kernel" not in sel.reason

    put_cache(key(), triton_entry(CACHED, 41.2, tuned_at="2026-11-25T10:00:00Z"))
    sel = select_config(key(), **SHAPE)
    assert (sel.source, sel.config, sel.time_us) == ("cache", CACHED, 41.2)
    assert sel.reason.startswith("user cache ")
    assert "(tuned 2026-11-25, 41.2 us)" in sel.reason


def test_cache_wins_even_when_table_records_faster(tmp_path):
    # The user's own measurement on their own machine is trusted over the shipped one.
    put_table(tmp_path, key(), triton_entry(TABLED, 10.0))
    put_cache(key(), triton_entry(CACHED, 41.2))
    assert select_config(key(), **SHAPE).source == "cache"


def test_other_gpu_table_and_other_bucket_are_not_used(tmp_path):
    other = key(gpu="NVIDIA A100-SXM4-80GB", cc="8.0")
    put_table(tmp_path, other, triton_entry(TABLED, 45.0), name="a100.json",
              gpu="NVIDIA A100-SXM4-80GB", cc="8.0")
    put_table(tmp_path, key(sq=8192, sk=8192), triton_entry(TABLED, 45.0))
    assert select_config(key(), **SHAPE).source == "heuristic"
    # Same bucket (sq 1025..2048) is served by the entry tuned at 2048.
    k = key(sq=1500, sk=1500)
    put_table(tmp_path, k, triton_entry(TABLED, 45.0))
    assert k == key() and select_config(key(sq=1100, sk=1100), **SHAPE).source == "table"


def test_stale_cache_entry_falls_through_with_warning(tmp_path):
    put_cache(key(), triton_entry(CACHED, 41.2, fp="0" * 16))
    with pytest.warns(TuningCacheWarning, match="stale"):
        sel = select_config(key(), **SHAPE)
    assert sel.source == "heuristic" and "stale cache entry ignored" in sel.reason
    put_table(tmp_path, key(), triton_entry(TABLED, 45.0))
    sel = select_config(key(), **SHAPE)
    assert (sel.source, sel.config) == ("table", TABLED)


def test_table_for_older_kernel_still_used_and_says_so(tmp_path):
    put_table(tmp_path, key(), triton_entry(TABLED, 45.0), fp="0" * 16)
    sel = select_config(key(), **SHAPE)
    assert (sel.source, sel.config) == ("table", TABLED)
    assert "tuned for an older kernel" in sel.reason


def test_invalid_config_in_table_is_never_dispatched(tmp_path):
    # 4 stages of 128x256 K/V tiles at D=256 do not fit in shared memory.
    k = key(head_dim=256)
    bad = TritonFwdConfig(128, 128, 8, 4)
    put_table(tmp_path, k, triton_entry(bad, 1.0))
    with pytest.warns(TuningCacheWarning, match="not valid"):
        sel = select_config(k, **SHAPE)
    assert sel.source == "heuristic" and sel.config != bad
    assert "invalid for the current kernel" in sel.reason


@pytest.mark.parametrize("cfg", [{"block_m": "sixty-four"}, {"block_m": 64}])
def test_config_of_wrong_shape_is_ignored(tmp_path, cfg):
    # Unparseable, or missing fields (from_dict may default them: then it is off the axes).
    put_cache(key(), make_entry("triton", cfg, 1.0))
    with pytest.warns(TuningCacheWarning, match="does not fit|not valid"):
        assert select_config(key(), **SHAPE).source == "heuristic"


def test_corrupt_cache_and_table_never_crash(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tuning.json").write_text("garbage")
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "h100.json").write_text("{]")
    with pytest.warns(TuningCacheWarning):
        sel = select_config(key(), **SHAPE)
    assert sel.source == "heuristic"


@pytest.fixture
def cuda_installed(monkeypatch):
    monkeypatch.setattr(dispatch, "_cuda_available", lambda: True)


def test_auto_picks_the_faster_backend(tmp_path, cuda_installed):
    put_cache(key("triton"), triton_entry(CACHED, 41.2))
    put_cache(key("cuda"), cuda_entry(CudaFwdConfig(4, 64, 2), 38.0))
    sel = select_config(key("auto"), **SHAPE)
    assert (sel.backend, sel.config, sel.source) == ("cuda", CudaFwdConfig(4, 64, 2), "cache")
    assert "auto chose cuda (38.0 us) over triton (41.2 us)" in sel.reason
    # A named backend only ever gets its own entries.
    assert select_config(key("triton"), **SHAPE).config == CACHED


def test_auto_ignores_cuda_when_its_backend_is_not_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "_cuda_available", lambda: False)
    put_table(tmp_path, key("cuda"), cuda_entry(CudaFwdConfig(4, 64, 2), 1.0))
    sel = select_config(key("auto"), **SHAPE)
    assert (sel.backend, sel.source) == ("triton", "heuristic")
    assert "cuda backend not installed" in sel.reason
    # Named explicitly, cuda's entry is still used (the api reports the missing backend).
    assert select_config(key("cuda"), **SHAPE).source == "table"


def test_auto_never_picks_cuda_where_it_cannot_run(tmp_path, cuda_installed):
    # fp32 is not supported by the CUDA kernel: its entry (however fast) is rejected.
    k = key(dtype="fp32")
    put_table(tmp_path, dataclasses.replace(k, backend="cuda"),
              cuda_entry(CudaFwdConfig(4, 64, 2), 1.0))
    with pytest.warns(TuningCacheWarning):
        sel = select_config(dataclasses.replace(k, backend="auto"), **SHAPE)
    assert (sel.backend, sel.source) == ("triton", "heuristic")


def test_auto_heuristic_is_triton():
    sel = select_config(key("auto"), **SHAPE)
    assert sel.backend == "triton" and sel.source == "heuristic"


def test_dispatch_env_restricts_sources(tmp_path, monkeypatch):
    put_table(tmp_path, key(), triton_entry(TABLED, 45.0))
    put_cache(key(), triton_entry(CACHED, 41.2))
    monkeypatch.setenv(DISPATCH_ENV, "table")
    sel = select_config(key(), **SHAPE)
    assert (sel.source, sel.config) == ("table", TABLED)
    monkeypatch.setenv(DISPATCH_ENV, "heuristic")
    sel = select_config(key(), **SHAPE)
    assert sel.source == "heuristic" and "disabled" in sel.reason
    monkeypatch.setenv(DISPATCH_ENV, "bogus")
    with pytest.warns(TuningCacheWarning):
        assert select_config(key(), **SHAPE).source == "cache"


def test_api_select_for_goes_through_the_cache(tmp_path):
    """flashcore.api's dispatch (CPU device: gpu 'cpu', cc '0.0') sees a cache entry."""
    from flashcore import api

    k = ProblemKey.make("cpu", "0.0", "triton", "fp16", 64, True, 2, 300, 300, 3 * 8)
    put_cache(k, triton_entry(TritonFwdConfig(64, 64, 4, 2), 12.5))
    api._SELECTIONS.clear()
    try:
        sel = api.select_for(torch.device("cpu"), torch.float16, 3, 8, 4, 300, 300, 64, True,
                             "triton")
    finally:
        api._SELECTIONS.clear()
    assert (sel.source, sel.config) == ("cache", TritonFwdConfig(64, 64, 4, 2))


def test_lookups_are_cached_per_process(tmp_path, monkeypatch):
    put_table(tmp_path, key(), triton_entry(TABLED, 45.0))
    select_config(key(), **SHAPE)
    reads = []
    orig = tables_mod._parse
    monkeypatch.setattr(tables_mod, "_parse", lambda p: reads.append(p) or orig(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert select_config(key(), **SHAPE).source == "table"
    assert reads == []  # unchanged file: not parsed again

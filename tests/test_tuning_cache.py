"""The user's tuning cache and the shipped tables: concurrency, corruption, staleness."""

from __future__ import annotations

import json
import multiprocessing as mp
import warnings
from pathlib import Path

import pytest

from flashcore.tuning import cache as cache_mod
from flashcore.tuning import tables as tables_mod
from flashcore.tuning.cache import (
    CACHE_ENV,
    TuningCache,
    TuningCacheWarning,
    cache_path,
    default_cache,
    fingerprint,
    make_entry,
)

KEY = "gpu=NVIDIA H100 80GB HBM3|cc=9.0|backend=triton|dtype=fp16|head_dim=128|causal=False|" \
      "gqa=1|sq=2048|sk=2048|bh=128"


def entry(t: float = 41.2, **kw) -> dict:
    return make_entry(
        "triton", {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}, t, **kw
    )


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(tables_mod.TABLES_ENV, str(tmp_path / "tables"))
    yield


def test_cache_location_follows_env(tmp_path, monkeypatch):
    assert cache_path() == tmp_path / "cache" / "tuning.json"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path() == tmp_path / "xdg" / "flashcore" / "tuning.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_path() == Path.home() / ".cache" / "flashcore" / "tuning.json"


def test_roundtrip_and_file_format(tmp_path):
    c = TuningCache()
    assert c.lookup(KEY) == (None, None)  # no file yet: nothing, no warning
    c.put(KEY, entry())
    got, why = c.lookup(KEY)
    assert why is None and got["time_us"] == 41.2 and got["fingerprint"] == fingerprint()
    data = json.loads(c.path.read_text())
    assert data["version"] == 1 and KEY in data["entries"]
    # No temp files left behind by the atomic write.
    assert sorted(p.name for p in c.path.parent.iterdir()) == ["tuning.json", "tuning.json.lock"]
    # Another TuningCache object (another process, in effect) sees the write.
    assert TuningCache(c.path).lookup(KEY)[0]["time_us"] == 41.2


def test_put_merges_and_replaces():
    c = TuningCache()
    c.put(KEY, entry(50.0))
    c.put("other", entry(10.0))
    c.put(KEY, entry(40.0))
    e = c.entries()
    assert set(e) == {KEY, "other"} and e[KEY]["time_us"] == 40.0


def test_refuses_malformed_entry():
    with pytest.raises(ValueError):
        TuningCache().put(KEY, {"backend": "triton", "config": {}, "time_us": -1})


def _writer(path: str, prefix: str, n: int, barrier) -> None:
    c = TuningCache(path)
    barrier.wait()
    for i in range(n):
        c.put(f"{prefix}{i}", entry(float(i + 1)))


def test_two_processes_writing_at_once(tmp_path):
    """Each process writes its own keys one by one (a read-modify-write each), both starting
    together: without the lock, one's read-modify-write overwrites the other's entries."""
    path = tmp_path / "cache" / "tuning.json"
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    n = 40
    procs = [ctx.Process(target=_writer, args=(str(path), p, n, barrier)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(path.read_text())  # valid JSON
    keys = set(data["entries"])
    assert keys == {f"{p}{i}" for p in "ab" for i in range(n)}


def test_corrupt_file_warns_is_ignored_and_recovers():
    c = TuningCache()
    c.path.parent.mkdir(parents=True)
    c.path.write_text('{"version": 1, "entries": {"x": ')  # truncated write of an old tool
    with pytest.warns(TuningCacheWarning, match="not valid JSON"):
        assert c.lookup(KEY) == (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file state, not per lookup
        assert c.lookup(KEY) == (None, None)
    c.put(KEY, entry())
    assert c.lookup(KEY)[0]["time_us"] == 41.2
    assert c.path.with_name("tuning.json.corrupt").read_text().startswith('{"version": 1')
    json.loads(c.path.read_text())


@pytest.mark.parametrize("text", ["[1, 2]", '{"entries": {}}', '{"version": 99, "entries": {}}',
                                  "\xff\xfe"])
def test_wrong_structure_is_ignored(text):
    c = TuningCache()
    c.path.parent.mkdir(parents=True)
    c.path.write_bytes(text.encode("latin-1"))
    with pytest.warns(TuningCacheWarning):
        assert c.entries() == {}
    c.put(KEY, entry())
    assert c.lookup(KEY)[0] is not None


def test_stale_fingerprint_is_ignored_with_warning():
    c = TuningCache()
    c.put(KEY, entry(fp="0123456789abcdef"))
    with pytest.warns(TuningCacheWarning, match="stale"):
        got, why = c.lookup(KEY)
    assert got is None and "stale" in why
    c.put(KEY, entry())  # retuned: current again
    assert c.lookup(KEY)[0] is not None


def test_malformed_entry_is_ignored_with_warning():
    c = TuningCache()
    c.path.parent.mkdir(parents=True)
    c.path.write_text(json.dumps({"version": 1, "entries": {KEY: {"backend": "triton"}}}))
    with pytest.warns(TuningCacheWarning, match="ignored"):
        assert c.lookup(KEY)[0] is None


def test_fingerprint_covers_kernel_sources(monkeypatch, tmp_path):
    fp = fingerprint()
    assert len(fp) == 16 and fp == fingerprint()
    # A copy of the package with one byte of fwd.py changed fingerprints differently.
    import shutil

    root = Path(cache_mod.__file__).resolve().parent.parent
    copy = tmp_path / "pkg"
    shutil.copytree(root / "backends", copy / "backends")
    monkeypatch.setattr(cache_mod, "_package_root", lambda: copy)
    fingerprint.cache_clear()
    try:
        assert fingerprint() == fp
        # A heuristic / search-space edit does not change what a config runs: same fingerprint.
        cfg = copy / "backends" / "cuda" / "config.py"
        cfg.write_text(cfg.read_text() + "\n# edited\n")
        fingerprint.cache_clear()
        assert fingerprint() == fp
        cu = copy / "backends" / "cuda" / "fwd.cu"
        cu.write_text(cu.read_text() + "\n// edited\n")
        fingerprint.cache_clear()
        assert fingerprint() != fp
        fp = fingerprint()
        fwd = copy / "backends" / "triton" / "fwd.py"
        fwd.write_text(fwd.read_text() + "\n# edited\n")
        fingerprint.cache_clear()
        assert fingerprint() != fp
    finally:
        fingerprint.cache_clear()


def test_default_cache_follows_env(tmp_path, monkeypatch):
    a = default_cache()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    b = default_cache()
    assert a.path != b.path and b.path.parent == tmp_path / "elsewhere"


# -- shipped tables ----------------------------------------------------------------------------


def test_write_table_merges_and_refuses_other_gpu(tmp_path):
    p = tmp_path / "tables" / "h100.json"
    tables_mod.write_table(p, "NVIDIA H100 80GB HBM3", "9.0", {KEY: entry(40.0)})
    tables_mod.write_table(p, "NVIDIA H100 80GB HBM3", "9.0", {"k2": entry(30.0)})
    data = json.loads(p.read_text())
    assert data["gpu"] == "NVIDIA H100 80GB HBM3" and data["cc"] == "9.0"
    assert data["fingerprint"] == fingerprint() and set(data["entries"]) == {KEY, "k2"}
    with pytest.raises(ValueError, match="own file"):
        tables_mod.write_table(p, "NVIDIA A100-SXM4-80GB", "8.0", {KEY: entry()})
    # The lock file lives in the cache dir, not beside the table in the package.
    assert sorted(x.name for x in p.parent.iterdir()) == ["h100.json"]
    assert tables_mod.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"


def test_corrupt_table_warns_and_is_skipped(tmp_path):
    d = tmp_path / "tables"
    d.mkdir()
    (d / "bad.json").write_text("{")
    tables_mod.write_table(d / "h100.json", "G", "9.0", {KEY: entry()})
    with pytest.warns(TuningCacheWarning, match="bad.json"):
        names = [t.name for t in tables_mod.load_tables()]
    assert names == ["h100.json"]

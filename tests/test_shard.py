"""The test suite's --shard K/N option (tests/conftest.py): N shards run each test exactly once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A small file with parametrised tests: collection only, no kernel runs.
TARGET = "tests/test_bench_suites.py"


def _collect(*extra: str) -> tuple[int, list[str], str]:
    """Node ids pytest collects (and keeps) from TARGET with these extra arguments."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         TARGET, *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    return r.returncode, ids, r.stdout + r.stderr


def test_shards_partition_the_suite():
    rc, full, out = _collect()
    assert rc == 0, out
    assert len(full) >= 6, out
    shards = []
    for k in (1, 2, 3):
        rc, ids, out = _collect("--shard", f"{k}/3")
        assert rc == 0, out
        assert ids, f"shard {k}/3 is empty:\n{out}"
        shards.append(ids)
    flat = [i for ids in shards for i in ids]
    assert len(flat) == len(set(flat)), "a test is in two shards"
    assert sorted(flat) == sorted(full), "the shards do not add up to the suite"
    # Round-robin: shard sizes differ by at most one.
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shards_split_what_k_selects():
    # Sharding runs after -k / -m deselection, so the selected tests are split evenly. These
    # three stand at even positions of TARGET's collection (0, 12, 14 today): a shard taken
    # before the -k filter would put all three in shard 1/2 and none in 2/2.
    sel = ("-k", "noncausal_flops or mission_suite or gqa_and_headdims")
    rc, full, out = _collect(*sel)
    assert rc == 0 and len(full) == 3, out
    shards = [_collect(*sel, "--shard", f"{k}/2")[1] for k in (1, 2)]
    assert sorted(shards[0] + shards[1]) == sorted(full), shards
    assert not set(shards[0]) & set(shards[1])
    assert abs(len(shards[0]) - len(shards[1])) <= 1, shards


@pytest.mark.parametrize("bad", ["0/3", "4/3", "x", "1/0", "2", "1/2/3"])
def test_bad_shard_is_a_usage_error(bad):
    from conftest import parse_shard

    with pytest.raises(pytest.UsageError, match=r"--shard: expected K/N with 1 <= K <= N, got"):
        parse_shard(bad)


def test_bad_shard_stops_the_run():
    rc, ids, out = _collect("--shard", "4/3")
    assert rc == 4, out  # pytest's exit code for a usage error
    assert not ids and "--shard: expected K/N with 1 <= K <= N, got '4/3'" in out, out

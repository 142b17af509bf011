"""Shared test setup.

Without a GPU the Triton kernels run through Triton's interpreter, which must be switched on
before triton is imported: this file runs first, and ``import torch`` does not import triton.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_addoption(parser):
    parser.addoption(
        "--shard", default=None, metavar="K/N",
        help="run only the K-th of N shards of the selected tests (every N-th test, from the "
             "K-th, after -m / -k): N calls with K = 1..N and the same other arguments run each "
             "test exactly once, as long as the collection order is the same in every call "
             "(no --lf / --ff / --nf, no random ordering). For a GPU suite that does not fit "
             "one time-limited device call (~490 GPU tests, over 10 minutes on an H100).",
    )


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 1 <= K <= N; a usage error naming the option otherwise."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise pytest.UsageError(f"--shard: expected K/N with 1 <= K <= N, got {text!r}")
    return k, n


def pytest_configure(config):
    if config.getoption("--shard") is not None:
        parse_shard(config.getoption("--shard"))  # a bad value stops the run before collection


# trylast: shard what -m / -k (pytest's own hooks) left selected, so the shards come out even.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if shard is not None:
        k, n = parse_shard(shard)
        # Round-robin over the collection order rather than contiguous slices: a file's slow
        # parametrisations (compiles) spread over the shards instead of landing in one. The
        # order is deterministic, so xdist workers, which each collect, agree on the shard.
        keep = [it for i, it in enumerate(items) if i % n == k - 1]
        drop = [it for i, it in enumerate(items) if i % n != k - 1]
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def poison_triton(monkeypatch):
    """Every output buffer the Triton launcher allocates starts as NaN: unwritten elements
    fail the check. (Imported here, not at the top: triton must load after TRITON_INTERPRET.)"""
    from flashcore.backends.triton import fwd as triton_fwd

    monkeypatch.setattr(triton_fwd, "_alloc_out", lambda q: torch.full_like(q, float("nan")))
    monkeypatch.setattr(
        triton_fwd,
        "_alloc_lse",
        lambda b, h, s, device: torch.full((b, h, s), float("nan"), device=device),
    )

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


def pytest_collection_modifyitems(config, items):
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

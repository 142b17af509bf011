"""FLOP formulas and the benchmark suites (CPU only)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashcore.bench.suites import (
    SUITES,
    Case,
    attention_flops,
    interpret_cases,
    suite_cases,
    visible_pairs,
)
from flashcore.reference import causal_offset


def _mask_pairs(sq: int, sk: int, offset: int) -> int:
    """Visible pairs counted from the reference's own causal mask (cols <= row + offset)."""
    rows = torch.arange(sq)[:, None]
    cols = torch.arange(sk)[None, :]
    return int((cols <= rows + offset).sum())


def test_noncausal_flops_is_4_b_h_sq_sk_d():
    assert attention_flops(2, 3, 5, 7, 64, causal=False) == 4 * 2 * 3 * 5 * 7 * 64
    assert visible_pairs(5, 7, causal=False) == 35


@pytest.mark.parametrize("s", [1, 2, 512, 16384])
def test_causal_square_flops_is_half_of_dense(s):
    dense = attention_flops(4, 16, s, s, 128, causal=False)
    assert attention_flops(4, 16, s, s, 128, causal=True) * 2 == dense
    # ... while the exact count (documented deviation of the convention) is s(s+1)/2 pairs.
    assert visible_pairs(s, s, causal=True) == s * (s + 1) // 2


@pytest.mark.parametrize(
    "sq,sk,align,pairs",
    [
        (2, 4, "top_left", 1 + 2),  # rows see 1, 2 keys
        (2, 4, "bottom_right", 3 + 4),  # offset 2: rows see 3, 4 keys
        (4, 2, "top_left", 1 + 2 + 2 + 2),  # rows past Sk see all keys
        (4, 2, "bottom_right", 0 + 0 + 1 + 2),  # offset -2: first two rows see nothing
        (1, 8, "bottom_right", 8),  # decode: the one query sees the whole cache
    ],
)
def test_causal_rectangular_counts_visible_pairs(sq, sk, align, pairs):
    off = causal_offset(sq, sk, align)
    assert visible_pairs(sq, sk, True, off) == pairs
    assert attention_flops(2, 3, sq, sk, 16, True, off) == 4 * 2 * 3 * 16 * pairs


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 40), st.integers(0, 40), st.integers(-50, 50))
def test_visible_pairs_matches_the_mask(sq, sk, offset):
    assert visible_pairs(sq, sk, True, offset) == _mask_pairs(sq, sk, offset)


def test_case_flops_bytes_label():
    c = Case(2, 32, 8, 1024, 2048, 128, "bf16", True, "gqa")
    assert c.gqa
    assert c.flops() == 4 * 2 * 32 * 128 * visible_pairs(1024, 2048, True)
    q = 2 * 32 * 1024 * 128 * 2
    kv = 2 * 8 * 2048 * 128 * 2
    assert c.input_bytes() == q + 2 * kv
    assert c.bytes() == 2 * q + 2 * kv  # + the output
    assert c.label() == "B2 H32/8 S1024/2048 D128 bf16 causal"
    assert Case.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        Case(1, 6, 4, 8, 8, 64, "fp16", False)  # Hq not a multiple of Hkv


def test_mission_suite():
    cases = suite_cases("mission")
    assert [(c.b, c.hq, c.hkv, c.sq, c.sk, c.d, c.dtype) for c in cases] == [
        (1, 8, 8, 512, 512, 64, "fp16")
    ] * 2
    assert sorted(c.causal for c in cases) == [False, True]


def test_sweep_suite_is_the_flashattention_sweep():
    cases = suite_cases("sweep")
    assert len(cases) == 6 * 3 * 2 * 2
    for c in cases:
        assert c.b * c.sq == 16384 and c.hq * c.d == 2048 and c.sq == c.sk and not c.gqa
    assert {c.sq for c in cases} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {c.d for c in cases} == {64, 128, 256}
    assert {(c.dtype, c.causal) for c in cases} == {
        (dt, ca) for dt in ("fp16", "bf16") for ca in (False, True)
    }
    assert len(set(cases)) == len(cases)


def test_gqa_and_headdims_suites():
    gqa = suite_cases("gqa")
    assert {(c.hq, c.hkv, c.d) for c in gqa} == {(32, 8, 128)}
    assert {c.sq for c in gqa} == {1024, 2048, 4096, 8192}
    hd = suite_cases("headdims")
    assert {c.d for c in hd} == {40, 80, 96, 192} and {c.sq for c in hd} == {2048}
    assert len(suite_cases("all")) == sum(len(suite_cases(s)) for s in SUITES)
    with pytest.raises(ValueError, match="unknown suite"):
        suite_cases("nope")


def test_interpret_cases_are_tiny_and_keep_what_matters():
    tiny = interpret_cases(suite_cases("all"))
    assert all(c.b == 1 and c.sq <= 64 and c.sk <= 64 for c in tiny)
    assert len(set(tiny)) == len(tiny)
    assert {c.d for c in tiny} == {64, 128, 256, 40, 80, 96, 192}
    assert {c.hq // c.hkv for c in tiny if c.suite == "gqa"} == {4}
    assert {c.suite for c in tiny} == set(SUITES)

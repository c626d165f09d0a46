"""gateway.rules.picks.rounded: round(score, 6) for the float32 scores answers carry."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from gateway.rules.picks import rounded


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_rounded_equals_round_to_six_digits(score: float) -> None:
    assert rounded(score) == round(score, 6)


def test_rounded_equals_round_on_ties_and_many_scores() -> None:
    rng = np.random.default_rng(7)
    scores = rng.standard_normal(200_000).astype(np.float32).tolist()
    # float32 values nearest to k + 0.5 millionths: where half-even and half-up rounding differ
    scores += np.float32(np.arange(0, 2_000_000, 3) / 1e6 + 0.5e-6).tolist()
    assert [rounded(s) for s in scores] == [round(s, 6) for s in scores]


def test_rounded_keeps_what_is_not_finite() -> None:
    assert rounded(math.inf) == math.inf
    assert rounded(-math.inf) == -math.inf
    assert math.isnan(rounded(math.nan))

"""The compiled kernels (gateway.recommend.kernels) against the numpy definitions they replace."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from gateway.recommend import kernels
from index_builder.model import ModelParams, fold_in_low_rank, profile_confidence, regularized_gram

ITEMS, FACTORS, NEIGHBOURS = 800, 16, 30


def catalog(seed: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.floating[Any]], npt.NDArray[np.int32]]:
    rng = np.random.default_rng(seed)
    vectors = (rng.normal(size=(ITEMS, FACTORS)) * 0.3).astype(np.float32)
    inverse = np.linalg.inv(regularized_gram(vectors, 10.0))
    neighbours = rng.integers(0, ITEMS, size=(ITEMS, NEIGHBOURS)).astype(np.int32)
    return vectors, inverse, neighbours


def reference_pool(
    vectors: npt.NDArray[np.float32],
    inverse: npt.NDArray[np.floating[Any]],
    items: npt.NDArray[np.int64],
    confidence: npt.NDArray[np.float64],
    *,
    neighbours: npt.NDArray[np.int32],
    width: int,
    base: npt.NDArray[np.int64],
    size: int,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """What the gateway did in numpy before the kernel: fold in, gather the distinct candidates
    without the visitor's items, score, stable sort of the scores over the ascending rows, cut."""
    vector = fold_in_low_rank(vectors, inverse, items.astype(np.intp), confidence)
    candidates = np.unique(np.concatenate([neighbours[items, :width].ravel(), base]).astype(np.int64))
    candidates = candidates[~np.isin(candidates, items)]
    scores = vectors[candidates] @ vector
    order = (-scores).argsort(kind="stable")[:size]
    return candidates[order], scores[order]


def test_fold_in_matches_the_numpy_definition() -> None:
    vectors, inverse, _ = catalog(1)
    rng = np.random.default_rng(2)
    params = ModelParams(alpha=5.0, half_life_events=2.0)
    for size in (1, 2, 3, 8, 20):
        history = rng.integers(0, ITEMS, size=size)
        weights = rng.choice([0.2, 1.0, 3.0, 8.0], size=size).astype(np.float32)
        distinct, confidence = profile_confidence(history.astype(np.intp), weights, params)
        expected = fold_in_low_rank(vectors, inverse, distinct, confidence.astype(np.float64))
        got = kernels.fold_in(vectors, inverse, distinct.astype(np.int64), confidence.astype(np.float64))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(6))
def test_live_pool_matches_the_numpy_pipeline(seed: int) -> None:
    vectors, inverse, neighbours = catalog(seed)
    rng = np.random.default_rng(100 + seed)
    marks = np.zeros(ITEMS, dtype=np.uint8)
    for size in (1, 2, 3, 7):
        items = np.unique(rng.integers(0, ITEMS, size=size)).astype(np.int64)
        confidence = rng.uniform(0.5, 9.0, size=len(items))
        base = np.unique(rng.integers(0, ITEMS, size=60)).astype(np.int64)
        width = int(rng.integers(1, NEIGHBOURS + 5))  # more than the table has: all of it
        for pool_size in (5, 40, 1000):
            rows, scores = kernels.live_pool(
                vectors,
                inverse,
                items,
                confidence,
                neighbour_rows=neighbours,
                neighbours=width,
                base=base,
                size=pool_size,
                marks=marks,
            )
            want_rows, want_scores = reference_pool(
                vectors,
                inverse,
                items,
                confidence,
                neighbours=neighbours,
                width=min(width, NEIGHBOURS),
                base=base,
                size=pool_size,
            )
            assert rows.dtype == np.int32 and scores.dtype == np.float32
            assert rows.tolist() == want_rows.tolist()
            np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
            assert not marks.any()  # the scratch is left as it was given


def test_live_pool_breaks_ties_by_row_and_keeps_signs() -> None:
    """Equal scores (items with identical or zero vectors) come in ascending row order, as the
    stable sort did; negative scores sort below zero, and -0.0 ties with 0.0."""
    vectors, inverse, neighbours = catalog(9)
    vectors[[50, 10, 30]] = vectors[7]  # three copies of one vector
    vectors[[60, 20, 40]] = 0.0  # scores of exactly 0 (and -0.0 from negation)
    items = np.array([7], dtype=np.int64)
    base = np.array([60, 50, 40, 30, 20, 10, 5, 3], dtype=np.int64)
    marks = np.zeros(ITEMS, dtype=np.uint8)
    confidence = np.array([2.0])
    rows, scores = kernels.live_pool(
        vectors, inverse, items, confidence, neighbour_rows=neighbours, neighbours=0, base=base, size=100, marks=marks
    )
    want_rows, want_scores = reference_pool(
        vectors, inverse, items, confidence, neighbours=neighbours, width=0, base=base, size=100
    )
    assert rows.tolist() == want_rows.tolist()
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    assert rows.tolist()[:3] == [10, 30, 50]  # the copies of the clicked item score highest
    zeros = [row for row, score in zip(rows.tolist(), scores.tolist(), strict=True) if score == 0.0]
    assert zeros == [20, 40, 60]
    assert (np.diff(scores) <= 0).all() and (scores < 0).any()


def test_live_pool_leaves_out_the_visitors_items_and_handles_no_candidates() -> None:
    vectors, inverse, neighbours = catalog(3)
    items = np.array([4, 9], dtype=np.int64)
    marks = np.zeros(ITEMS, dtype=np.uint8)
    confidence = np.array([1.0, 3.0])
    rows, scores = kernels.live_pool(
        vectors, inverse, items, confidence, neighbour_rows=neighbours, neighbours=0, base=items, size=10, marks=marks
    )
    assert len(rows) == 0 and len(scores) == 0
    everything = np.arange(ITEMS, dtype=np.int64)
    rows, _ = kernels.live_pool(
        vectors,
        inverse,
        items,
        confidence,
        neighbour_rows=neighbours,
        neighbours=NEIGHBOURS,
        base=everything,
        size=10**6,
        marks=marks,
    )
    assert sorted(rows.tolist()) == sorted(set(range(ITEMS)) - {4, 9})
    assert not marks.any()


def test_warm_up_says_how_far_it_got_while_it_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    enough = threading.Event()

    def say(line: str) -> None:
        said.append(line)
        if len(said) >= 3:
            enough.set()

    monkeypatch.setattr(kernels, "SLOW_WARM_UP_S", 0.01)
    monkeypatch.setattr(kernels, "PROGRESS_EVERY_S", 0.01)
    monkeypatch.setattr(kernels, "_warm_up", lambda *arrays: enough.wait(30))  # a compile that lasts
    kernels.warm_up(np.zeros((2, 2), dtype=np.float32), np.eye(2), None, say=say)
    assert enough.is_set()
    assert said[0] == kernels.COMPILING
    assert said[1].startswith("still compiling kernels: 0 so far, ")

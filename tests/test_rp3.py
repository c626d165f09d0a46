"""RP3beta: the random walk's weights against a dense reference, their pruning, and the size cap."""

from __future__ import annotations

import numpy as np
import pytest

from index_builder import rp3
from index_builder.dataset import Interactions


def random_interactions(n_users: int, n_items: int, seed: int) -> Interactions:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, n_users, 300).astype(np.int32)
    item = rng.integers(0, n_items, 300).astype(np.int32)
    weight = rng.uniform(1, 8, 300).astype(np.float32)  # weights and repeats do not count: the graph is binary
    return Interactions(user, item, weight, np.arange(300, dtype=np.int64), n_users, n_items)


def reference(data: Interactions, alpha: float, beta: float) -> np.ndarray:
    """The three-step walk item → user → item spelled out densely, as the paper defines it."""
    x = np.zeros((data.n_users, data.n_items))
    x[data.user, data.item] = 1.0
    p_ui = x / np.maximum(x.sum(axis=1, keepdims=True), 1)  # each user's items share 1
    p_iu = x.T / np.maximum(x.T.sum(axis=1, keepdims=True), 1)  # each item's users share 1
    w: np.ndarray = (p_iu**alpha) @ (p_ui**alpha)
    popularity = x.sum(axis=0)
    w *= np.where(popularity > 0, np.maximum(popularity, 1) ** -beta, 0.0)
    np.fill_diagonal(w, 0.0)
    return w


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.0), (0.5, 0.3), (0.8, 0.6)])
def test_weights_equal_the_dense_random_walk(alpha: float, beta: float) -> None:
    data = random_interactions(40, 30, seed=1)
    got = rp3.fit(data, alpha, beta, neighbours=30).toarray()
    np.testing.assert_allclose(got, reference(data, alpha, beta), rtol=1e-5, atol=1e-7)


def test_a_hand_checked_example() -> None:
    # User 0 met items 0 and 1, user 1 items 1 and 2. From item 0 the walk reaches user 0 (prob 1),
    # then item 1 (prob 1/2); from item 1 it reaches users 0 and 1 (1/2 each), then items 0 and 2
    # (1/2 each): W[1, 0] = W[1, 2] = 1/4. With β = 1 each is divided by its target's popularity 1.
    data = Interactions(
        np.array([0, 0, 1, 1], np.int32),
        np.array([0, 1, 1, 2], np.int32),
        np.ones(4, np.float32),
        np.arange(4, dtype=np.int64),
        2,
        3,
    )
    expected = [[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]]
    np.testing.assert_allclose(rp3.fit(data, 1.0, 1.0, neighbours=3).toarray(), expected)
    # W[0, 1] = 1/2 before the discount; item 1 has two users, so β = 1 halves it.
    np.testing.assert_allclose(rp3.fit(data, 1.0, 0.0, neighbours=3).toarray()[0, 1], 0.5)


def test_pruning_keeps_each_rows_largest_weights() -> None:
    data = random_interactions(40, 30, seed=2)
    full = reference(data, 0.7, 0.2)
    pruned = rp3.fit(data, 0.7, 0.2, neighbours=4).toarray()
    assert (np.count_nonzero(pruned, axis=1) <= 4).all()
    for row, kept in zip(full, pruned, strict=True):
        np.testing.assert_allclose(
            np.sort(kept[kept > 0])[::-1], np.sort(row)[::-1][: np.count_nonzero(kept)], rtol=1e-5
        )
        assert np.count_nonzero(kept) == min(4, np.count_nonzero(row))
        assert np.allclose(kept[kept > 0], row[kept > 0], rtol=1e-5)  # in their own columns


def test_small_blocks_give_the_same_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    data = random_interactions(40, 30, seed=3)
    whole = rp3.fit(data, 0.6, 0.4, neighbours=5).toarray()
    monkeypatch.setattr(rp3, "BLOCK_ENTRIES", 1)  # every item a block of its own
    np.testing.assert_array_equal(rp3.fit(data, 0.6, 0.4, neighbours=5).toarray(), whole)


def test_neighbours_are_capped_by_the_weights_budget() -> None:
    assert rp3.capped(500, 1_000) == 500
    assert rp3.capped(500, 100_000) == rp3.MAX_WEIGHTS // 100_000
    assert rp3.capped(500, 10**9) == 1

"""The shared recommender math: the gateway's fold-in must rank exactly like the builder's users."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.recommend import kernels
from index_builder.content import category_rows, content_vectors
from index_builder.dataset import Interactions
from index_builder.model import (
    ModelParams,
    fold_in,
    fold_in_low_rank,
    profile_confidence,
    recency_decay,
    recency_weights,
    recent_confidence,
    regularized_gram,
)
from index_builder.schema import Item
from index_builder.train import fit_item_vectors, popularity_scores, user_vectors


def clustered(n_users: int = 60, n_items: int = 40, seed: int = 3) -> Interactions:
    """Users each browse one of four item clusters, in time order."""
    rng = np.random.default_rng(seed)
    user, item, ts = [], [], []
    for u in range(n_users):
        cluster = u % 4
        picks = rng.choice(np.arange(cluster * 10, cluster * 10 + 10), size=6, replace=False)
        user += [u] * 6
        item += picks.tolist()
        ts += list(range(1000 * u, 1000 * u + 6))
    return Interactions(
        np.array(user, np.int32),
        np.array(item, np.int32),
        np.ones(len(user), np.float32),
        np.array(ts, np.int64),
        n_users,
        n_items,
    )


def test_recency_decay_halves_every_half_life() -> None:
    assert recency_decay(np.array([0, 3, 6]), 3.0).tolist() == [1.0, 0.5, 0.25]
    assert recency_decay(np.array([0, 50]), 0.0).tolist() == [1.0, 1.0]


def test_fold_in_matches_the_builders_user_vectors() -> None:
    data = clustered()
    params = ModelParams(factors=8, regularization=1.0, alpha=5.0, iterations=10, half_life_events=2.0)
    items = fit_item_vectors(data, params)
    stored = user_vectors(data, items, params)
    gram = regularized_gram(items, params.regularization)
    for u in (0, 1, 17):
        mask = data.user == u
        order = np.argsort(data.ts[mask], kind="stable")
        distinct, confidence = profile_confidence(
            data.item[mask][order].astype(np.intp), data.weight[mask][order], params
        )
        np.testing.assert_allclose(fold_in(items, gram, distinct, confidence), stored[u], rtol=1e-3, atol=1e-4)


def test_recent_interactions_weigh_more_in_the_profile() -> None:
    params = ModelParams(alpha=1.0, half_life_events=1.0)
    items, confidence = profile_confidence(np.array([5, 7, 9]), np.ones(3, np.float32), params)
    assert items.tolist() == [5, 7, 9]
    assert confidence.tolist() == [0.25, 0.5, 1.0]


def test_folded_user_prefers_the_cluster_they_browsed() -> None:
    data = clustered()
    params = ModelParams(factors=8, regularization=1.0, alpha=5.0, iterations=10)
    items = fit_item_vectors(data, params)
    gram = regularized_gram(items, params.regularization)
    distinct, confidence = profile_confidence(np.array([21, 22]), np.ones(2, np.float32), params)
    scores = items @ fold_in(items, gram, distinct, confidence)
    scores[[21, 22]] = -np.inf
    assert set(np.argsort(-scores)[:5].tolist()) <= set(range(20, 30))


def test_empty_history_folds_to_the_zero_vector() -> None:
    items = np.ones((3, 4), np.float32)
    vector = fold_in(items, regularized_gram(items, 1.0), np.array([], np.intp), np.array([], np.float32))
    assert vector.tolist() == [0.0] * 4


def test_cold_items_get_vectors_near_items_with_the_same_content() -> None:
    data = clustered()
    catalog = [Item(item_id=f"i{i}", categories=[f"c{i // 10}"]) for i in range(40)] + [
        Item(item_id="new", categories=["c2"])
    ]
    params = ModelParams(factors=8, regularization=1.0, iterations=10)
    warm_vectors = fit_item_vectors(data, params)
    vectors = np.vstack([warm_vectors, np.zeros((1, 8), np.float32)])
    warm = np.r_[np.ones(40, bool), False]
    mixed, _ = content_vectors([(i.categories, i.tags) for i in catalog], vectors, warm)
    np.testing.assert_array_equal(mixed[:40], warm_vectors)
    cosine = mixed[:40] @ mixed[40] / (np.linalg.norm(mixed[:40], axis=1) * np.linalg.norm(mixed[40]))
    assert int(np.argmax(cosine)) // 10 == 2


def test_category_rows_hold_each_category_and_its_parent_weighted_by_its_size() -> None:
    rows = category_rows([["a/x"], ["a/y"], ["b"], []]).toarray()
    assert rows.shape == (4, 4)  # c:a, c:a/x, c:a/y, c:b (the order of first appearance, sorted per item)
    np.testing.assert_allclose(rows[0], [2**-0.5, 2**-0.5, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(rows[1:].sum(axis=0), [1, 1, 1, 0])


def test_category_rows_pull_the_items_of_a_category_together() -> None:
    data = clustered()
    # Categories that cut across the clusters users browse (even and odd items): the rows pull
    # items of a category together, where interactions alone do not tell the two apart.
    categories = category_rows([[f"k{i % 2}"] for i in range(40)])

    def gap(weight: float) -> float:
        params = ModelParams(factors=8, regularization=1.0, iterations=10, content_weight=weight)
        vectors = fit_item_vectors(data, params, content=categories)
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        return float((unit[0::2] @ unit[0::2].T).mean() - (unit[0::2] @ unit[1::2].T).mean())

    assert abs(gap(0.0)) < 0.05
    assert gap(5.0) > 0.1
    with pytest.raises(ValueError, match="category rows"):
        fit_item_vectors(data, ModelParams(content_weight=5.0))


def test_popularity_decays_with_age() -> None:
    day = 86400
    data = Interactions(
        np.array([0, 1, 2], np.int32),
        np.array([0, 0, 1], np.int32),
        np.ones(3, np.float32),
        np.array([0, 0, 10 * day], np.int64),
        3,
        2,
    )
    assert popularity_scores(data, 0.0).tolist() == [2.0, 1.0]
    decayed = popularity_scores(data, 5.0)
    assert decayed[0] == np.float32(0.5) and decayed[1] == 1.0


def test_low_rank_fold_in_equals_the_full_solve() -> None:
    rng = np.random.default_rng(5)
    items = rng.normal(size=(500, 32)).astype(np.float32) * 0.3
    gram = regularized_gram(items, 10.0)
    inverse = np.linalg.inv(gram)
    params = ModelParams(alpha=5.0, half_life_events=2.0)
    for size in (1, 2, 3, 8, 20):
        history = rng.integers(0, 500, size=size)
        weights = rng.choice([0.2, 1.0, 3.0, 8.0], size=size).astype(np.float32)
        distinct, confidence = profile_confidence(history.astype(np.intp), weights, params)
        # c < 1, c = 1 and c > 1 all occur among these (old, light events decay below 1)
        expected = fold_in(items, gram, distinct, confidence)
        got = fold_in_low_rank(items, inverse, distinct, confidence.astype(np.float64))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    exactly_one = fold_in_low_rank(items, inverse, np.array([7], np.intp), np.array([1.0]))
    one = fold_in(items, gram, np.array([7], np.intp), np.ones(1, np.float32))
    np.testing.assert_allclose(exactly_one, one, rtol=1e-5)


def test_recent_confidence_equals_profile_confidence() -> None:
    rng = np.random.default_rng(6)
    for half_life in (0.0, 1.0, 2.0, 3.5):
        params = ModelParams(alpha=5.0, half_life_events=half_life)
        history = rng.integers(0, 6, size=12)  # repeats: confidence adds up per item
        weights = rng.choice([0.5, 1.0, 4.0], size=12)
        expected_items, expected = profile_confidence(history.astype(np.intp), weights.astype(np.float32), params)
        items, confidence = recent_confidence(history.tolist(), weights.tolist(), params)
        assert items == expected_items.tolist()
        np.testing.assert_allclose(confidence, expected, rtol=1e-6)
    assert recent_confidence([], [], ModelParams()) == ([], [])


def test_the_long_term_share_never_decays() -> None:
    params = ModelParams(alpha=1.0, half_life_events=1.0, long_term_share=0.5)
    items, confidence = profile_confidence(np.array([5, 7, 9]), np.ones(3, np.float32), params)
    assert items.tolist() == [5, 7, 9]
    assert confidence.tolist() == [0.625, 0.75, 1.0]  # 0.5 + 0.5 * (0.25, 0.5, 1)
    old = recency_weights(np.array([1000]), params)
    assert old.tolist() == [0.5]  # taste stays however long ago it was shown
    plain = recency_weights(np.array([0, 7]), ModelParams(half_life_events=0.0, long_term_share=0.3))
    assert plain.tolist() == [1.0, 1.0]


def test_recent_confidence_equals_profile_confidence_for_every_blend() -> None:
    rng = np.random.default_rng(7)
    for half_life, share in ((2.0, 0.2), (5.0, 0.5), (15.0, 1.0), (0.0, 0.5)):
        params = ModelParams(alpha=3.0, half_life_events=half_life, long_term_share=share)
        history = rng.integers(0, 6, size=15)
        weights = rng.choice([0.5, 1.0, 4.0], size=15)
        expected_items, expected = profile_confidence(history.astype(np.intp), weights.astype(np.float32), params)
        items, confidence = recent_confidence(history.tolist(), weights.tolist(), params)
        assert items == expected_items.tolist()
        np.testing.assert_allclose(confidence, expected, rtol=1e-6)


def test_gateway_live_fold_in_gives_the_builders_user_vector_and_list() -> None:
    """A visitor with the same history gets the same vector, hence the same list, whether the
    builder stored it or the gateway folds it in live (its recent_confidence and compiled kernel)."""
    data = clustered()
    params = ModelParams(
        factors=8, regularization=1.0, alpha=5.0, iterations=10, half_life_events=2.0, long_term_share=0.3
    )
    items = fit_item_vectors(data, params)
    stored = user_vectors(data, items, params)
    inverse = np.linalg.inv(regularized_gram(items, params.regularization))
    for u in (0, 5, 42):
        mask = data.user == u
        order = np.argsort(data.ts[mask], kind="stable")
        history = data.item[mask][order].tolist()
        distinct, confidence = recent_confidence(history, data.weight[mask][order].tolist(), params)
        live = kernels.fold_in(items, inverse, np.array(distinct, np.int64), np.array(confidence, np.float64))
        np.testing.assert_allclose(live, stored[u], rtol=1e-3, atol=1e-4)
        seen = set(history)
        ranked = [int(i) for i in np.argsort(-(items @ live), kind="stable") if int(i) not in seen][:10]
        builder = [int(i) for i in np.argsort(-(items @ stored[u]), kind="stable") if int(i) not in seen][:10]
        assert ranked == builder

"""Temporal split and ranking metrics, checked against hand-computed values."""

from __future__ import annotations

import msgspec
import numpy as np
import numpy.typing as npt
import pytest

from index_builder.dataset import Interactions, random_split, sampled_items, temporal_split, user_sample
from index_builder.evaluate import evaluate, top_k_unseen


def interactions(user: list[int], item: list[int], ts: list[int], n_items: int) -> Interactions:
    return Interactions(
        np.array(user, np.int32),
        np.array(item, np.int32),
        np.ones(len(user), np.float32),
        np.array(ts, np.int64),
        n_users=max(user) + 1,
        n_items=n_items,
    )


def test_temporal_split_holds_out_each_users_latest_fifth() -> None:
    data = interactions([0] * 10 + [1] * 3, [*range(10), 0, 1, 2], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 5, 6, 7], 10)
    train, test = temporal_split(data)
    assert sorted(test.item[test.user == 0].tolist()) == [0, 1]  # the two newest of ten
    assert test.item[test.user == 1].tolist() == [2]  # 20% of 3 rounds down, but at least one
    assert len(train) == 10


def test_temporal_split_uses_time_not_file_order() -> None:
    data = interactions([0] * 5, [0, 1, 2, 3, 4], [50, 40, 30, 20, 10], 5)
    train, test = temporal_split(data)
    assert test.item.tolist() == [0]
    assert sorted(train.item.tolist()) == [1, 2, 3, 4]


def test_single_interaction_users_stay_in_training() -> None:
    data = interactions([0, 1, 1], [0, 1, 2], [1, 1, 2], 3)
    train, test = temporal_split(data)
    assert train.user.tolist().count(0) == 1
    assert test.user.tolist() == [1]


def test_top_k_never_returns_seen_items() -> None:
    data = interactions([0, 0], [0, 1], [1, 2], 4)
    scores = np.array([[9.0, 8.0, 1.0, 2.0]], np.float32)
    top = top_k_unseen(scores, data.seen_matrix(), k=2)
    assert top.tolist() == [[3, 2]]


def constant(scores: list[float]) -> object:
    row = np.array(scores, np.float32)

    def score(batch: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
        return np.tile(row, (len(batch), 1))

    return score


def test_metrics_match_hand_computation() -> None:
    # User 0 saw item 0; held out: items 2 and 5. Ranking (unseen) puts 2 first, 5 at rank 3.
    train = interactions([0], [0], [1], 12)
    test = interactions([0, 0], [2, 5], [2, 3], 12)
    scores = [100.0, 0, 50, 40, 30, 20] + [-float(i) for i in range(1, 7)]
    m = evaluate(constant(scores), train, test)  # type: ignore[arg-type]
    dcg = 1 / np.log2(2) + 1 / np.log2(5)
    idcg = 1 / np.log2(2) + 1 / np.log2(3)
    assert m.ndcg_at_10 == pytest.approx(dcg / idcg)
    assert m.recall_at_10 == pytest.approx(1.0)
    assert m.precision_at_10 == pytest.approx(0.2)
    assert m.map_at_10 == pytest.approx((1 / 1 + 2 / 4) / 2)
    assert m.coverage == pytest.approx(10 / 12)
    assert m.users == 1


def test_items_already_seen_in_training_are_not_relevant() -> None:
    train = interactions([0, 1], [0, 3], [1, 1], 4)
    test = interactions([0, 1], [0, 2], [2, 2], 4)
    m = evaluate(constant([0, 0, 1, 0]), train, test)  # type: ignore[arg-type]
    assert m.users == 1  # user 0's only held-out item was seen in training
    assert m.ndcg_at_10 == pytest.approx(1.0)


def test_random_split_holds_out_a_seeded_share_of_each_user_whenever_it_happened() -> None:
    data = interactions([0] * 20 + [1] * 3 + [2], [*range(20), 0, 1, 2, 5], list(range(24)), 20)
    train, test = random_split(data, 0.25, seed=4)
    assert np.bincount(test.user, minlength=3).tolist() == [5, 1, 0]  # 25% of 20; at least one of 3; one stays
    assert len(train) + len(test) == len(data)
    again, _ = random_split(data, 0.25, seed=4)
    assert again.item.tolist() == train.item.tolist()
    held = {tuple(sorted(random_split(data, 0.25, seed=s)[1].item[:5].tolist())) for s in range(8)}
    assert len(held) > 1  # the seed chooses which ones
    newest = set(range(15, 20))
    assert any(set(random_split(data, 0.25, seed=s)[1].item[:5].tolist()) != newest for s in range(8))


def test_the_confidence_interval_is_students_t_over_per_user_ndcg() -> None:
    # Users 0 and 1 each hold out one item: ranked first (nDCG 1) and past the top 10 (nDCG 0).
    train = interactions([0, 1], [0, 0], [1, 1], 12)
    test = interactions([0, 1], [1, 11], [2, 2], 12)
    scores = [0.0] + [float(12 - i) for i in range(1, 12)]
    m = evaluate(constant(scores), train, test)  # type: ignore[arg-type]
    assert m.ndcg_at_10 == pytest.approx(0.5)
    # t(0.975, 1 degree of freedom) x standard error of [1, 0] (std 0.7071 / sqrt 2 = 0.5)
    assert m.ndcg_ci95 == pytest.approx(12.7062 * 0.5, rel=1e-4)


def test_large_catalogs_are_scored_in_batches_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    train = interactions(list(range(40)), rng.integers(0, 30, 40).tolist(), [1] * 40, 30)
    test = interactions(list(range(40)), rng.integers(0, 30, 40).tolist(), [2] * 40, 30)
    table = rng.normal(size=(40, 30)).astype(np.float32)
    whole = evaluate(lambda batch: table[batch], train, test)
    monkeypatch.setattr("index_builder.evaluate.SCORES_PER_BATCH", 30 * 7)  # batches of 7 users
    batched = evaluate(lambda batch: table[batch], train, test)
    assert msgspec.structs.asdict(batched) == pytest.approx(msgspec.structs.asdict(whole))


def test_a_tuning_sample_keeps_whole_histories_of_some_users() -> None:
    rng = np.random.default_rng(5)
    user = np.repeat(np.arange(100), 10)
    data = Interactions(
        user.astype(np.int32),
        rng.integers(0, 500, len(user)).astype(np.int32),
        np.ones(len(user), np.float32),
        np.arange(len(user), dtype=np.int64),
        n_users=100,
        n_items=500,
    )
    sample = user_sample(data, 300, seed=1)
    assert 300 <= len(sample) < 320  # whole histories of 10: the first users past the budget
    assert sample.n_users == len(np.unique(sample.user)) == len(sample) // 10
    assert sample.n_items == len(np.unique(sample.item)) == sample.item.max() + 1
    assert np.bincount(sample.user).tolist() == [10] * sample.n_users
    assert user_sample(data, 5000) is data
    rows = sampled_items(data, 300, seed=1)  # the sample's items' rows in the full data, in its order
    assert len(rows) == sample.n_items
    np.testing.assert_array_equal(rows[sample.item], data.item[sample.ts])  # ts here is the row in `data`
    assert sampled_items(data, 5000).tolist() == list(range(500))

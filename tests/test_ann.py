"""The nearest-neighbour index: the tuner reaches its recall target against exact inner-product
search, the serving index answers by true inner product, excludes what it is told to, and takes
items added after the build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from annoy import AnnoyIndex

from index_builder.ann import (
    ITEMS_NAME,
    SIMILAR_NAME,
    Graph,
    ItemIndex,
    _recall,
    distinct_rows,
    exact_top_k,
    graph_files,
    precompute_pools,
    tune_index,
)

HNSW_FILE, NODES_FILE = graph_files(ITEMS_NAME)  # the item index's files


def clustered_vectors(n: int, dim: int, seed: int, spread: float = 0.0) -> npt.NDArray[np.float32]:
    """Clustered vectors; with `spread`, lengths vary as popularity makes ALS vectors' lengths vary."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    vectors = centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))
    return (vectors * rng.lognormal(0.0, spread, size=(n, 1))).astype(np.float32)


def recall(found: npt.ArrayLike, truth: npt.NDArray[np.intp]) -> float:
    return len(set(np.asarray(found).tolist()) & set(truth.tolist())) / len(truth)


def test_exact_top_k_is_sorted_by_dot_product() -> None:
    items = np.array([[1, 0], [0, 1], [2, 0], [1, 1]], np.float32)
    assert exact_top_k(items, np.array([1, 0.1], np.float32), k=3).tolist() == [2, 3, 0]


def test_the_tuned_graph_reaches_the_target_recall_on_fresh_queries() -> None:
    items = clustered_vectors(5000, 16, seed=1, spread=0.5)
    choice, graph = tune_index(items, clustered_vectors(100, 16, seed=2), target_recall=0.95)
    assert any(t.recall_at_10 >= 0.95 for t in choice.trials)
    graph = Graph.build(items) if graph is None else graph
    index = ItemIndex(items, method="hnsw", graph=graph, ef_search=choice.ef_search)
    fresh = clustered_vectors(100, 16, seed=3)
    achieved = np.mean([recall(index.search(q, 10)[0], exact_top_k(items, q)) for q in fresh])
    assert achieved >= 0.9  # a new sample of queries lands near the tuned recall


def test_the_choice_is_consistent_with_its_measurements() -> None:
    items = clustered_vectors(300, 8, seed=4)
    choice, graph = tune_index(items, clustered_vectors(50, 8, seed=5))
    if choice.method == "exact":
        assert graph is None
        assert choice.recall_at_10 == 1.0
        assert choice.median_query_us == choice.exact_median_query_us
    else:
        assert graph is not None
        assert choice.recall_at_10 >= choice.target_recall
        assert any(t.recall_low >= choice.target_recall and t.ef_search == choice.ef_search for t in choice.trials)
        assert choice.median_query_us < 0.5 * choice.exact_median_query_us


def test_the_graph_ranks_by_inner_product_not_by_angle() -> None:
    # The longest vector wins an inner product though another points closer to the query.
    items = np.array([[1.0, 0.0], [3.0, 3.0], [0.0, 1.0]], np.float32)
    index = ItemIndex(items, method="hnsw", graph=Graph.build(items), ef_search=16)
    rows, scores = index.search(np.array([1.0, 0.1], np.float32), 2)
    assert rows.tolist() == [1, 0]
    np.testing.assert_allclose(scores, [3.3, 1.0], rtol=1e-6)


def test_every_method_leaves_out_excluded_rows_and_agrees_with_exact_search(tmp_path: Path) -> None:
    items = clustered_vectors(400, 8, seed=7, spread=0.5)
    annoy = AnnoyIndex(8, "dot")
    for row, vector in enumerate(items):
        annoy.add_item(row, vector.tolist())
    annoy.build(20)
    query = clustered_vectors(1, 8, seed=8)[0]
    truth = exact_top_k(items, query, 15)
    exclude = truth[:5]
    for index in (
        ItemIndex(items),
        ItemIndex(items, method="hnsw", graph=Graph.build(items), ef_search=400),
        ItemIndex(items, method="annoy", annoy=annoy, search_k=40_000),
    ):
        rows, scores = index.search(query, 10, exclude)
        assert rows.tolist() == truth[5:].tolist(), index.method
        np.testing.assert_allclose(scores, items[truth[5:]] @ query, rtol=1e-5)


def test_the_loaded_graph_is_memory_mapped_not_copied(tmp_path: Path) -> None:
    items = clustered_vectors(3000, 16, seed=11)
    Graph.build(items).save(tmp_path)
    index = ItemIndex.load(tmp_path, {"method": "hnsw", "ef_search": 64}, items)
    maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path / HNSW_FILE) in maps
    assert index.search(items[0], 1)[0].tolist() == exact_top_k(items, items[0], 1).tolist()


def test_precomputed_pools_are_each_users_best_unseen_items() -> None:
    rng = np.random.default_rng(4)
    items = rng.normal(size=(300, 8)).astype(np.float32)
    users = rng.normal(size=(40, 8)).astype(np.float32)
    seen = [np.sort(rng.choice(300, size=rng.integers(0, 30), replace=False)).astype(np.int32) for _ in range(60)]
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in seen])]).astype(np.int64)
    indices = np.concatenate(seen).astype(np.int32)
    user_rows = np.arange(10, 50, dtype=np.int32)  # pools for seen-matrix rows 10..49 only
    graph = ItemIndex(items, method="hnsw", graph=Graph.build(items), ef_search=300)
    for index in (ItemIndex(items), graph):
        rows, scores = precompute_pools(index, users, indptr, indices, size=25, batch=7, user_rows=user_rows)
        for i, user in enumerate(user_rows):
            all_scores = items @ users[i]
            all_scores[seen[user]] = -np.inf
            expected = np.argsort(-all_scores, kind="stable")[:25]
            assert rows[i].tolist() == expected.tolist(), index.method
            np.testing.assert_allclose(scores[i], all_scores[expected], rtol=1e-5)
            assert not set(rows[i].tolist()) & set(seen[user].tolist())


def test_a_pool_longer_than_the_unseen_catalog_is_padded_with_minus_infinity() -> None:
    items = np.eye(4, dtype=np.float32)
    rows, scores = precompute_pools(
        ItemIndex(items), np.ones((1, 4), np.float32), np.array([0, 3]), np.array([0, 1, 2], np.int32), size=3
    )
    assert rows[0, 0] == 3
    assert np.isneginf(scores[0, 1:]).all()


def test_items_tied_with_the_tenth_best_count_as_found() -> None:
    # Twenty copies of one vector tie for the best score: any ten of them are a right answer.
    rng = np.random.default_rng(12)
    items = np.vstack([np.tile([[10.0, 0.0]], (20, 1)), rng.normal(size=(500, 2))]).astype(np.float32)
    choice, _ = tune_index(items, np.tile([[1.0, 0.0]], (20, 1)).astype(np.float32))
    assert choice.trials[0].recall_at_10 == 1.0


def test_the_target_must_hold_in_every_group_of_queries() -> None:
    per_query = np.array([1.0, 1.0, 1.0, 1.0, 0.9, 0.8, 1.0, 0.9])
    recall, low = _recall(per_query, np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    assert recall == pytest.approx(0.9)  # the new visitors' mean, not the 0.95 of all eight
    assert low == pytest.approx(0.9 - 3.1824 * np.std([0.9, 0.8, 1.0, 0.9], ddof=1) / 2, rel=1e-4)


def shared_vectors(seed: int) -> npt.NDArray[np.float32]:
    """600 items of which 400 share 8 vectors in groups of 1-120 (as cold items with the same
    categories share a content vector), mixed in among 200 distinct ones."""
    rng = np.random.default_rng(seed)
    distinct = clustered_vectors(200, 8, seed=seed, spread=0.5)
    shared = clustered_vectors(8, 8, seed=seed + 1, spread=0.5)
    sizes = np.array([120, 100, 80, 50, 30, 15, 4, 1])
    items = np.vstack([distinct, np.repeat(shared, sizes, axis=0)])
    return items[rng.permutation(len(items))]


def test_items_sharing_a_vector_share_one_node_of_the_graph() -> None:
    items = shared_vectors(21)
    distinct, node_of = distinct_rows(items)
    assert node_of is not None and len(distinct) == 208
    np.testing.assert_array_equal(distinct[node_of], items)
    assert node_of[0] == 0 and np.all(np.diff(np.unique(node_of, return_index=True)[1]) > 0)  # first-seen order
    assert distinct_rows(distinct)[1] is None
    assert Graph.build(items).index.ntotal == 208


def test_a_graph_saved_under_another_name_loads_by_that_name(tmp_path: Path) -> None:
    items = shared_vectors(22)
    Graph.build(items).save(tmp_path, SIMILAR_NAME)
    assert {path.name for path in tmp_path.iterdir()} == set(graph_files(SIMILAR_NAME))
    index = ItemIndex.load(tmp_path, {"method": "hnsw", "ef_search": 400}, items, SIMILAR_NAME)
    rows, _ = index.search(items[3], 10)
    assert float(items[rows[-1]] @ items[3]) >= float(items[exact_top_k(items, items[3], 10)[-1]] @ items[3]) - 1e-5
    with pytest.raises(RuntimeError):
        Graph.load(tmp_path)  # no graph saved as "items"


def test_a_graph_of_shared_vectors_answers_like_exact_search(tmp_path: Path) -> None:
    items = shared_vectors(22)
    Graph.build(items).save(tmp_path)
    assert (tmp_path / NODES_FILE).exists()
    index = ItemIndex.load(tmp_path, {"method": "hnsw", "ef_search": 400}, items)
    for query in (items[0], items[np.argmax(np.linalg.norm(items, axis=1))], -items[5]):
        truth = exact_top_k(items, query, 40)
        kth = float(items[truth[-1]] @ query)
        exclude = truth[:7]
        rows, scores = index.search(query, 33, exclude)
        assert len(rows) == len(set(rows.tolist())) == 33  # distinct items, as many as asked for
        assert not set(rows.tolist()) & set(exclude.tolist())
        np.testing.assert_allclose(scores, items[rows] @ query, rtol=1e-5)
        assert np.all(scores >= kth - 1e-5)  # ties in any order: only the scores are the answer's
        assert np.all(np.diff(scores) <= 1e-6)
    batch_rows, batch_scores = index.search_many(items[:5], 12)
    for at in range(5):
        np.testing.assert_allclose(batch_scores[at], items[batch_rows[at]] @ items[at], rtol=1e-5)
        assert len(set(batch_rows[at].tolist())) == 12


def test_a_node_map_naming_nodes_the_graph_lacks_is_refused(tmp_path: Path) -> None:
    items = shared_vectors(23)
    Graph.build(items).save(tmp_path)
    np.save(tmp_path / NODES_FILE, np.full(len(items), 10_000, dtype=np.int32))
    with pytest.raises(ValueError, match="nodes"):
        ItemIndex.load(tmp_path, {"method": "hnsw", "ef_search": 64}, items)


def test_the_tuner_counts_recall_over_items_not_nodes() -> None:
    items = shared_vectors(24)
    choice, _ = tune_index(items, clustered_vectors(60, 8, seed=25), target_recall=0.95)
    assert choice.nodes == 208
    assert all(0.0 <= t.recall_at_10 <= 1.0 for t in choice.trials)
    assert any(t.recall_at_10 >= 0.95 for t in choice.trials)


def test_a_search_for_more_items_than_distinct_vectors_expands_the_groups() -> None:
    items = np.repeat(np.diag([3.0, 2.0, 1.0]).astype(np.float32), [5, 5, 5], axis=0)
    index = ItemIndex(items, method="hnsw", graph=Graph.build(items), ef_search=16)
    rows, scores = index.search(np.ones(3, np.float32), 12, np.array([0, 1]))
    assert sorted(rows.tolist()) == list(range(2, 14))
    np.testing.assert_allclose(scores, [3.0] * 3 + [2.0] * 5 + [1.0] * 4)

"""Nearest-neighbour index over item vectors: Annoy tuned to a recall target, or exact search
when measurement says exact is at least as fast for this catalog.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt
from annoy import AnnoyIndex

Vectors = npt.NDArray[np.float32]
METRIC: Literal["dot"] = "dot"  # scores are dot products (ALS), so the index ranks by the same number
K = 10
N_TREES = (10, 25, 50, 100)
SEARCH_K_PER_TREE = (10, 20, 40, 80, 160, 320, 640)  # × K × n_trees; Annoy's default is n_trees × K


class AnnTrial(msgspec.Struct, frozen=True):
    n_trees: int
    search_k: int
    recall_at_10: float
    median_query_us: float


class AnnChoice(msgspec.Struct, frozen=True):
    method: Literal["annoy", "exact"]
    n_trees: int
    search_k: int
    recall_at_10: float
    median_query_us: float
    exact_median_query_us: float
    target_recall: float
    queries: int
    trials: list[AnnTrial]


def exact_top_k(items: Vectors, query: Vectors, k: int = K) -> npt.NDArray[np.intp]:
    scores = items @ query
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


def build_annoy(items: Vectors, n_trees: int, seed: int = 0) -> AnnoyIndex:
    index = AnnoyIndex(items.shape[1], METRIC)
    index.set_seed(seed)
    for row, vector in enumerate(items):
        index.add_item(row, vector.tolist())
    index.build(n_trees, n_jobs=1)
    return index


def _median_us(run: Callable[[Vectors], object], queries: Vectors) -> float:
    times = []
    for query in queries:
        started = time.perf_counter_ns()
        run(query)
        times.append(time.perf_counter_ns() - started)
    return float(np.median(times)) / 1000.0


def _annoy_query(index: AnnoyIndex, k: int, search_k: int, query: Vectors) -> list[int]:
    return index.get_nns_by_vector(query.tolist(), k, search_k=search_k)


def tune_index(
    items: Vectors,
    queries: Vectors,
    target_recall: float = 0.95,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[AnnChoice, AnnoyIndex]:
    """The fewest trees and smallest search_k reaching `target_recall`@10 on real user queries.

    Returns the choice and the Annoy index it was measured on (built even when exact search
    wins, so a gateway can still be switched to it). Recall is against exact dot-product search.
    """
    k = min(K, len(items))
    truth = [set(exact_top_k(items, q, k).tolist()) for q in queries]
    exact_us = _median_us(lambda q: exact_top_k(items, q, k), queries)
    trials: list[AnnTrial] = []
    chosen: tuple[AnnTrial, AnnoyIndex] | None = None
    last: tuple[AnnTrial, AnnoyIndex] | None = None
    for n_trees in N_TREES:
        index = build_annoy(items, n_trees, seed)
        for per_tree in SEARCH_K_PER_TREE:
            search_k = per_tree * k * n_trees
            found = [set(index.get_nns_by_vector(q.tolist(), k, search_k=search_k)) for q in queries]
            recall = float(np.mean([len(f & t) / len(t) for f, t in zip(found, truth, strict=True)]))
            latency = _median_us(partial(_annoy_query, index, k, search_k), queries)
            trial = AnnTrial(n_trees, search_k, recall, latency)
            trials.append(trial)
            last = (trial, index)
            if progress is not None:
                progress(
                    f"annoy: n_trees={n_trees} search_k={search_k} recall@10={recall:.3f} "
                    f"median {latency:.0f}µs (exact {exact_us:.0f}µs)"
                )
            if recall >= target_recall:
                if chosen is None or latency < chosen[0].median_query_us:
                    chosen = (trial, index)
                break
        if chosen is not None and chosen[0].n_trees < n_trees:
            break  # more trees only cost memory once a smaller forest reached the target
    assert last is not None
    trial, index = chosen if chosen is not None else last
    # Exact search wins when Annoy cannot reach the target or is not faster on this catalog.
    use_annoy = chosen is not None and trial.median_query_us < exact_us
    return (
        AnnChoice(
            method="annoy" if use_annoy else "exact",
            n_trees=trial.n_trees,
            search_k=trial.search_k,
            recall_at_10=trial.recall_at_10 if use_annoy else 1.0,
            median_query_us=trial.median_query_us if use_annoy else exact_us,
            exact_median_query_us=exact_us,
            target_recall=target_recall,
            queries=len(queries),
            trials=trials,
        ),
        index,
    )


def save_annoy(index: AnnoyIndex, path: Path) -> None:
    index.save(str(path))


def precompute_pools(
    items: Vectors,
    users: Vectors,
    seen_indptr: npt.NDArray[np.int64],
    seen_indices: npt.NDArray[np.int32],
    *,
    size: int,
    user_rows: npt.NDArray[np.int32] | None = None,
    batch: int = 256,
    progress: Callable[[str], None] | None = None,
    label: str = "candidate pools",
    unit: str = "users",
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Each user's `size` best unseen items by exact dot product, best first.

    One matrix product per batch of users reads the item matrix once for the whole batch, where
    answering users one at a time online reads it once per user; the gateway then serves known
    users from these rows and spends its own CPU only on visitors the build did not know.
    """
    size = min(size, items.shape[0])
    rows = np.empty((len(users), size), dtype=np.int32)
    scores = np.empty((len(users), size), dtype=np.float32)
    started = time.perf_counter()
    for start in range(0, len(users), batch):
        stop = min(start + batch, len(users))
        block = users[start:stop] @ items.T
        for offset, position in enumerate(range(start, stop)):
            user = position if user_rows is None else int(user_rows[position])
            block[offset, seen_indices[seen_indptr[user] : seen_indptr[user + 1]]] = -np.inf
        top = np.argpartition(-block, size - 1, axis=1)[:, :size] if size < block.shape[1] else None
        if top is None:
            top = np.broadcast_to(np.arange(block.shape[1]), block.shape).copy()
        picked = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-picked, axis=1, kind="stable")
        rows[start:stop] = np.take_along_axis(top, order, axis=1)
        scores[start:stop] = np.take_along_axis(picked, order, axis=1)
        if progress is not None and (stop == len(users) or (start // batch) % 20 == 19):
            progress(f"{label}: {stop:,}/{len(users):,} {unit} ({time.perf_counter() - started:.0f}s)")
    return rows, scores

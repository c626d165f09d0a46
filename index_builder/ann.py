"""Nearest items by inner product, shared by the builder and the gateway: the snapshot's index (an
HNSW graph over the distinct item vectors, or exact search where measurement says exact is as fast), its
tuning to a recall target, and items added after the build.

The graph is faiss's `IndexHNSWFlat` with the inner-product metric: it ranks by the very dot product
the model scores with (no angular stand-in) and returns exact scores, since it keeps the vectors
uncompressed. Chosen on `loadtests/bench_index.py`'s measurements (docs/performance.md): at 1M
64-d items it reaches recall@10 0.95+ in about a tenth of a millisecond, where Annoy needed 56 ms for
0.94; faiss memory-maps the saved graph (`IO_FLAG_MMAP_IFC`), so gateway workers share one copy in
the page cache, which hnswlib's loader (a private copy per process) cannot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import faiss
import msgspec
import numpy as np
import numpy.typing as npt
from annoy import AnnoyIndex
from scipy import stats

Vectors = npt.NDArray[np.float32]
Rows = npt.NDArray[np.int64]
Method = Literal["hnsw", "exact"]
K = 10
# Above `neighbours_max_items` (index_builder.build), where no similar-item lists are made: a graph
# over the unit vectors, so that an item's similar items (cosine) are a search, not a scan.
SIMILAR_NAME = "similar"
ITEMS_NAME = "items"  # the item index: inner product with users' and visitors' vectors
ANNOY_FILE = "items.ann"  # snapshots of builds before the HNSW index
# Graph degree and construction breadth, measured on the 1M-item shop's 401,081 distinct vectors
# with the tuner's queries (docs/performance.md): new visitors' recall@10 at efSearch 128 / 192 was
# 0.917 / 0.946 with M 16 and efConstruction 40 (8 s to build), 0.964 / 0.975 with efConstruction
# 100 (19 s), 0.955 / 0.971 with M 32 and efConstruction 64 (18 s, more memory, slower searches).
HNSW_M = 16
EF_CONSTRUCTION = 100
EF_SEARCH = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
GRAPH_SPEED_UP = 0.5
EXACT_TIMING_QUERIES = 50  # exact search costs ~10 ms a query at 1M items; its median settles early


class IndexTrial(msgspec.Struct, frozen=True):
    ef_search: int
    recall_at_10: float
    median_query_us: float
    # The lower end of recall@10's 95% confidence interval over the queries (Student's t): the
    # target must hold there, so that queries the tuner never saw reach it too. Both figures are
    # the worst group's (known users, new visitors).
    recall_low: float = 0.0


class IndexChoice(msgspec.Struct, frozen=True):
    """What the tuner measured and chose; recorded as the manifest's `index`."""

    method: Method
    ef_search: int
    m: int
    ef_construction: int
    recall_at_10: float
    median_query_us: float
    exact_median_query_us: float
    target_recall: float
    queries: int
    build_seconds: float
    trials: list[IndexTrial]
    nodes: int = 0  # the graph's distinct vectors (items sharing a vector share a node)


def exact_top_k(items: Vectors, query: Vectors, k: int = K) -> npt.NDArray[np.intp]:
    scores = items @ query
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


def build_hnsw(items: Vectors, *, m: int = HNSW_M, ef_construction: int = EF_CONSTRUCTION) -> Any:
    """An inner-product HNSW graph over `items` (row i has id i). faiss inserts in parallel over all
    cores, so two builds may link a few nodes differently; tuning measures the graph it ships."""
    graph = faiss.IndexHNSWFlat(items.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = ef_construction
    for start in range(0, len(items), 100_000):  # faiss copies what it is given: bound the copy
        graph.add(np.ascontiguousarray(items[start : start + 100_000], dtype=np.float32))
    return graph


def unit_rows(vectors: npt.NDArray[np.floating[Any]]) -> Vectors:
    """Each row scaled to length 1 (a zero row stays zero), in float32: dot products of these are
    the cosine similarities of similar items."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: Vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return unit


def distinct_rows(items: Vectors) -> tuple[Vectors, npt.NDArray[np.int32] | None]:
    """The distinct rows of `items`, in the order each first occurs, and each item's row among
    them (None when every row differs)."""
    items = np.ascontiguousarray(items, dtype=np.float32)
    keys = items.view(np.dtype((np.void, items.dtype.itemsize * items.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    if len(first) == len(items):
        return items, None
    by_first = np.argsort(first)
    rank = np.empty(len(first), dtype=np.int32)
    rank[by_first] = np.arange(len(first), dtype=np.int32)
    return items[first[by_first]], rank[inverse.ravel()]


def graph_files(name: str) -> tuple[str, str]:
    """The files of the graph saved as `name`: the graph, and each item's node in it (when items
    share vectors)."""
    return f"{name}.hnsw", f"{name}.hnsw-nodes.npy"


class Graph:
    """An HNSW graph over the distinct item vectors and, when some items share a vector, which
    items each node stands for.

    Items that share a vector (cold items with the same categories and tags get the same content
    vector) would be groups of identical points in the graph, which HNSW links poorly: on the
    1M-item shop 679k cold items made about 80k distinct vectors, and new visitors' recall at a given
    efSearch fell well below that of a graph over the distinct vectors (docs/performance.md). So
    the graph holds each vector once and a search expands a node into its items, tied in score.
    """

    def __init__(self, index: Any, node_of: npt.NDArray[np.int32] | None = None) -> None:
        self.index = index
        self.node_of = node_of
        if node_of is None:
            self.members: npt.NDArray[np.int32] | None = None
            self.starts = np.empty(0, dtype=np.int64)
        else:
            self.members = np.argsort(node_of, kind="stable").astype(np.int32)  # items, node by node
            self.starts = np.concatenate([[0], np.cumsum(np.bincount(node_of, minlength=index.ntotal))])

    @classmethod
    def build(cls, items: Vectors) -> Graph:
        distinct, node_of = distinct_rows(items)
        return cls(build_hnsw(distinct), node_of)

    @property
    def items(self) -> int:
        return self.index.ntotal if self.node_of is None else len(self.node_of)

    def save(self, directory: Path, name: str = ITEMS_NAME) -> None:
        """As `name`.hnsw (and `name`.hnsw-nodes.npy) in `directory`."""
        graph_file, nodes_file = graph_files(name)
        faiss.write_index(self.index, str(directory / graph_file))
        if self.node_of is not None:
            np.save(directory / nodes_file, self.node_of)

    @classmethod
    def load(cls, directory: Path, name: str = ITEMS_NAME) -> Graph:
        """The saved graph, memory-mapped (shared by every process that loads it)."""
        graph_file, nodes_file = graph_files(name)
        index = faiss.read_index(str(directory / graph_file), faiss.IO_FLAG_MMAP_IFC)
        nodes = directory / nodes_file
        node_of = np.load(nodes) if nodes.exists() else None
        if node_of is not None and (len(node_of) == 0 or int(node_of.max()) >= index.ntotal or node_of.min() < 0):
            raise ValueError(f"{nodes_file} names nodes {graph_file} does not hold")
        return cls(index, node_of)

    def search(self, queries: Vectors, k: int, ef: int) -> tuple[npt.NDArray[np.float32], Rows]:
        """The `k` best items of each query and their scores, best first; -1 pads a row with fewer.
        At most `k` nodes are searched for: each stands for at least one item."""
        scores, nodes = _graph_search(self.index, queries, min(k, self.index.ntotal), ef)
        if self.members is None:
            return scores, nodes
        k = min(k, self.items)
        rows = np.full((len(nodes), k), -1, dtype=np.int64)
        found = np.full((len(nodes), k), -np.inf, dtype=np.float32)
        for at in range(len(nodes)):
            items, item_scores = self._expand(nodes[at], scores[at], k)
            rows[at, : len(items)], found[at, : len(items)] = items, item_scores
        return found, rows

    def _expand(self, nodes: Rows, scores: npt.NDArray[np.float32], limit: int) -> tuple[Rows, npt.NDArray[np.float32]]:
        """The first `limit` items of `nodes`, each node's items in row order, with its score."""
        assert self.members is not None
        keep = nodes >= 0
        nodes, scores = nodes[keep], scores[keep]
        begins = self.starts[nodes]
        counts = np.minimum(self.starts[nodes + 1] - begins, limit)
        ends = np.cumsum(counts)
        used = int(np.searchsorted(ends, limit)) + 1  # the nodes that fill `limit`
        begins, counts, ends, scores = begins[:used], counts[:used], ends[:used], scores[:used]
        offsets = np.repeat(begins - (ends - counts), counts) + np.arange(int(ends[-1]) if len(ends) else 0)
        return self.members[offsets[:limit]].astype(np.int64), np.repeat(scores, counts)[:limit]


def _median_us(run: Callable[[Vectors], object], queries: Vectors) -> float:
    times = []
    for query in queries:
        started = time.perf_counter_ns()
        run(query)
        times.append(time.perf_counter_ns() - started)
    return float(np.median(times)) / 1000.0


def _graph_search(graph: Any, queries: Vectors, k: int, ef: int) -> tuple[npt.NDArray[np.float32], Rows]:
    params = faiss.SearchParametersHNSW(efSearch=max(ef, k))  # type: ignore[attr-defined]
    scores, rows = graph.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
    return scores, rows


def _recall(per_query: npt.NDArray[np.float64], groups: npt.NDArray[np.intp]) -> tuple[float, float]:
    """The worst group's mean recall, and the worst lower end of a group's 95% confidence interval
    (Student's t over its queries)."""
    means, lows = [], []
    for group in np.unique(groups):
        values = per_query[groups == group]
        mean = float(values.mean())
        spread = float(stats.t.ppf(0.975, len(values) - 1) * stats.sem(values)) if len(values) > 1 else 0.0
        means.append(mean)
        lows.append(mean - spread if np.isfinite(spread) else mean)
    return min(means), min(lows)


def tune_index(
    items: Vectors,
    queries: Vectors,
    target_recall: float = 0.95,
    progress: Callable[[str], None] | None = None,
    groups: npt.NDArray[np.intp] | None = None,
) -> tuple[IndexChoice, Graph | None]:
    """The smallest efSearch whose recall@10 against exact inner-product search reaches
    `target_recall` on real queries, in every group of them (`groups`: one label per query, such
    as known users' vectors and new visitors' fold-ins; one group without), at the lower end of its
    95% confidence interval; and whichever of that graph and exact search has the lower median
    query time. Returns the choice and the graph (None when exact search wins)."""
    groups = np.zeros(len(queries), dtype=np.intp) if groups is None else np.asarray(groups)
    k = min(K, len(items))
    # The k-th best exact score of each query: a found item scoring at least that is one of the
    # best k. Items with equal vectors (cold items with the same categories and tags) tie, and
    # which of them exact search lists is arbitrary, so ids alone would count a tie as a miss.
    kth = np.array([float(items[exact_top_k(items, q, k)[-1]] @ q) for q in queries], dtype=np.float32)
    exact_us = _median_us(lambda q: exact_top_k(items, q, k), queries[:EXACT_TIMING_QUERIES])
    started = time.perf_counter()
    graph = Graph.build(items)
    build_seconds = time.perf_counter() - started
    if progress is not None:
        progress(
            f"index: HNSW graph over {len(items):,} items ({graph.index.ntotal:,} distinct vectors) built in "
            f"{build_seconds:.0f}s (M {HNSW_M})"
        )
    trials: list[IndexTrial] = []
    chosen: IndexTrial | None = None
    for ef in EF_SEARCH:
        scores, _ = graph.search(queries, k, ef)
        tolerance = 1e-5 * np.maximum(np.abs(kth), 1.0)
        per_query = (scores >= (kth - tolerance)[:, None]).sum(axis=1) / k
        recall, low = _recall(per_query, groups)
        latency = _median_us(lambda q, ef=ef: graph.search(q[None, :], k, ef), queries)  # type: ignore[misc]
        trial = IndexTrial(ef, recall, latency, round(low, 4))
        trials.append(trial)
        if progress is not None:
            progress(
                f"index: efSearch {ef}: recall@10 {recall:.3f} (95% interval from {trial.recall_low:.3f}), "
                f"median {latency:.0f}µs (exact {exact_us:.0f}µs)"
            )
        if trial.recall_low >= target_recall:
            chosen = trial
            break
    # Exact search wins when the graph cannot reach the target or is not clearly faster on this
    # catalog (exact is perfect and simpler: the graph must at least halve the time to earn its place).
    use_graph = chosen is not None and chosen.median_query_us < GRAPH_SPEED_UP * exact_us
    final = chosen if chosen is not None else trials[-1]
    choice = IndexChoice(
        method="hnsw" if use_graph else "exact",
        ef_search=final.ef_search,
        m=HNSW_M,
        ef_construction=EF_CONSTRUCTION,
        recall_at_10=final.recall_at_10 if use_graph else 1.0,
        median_query_us=final.median_query_us if use_graph else exact_us,
        exact_median_query_us=exact_us,
        target_recall=target_recall,
        queries=len(queries),
        nodes=graph.index.ntotal,
        build_seconds=round(build_seconds, 2),
        trials=trials,
    )
    return choice, graph if use_graph else None


class ItemIndex:
    """The best rows by inner product with a query: the snapshot's graph, memory-mapped and shared
    by every process that loads it (or exact search over the vectors, or an older build's Annoy
    forest), plus the items added since the build.

    Added items go into a small graph of this process's own (faiss cannot grow a memory-mapped
    one); a search asks both and merges by score. A rebuild folds them into the main graph.
    """

    def __init__(
        self,
        vectors: Vectors,
        *,
        method: str = "exact",
        graph: Graph | None = None,
        ef_search: int = 0,
        annoy: Any = None,
        search_k: int = 0,
    ) -> None:
        self.vectors = vectors
        self.method = method
        self.graph = graph
        self.ef_search = ef_search
        self.annoy = annoy
        self.search_k = search_k

    @classmethod
    def load(cls, directory: Path, index: dict[str, Any], vectors: Vectors, name: str = ITEMS_NAME) -> ItemIndex:
        """The index a manifest's `index` entry describes, over the snapshot's (mapped) vectors;
        its graph is the one saved as `name` (Graph.save)."""
        method = str(index["method"])
        if method == "hnsw":
            graph = Graph.load(directory, name)
            if graph.items != len(vectors) or graph.index.d != vectors.shape[1]:
                raise ValueError(
                    f"{graph_files(name)[0]} holds {graph.items} items of {graph.index.d}, not the item table's"
                )
            return cls(vectors, method=method, graph=graph, ef_search=int(index["ef_search"]))
        if method == "annoy":
            annoy = AnnoyIndex(vectors.shape[1], "dot")
            annoy.load(str(directory / ANNOY_FILE))  # memory-mapped by Annoy itself
            return cls(vectors, method=method, annoy=annoy, search_k=int(index["search_k"]))
        if method == "exact":
            return cls(vectors)
        raise ValueError(f"unknown index method {method!r} (this gateway serves hnsw, exact and annoy)")

    def search(
        self, query: Vectors, k: int, exclude: npt.NDArray[np.integer] | None = None
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
        """The `k` best rows (fewer if the catalog is smaller) and their scores, best first,
        never one of `exclude`."""
        excluded = np.empty(0, dtype=np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
        if self.method == "exact":
            scores = self.vectors @ query
            if len(excluded):
                excluded = excluded[excluded < len(scores)]
                scores[excluded] = -np.inf
            rows = _top(scores, k)
            rows = rows[np.isfinite(scores[rows])]
            found, found_scores = rows.astype(np.int64), scores[rows]
        elif self.method == "hnsw":
            assert self.graph is not None
            fetch = min(k + len(excluded), self.graph.items)
            hits, ids = self.graph.search(query[None, :], fetch, self.ef_search)
            keep = ids[0] >= 0  # faiss pads with -1 when it finds fewer
            found, found_scores = ids[0][keep], hits[0][keep]
        else:
            fetch = k + len(excluded)
            found = np.asarray(
                self.annoy.get_nns_by_vector(query.tolist(), fetch, search_k=max(self.search_k, fetch)), dtype=np.int64
            )
            found_scores = self.vectors[found] @ query  # re-rank the over-fetched rows exactly
        if len(excluded) and self.method != "exact":
            keep = ~np.isin(found, excluded)
            found, found_scores = found[keep], found_scores[keep]
        order = np.argsort(-found_scores, kind="stable")[:k]
        return found[order].astype(np.int32), found_scores[order].astype(np.float32)

    def search_many(
        self, queries: Vectors, k: int, *, threads: int = 0
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """The `k` best rows of each query, best first (the builder's batch form: -1 pads a row
        with fewer). Graph searches run on `threads` cores (0: all)."""
        k = min(k, len(self.vectors))
        if self.method == "hnsw":
            assert self.graph is not None
            if threads:
                faiss.omp_set_num_threads(threads)
            hits, ids = self.graph.search(queries, k, self.ef_search)
            return ids.astype(np.int64), hits
        scores = queries @ self.vectors.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.argsort(-scores, axis=1)
        picked = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-picked, axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1).astype(np.int64), np.take_along_axis(picked, order, axis=1)


def _top(scores: npt.NDArray[np.floating], k: int) -> npt.NDArray[np.intp]:
    k = min(k, len(scores))
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return top[np.argsort(-scores[top], kind="stable")]


def precompute_pools(
    index: ItemIndex,
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
    """Each user's `size` best unseen items by the index, best first (-inf scores pad a user who has
    seen nearly everything).

    Users go in batches of similar history length, each asking the index for `size` plus the
    longest history in the batch and dropping what they have seen: one batched search (a matrix
    product for exact search, all cores for the graph) instead of one query per user.
    """
    n_items = len(index.vectors)
    size = min(size, n_items)
    if user_rows is None:
        user_rows = np.arange(len(users), dtype=np.int32)
    history = seen_indptr[user_rows + 1] - seen_indptr[user_rows]
    by_history = np.argsort(history, kind="stable")
    if index.method == "exact":  # a dense block of batch x items scores: keep it under ~256 MB
        batch = max(1, min(batch, (1 << 26) // max(n_items, 1)))
    rows = np.zeros((len(users), size), dtype=np.int32)
    scores = np.full((len(users), size), -np.inf, dtype=np.float32)
    started = time.perf_counter()
    for done, start in enumerate(range(0, len(users), batch), start=1):
        members = by_history[start : start + batch]
        found, found_scores = index.search_many(users[members], size + int(history[members].max()))
        for at, member in enumerate(members):
            user = int(user_rows[member])
            seen = seen_indices[seen_indptr[user] : seen_indptr[user + 1]]
            keep = (found[at] >= 0) & ~np.isin(found[at], seen)
            picked, picked_scores = found[at][keep][:size], found_scores[at][keep][:size]
            rows[member, : len(picked)] = picked
            scores[member, : len(picked)] = picked_scores
        stop = min(start + batch, len(users))
        if progress is not None and (stop == len(users) or done % 20 == 0):
            elapsed = time.perf_counter() - started
            remaining = elapsed / stop * (len(users) - stop)
            progress(f"{label}: {stop:,}/{len(users):,} {unit} ({elapsed:.0f}s, about {remaining:.0f}s to go)")
    return rows, scores

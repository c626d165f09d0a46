"""Candidate pools: the best `pool_size` rows for one taste vector or item, best first, over one
snapshot, and the bounded cache that keeps them (see gateway.recommend.pipeline for how a request uses them).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from gateway.recommend import kernels
from gateway.snapshot import Rows, Snapshot, Vectors

T = TypeVar("T")
V = TypeVar("V")
Offload = Callable[[Callable[[], T]], Awaitable[T]]

# Candidate sources for visitors the build did not know (see Candidates.around).
LIVE_NEIGHBOURS = 50
LIVE_POPULAR = 100
LIVE_CATEGORY_POPULAR = 50
MIN_GRAPH_DEPTH = 100


def graph_depth(pool_size: int, ef_search: int) -> int:
    """How many rows a pool from the graph holds: a search for more rows than efSearch widens to
    that many (faiss searches max(efSearch, rows) wide) and costs in proportion, where the tuner's
    recall target already holds at efSearch. On the 1M-item shop (efSearch 128) 203 rows cost 434 µs
    a search, 100 rows 276 µs. At least MIN_GRAPH_DEPTH rows, for the rules' depth (3n + 20)."""
    return min(pool_size, max(ef_search, MIN_GRAPH_DEPTH))


class Pool(msgspec.Struct, frozen=True, gc=False):
    """Candidate rows, best first, and their scores. Tens of thousands sit in the candidate cache,
    so the collector must not walk them (gc=False: two arrays never make a cycle)."""

    rows: npt.NDArray[np.int32]
    scores: npt.NDArray[np.float32]


# A visitor's distinct recent rows (ascending) and the confidence of each.
LiveProfile = tuple[tuple[int, ...], tuple[float, ...]]


class LRU(Generic[V]):
    """A bounded mapping touched only from the event loop thread, so it needs no lock."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        pool = self._data.get(key)
        if pool is None:
            self.misses += 1
            return None
        self.hits += 1
        self._data.move_to_end(key)
        return pool

    def put(self, key: Hashable, pool: V) -> None:
        if self.capacity <= 0:
            return
        self._data[key] = pool
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class Candidates:
    """Nearest items for a taste vector or an item, over one snapshot."""

    def __init__(self, snap: Snapshot, *, pool_size: int, cache_entries: int, offload: Offload[Pool]) -> None:
        self.snap = snap
        self.pool_size = pool_size
        self.cache: LRU[Pool] = LRU(cache_entries)
        self._popular_in: dict[frozenset[str], npt.NDArray[np.int64]] = {}  # one per category set in the catalog
        self._scratch = threading.local()  # per thread: `around`'s marks (one byte per catalog row)
        self._offload = offload

    async def cached(self, key: Hashable, compute: Callable[[], Pool], *, bounded: bool = False) -> Pool:
        """The cached pool, or a new one: computed right here when its work is `bounded` (a few
        thousand dot products at most: handing it to a thread would cost more in GIL hand-overs than
        it saves), in a worker thread when it grows with the catalog."""
        pool = self.cache.get(key)
        if pool is None:
            pool = compute() if bounded else await self._offload(compute)
            self.cache.put(key, pool)
        return pool

    def top(self, vector: Vectors, *, exclude: npt.NDArray[np.integer] | None, within: Rows | None = None) -> Pool:
        """The `pool_size` best rows by dot product with `vector`, without `exclude`; from the
        snapshot's graph, at most its efSearch rows (`graph_depth`)."""
        snap, k = self.snap, self.pool_size
        excluded = np.empty(0, dtype=np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
        if within is None:
            depth = graph_depth(k, snap.index.ef_search) if snap.index.method == "hnsw" else k
            found = Pool(*snap.index.search(vector, depth, excluded))
            return self.with_added(found, snap.item_vectors, vector, excluded, depth=depth)
        rows = within.astype(np.int64)
        scores = snap.item_vectors[rows] @ vector
        if len(excluded):
            keep = ~np.isin(rows, excluded)
            rows, scores = rows[keep], scores[keep]
        return _best(rows, scores, k)

    def around(self, live: LiveProfile) -> Pool:
        """The best rows for a new visitor (their taste vector folded in from `live`) among the
        nearest neighbours of the items they interacted with, the most popular items overall and
        the most popular in those items' categories: a few hundred candidates instead of the whole
        catalog, scored in one compiled call (gateway.recommend.kernels.live_pool).

        Measured on the 100k-item benchmark shop (profiles of 1-3 items, recall@10 against a search
        of the whole catalog): neighbours and popular items alone reach 0.71; adding the categories'
        popular items 0.98, at about 300 candidates.
        """
        snap = self.snap
        assert snap.neighbour_rows is not None
        category_sets = snap.category_sets
        bases = {id(base): base for base in (self._popular_around(category_sets[row]) for row in live[0])}
        base = next(iter(bases.values())) if len(bases) == 1 else np.concatenate(list(bases.values()))
        marks = getattr(self._scratch, "marks", None)
        if marks is None:
            marks = self._scratch.marks = np.zeros(len(snap.item_ids), dtype=np.uint8)
        rows, scores = kernels.live_pool(
            snap.item_vectors,
            snap.gram_inverse,
            np.array(live[0], dtype=np.int64),
            np.array(live[1], dtype=np.float64),
            neighbour_rows=snap.neighbour_rows,
            neighbours=LIVE_NEIGHBOURS,
            base=base,
            size=self.pool_size,
            marks=marks,
        )
        return Pool(rows, scores)

    def _popular_around(self, categories: frozenset[str]) -> npt.NDArray[np.int64]:
        """The popular items overall and in these categories, and the items added to these
        categories since the build (the newest, as many as of the popular ones): shared by every
        item of the same categories, so only a few hundred of these exist."""
        found = self._popular_in.get(categories)
        if found is None:
            snap = self.snap
            popular = snap.popular
            sources = [popular[""][:LIVE_POPULAR]]
            sources.extend(popular[c][:LIVE_CATEGORY_POPULAR] for c in categories if c in popular)
            if snap.built_rows < len(snap.item_ids):
                for c in categories:
                    rows = snap.category_rows.get(c)
                    if rows is not None:
                        sources.append(rows[np.searchsorted(rows, snap.built_rows) :][-LIVE_CATEGORY_POPULAR:])
            found = self._popular_in[categories] = _distinct(np.concatenate(sources).astype(np.int64))
        return found

    def with_added(
        self,
        pool: Pool,
        vectors: Vectors,
        query: Vectors,
        exclude: npt.NDArray[np.integer],
        *,
        depth: int | None = None,
    ) -> Pool:
        """`pool`, found by the build's index or neighbour lists (which know only the rows the build
        made), merged with the best of the rows added since (gateway.catalog.view), scored exactly
        against `query` over `vectors`, `exclude` left out; the best `depth` rows (default
        `pool_size`: deeper than the search went, the rows would be added ones only). This is the
        one place where added items join a search of the build's index. Exact, so its cost grows
        with the items added since the build (a 64-wide dot product each); the next build takes
        them into the index."""
        snap = self.snap
        if snap.built_rows >= len(snap.item_ids):
            return pool
        added = np.arange(snap.built_rows, len(snap.item_ids), dtype=np.int64)
        if len(exclude):
            added = added[~np.isin(added, exclude)]
        rows = np.concatenate([pool.rows.astype(np.int64), added])
        scores = np.concatenate([pool.scores, (vectors[added] @ query).astype(np.float32)])
        return _best(rows, scores, self.pool_size if depth is None else depth)

    def similar_top(self, row: int, *, within: Rows | None = None) -> Pool:
        """The `pool_size` rows most similar to `row` (cosine), without it: from the snapshot's
        similar-items graph where it has one (at most its efSearch rows, see `graph_depth`), else a
        scan of every row."""
        snap = self.snap
        if within is not None:
            rows = within.astype(np.int64)
            rows = rows[rows != row]
            return _best(rows, snap.unit_vectors[rows] @ snap.unit_vectors[row], self.pool_size)
        itself = np.array([row], dtype=np.int64)
        if snap.similar_index is not None:
            depth = graph_depth(self.pool_size, snap.similar_index.ef_search)
            found = Pool(*snap.similar_index.search(snap.unit_vectors[row], depth, itself))
            return self.with_added(found, snap.unit_vectors, snap.unit_vectors[row], itself, depth=depth)
        scores = snap.unit_vectors @ snap.unit_vectors[row]
        scores[row] = -np.inf
        return _best_of_all(scores, self.pool_size)


def _distinct(rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """np.unique without its overhead, for a few hundred rows."""
    rows = np.sort(rows)
    keep = np.empty(len(rows), dtype=bool)
    keep[:1] = True
    np.not_equal(rows[1:], rows[:-1], out=keep[1:])
    return rows[keep]


def _best(rows: npt.NDArray[np.int64], scores: npt.NDArray[np.floating], k: int) -> Pool:
    k = min(k, len(rows))
    if k == 0:
        return Pool(np.empty(0, dtype=np.int32), np.empty(0, dtype=np.float32))
    if len(rows) <= 4 * k:  # a few hundred rows: one stable sort beats partition-then-sort
        order = (-scores).argsort(kind="stable")[:k]
    else:
        top = np.argpartition(-scores, k - 1)[:k]
        order = top[np.argsort(-scores[top], kind="stable")]
    return Pool(rows[order].astype(np.int32), scores[order].astype(np.float32))


def _best_of_all(scores: npt.NDArray[np.floating], k: int) -> Pool:
    """The k best of a score per catalog row (excluded rows hold -inf and never come back)."""
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = top[np.argsort(-scores[top], kind="stable")]
    order = order[np.isfinite(scores[order])]
    return Pool(order.astype(np.int32), scores[order].astype(np.float32))

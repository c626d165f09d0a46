"""A snapshot's popular items as answers: ranked picks per category set and the same as a pool
(for the rules' selection), made on first use; for one category or none they are kept, not for
every combination (a client could make up endless ones)."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import numpy.typing as npt

from gateway.recommend.candidates import Pool
from gateway.rules.picks import Pick, rounded
from gateway.snapshot import Snapshot

POPULAR = "popular"


class Popular:
    def __init__(self, snap: Snapshot, serves: npt.NDArray[np.bool_] | None = None) -> None:
        """`serves`: per row, whether it may be served (None: every row may)."""
        self.snap = snap
        self.serves = serves
        self._ranked: dict[tuple[str, ...], list[Pick]] = {}
        self._pools: dict[tuple[str, ...], Pool] = {}

    def pool(self, categories: Collection[str]) -> Pool:
        """The popular list of these categories as a pool (made on first use, kept as `ranked` keeps its lists)."""
        key = tuple(sorted(categories))
        pool = self._pools.get(key)
        if pool is None:
            ranked = self.ranked(key)
            rows = np.fromiter((p.row for p in ranked), dtype=np.int32, count=len(ranked))
            scores = np.fromiter((p.score for p in ranked), dtype=np.float32, count=len(ranked))
            pool = Pool(rows, scores)
            if len(key) <= 1:
                self._pools[key] = pool
        return pool

    def ranked(self, categories: Collection[str]) -> list[Pick]:
        """Every item of these categories (all without), most popular first."""
        key = tuple(sorted(categories))
        ranked = self._ranked.get(key)
        if ranked is None:
            ranked = self._rank(key)
            if len(key) <= 1:  # not every combination: a client could make up endless ones
                self._ranked[key] = ranked
        return ranked

    def top(self, *, n: int, categories: Collection[str], excluded: set[int]) -> list[Pick]:
        picks: list[Pick] = []
        for pick in self.ranked(categories):
            if pick.row not in excluded:
                picks.append(pick)
                if len(picks) == n:
                    break
        return picks

    def _rank(self, categories: tuple[str, ...]) -> list[Pick]:
        """The snapshot's popular list for these categories (merged, by popularity) as picks."""
        snap = self.snap
        if categories:
            lists = [snap.popular[c] for c in categories if c in snap.popular]
            merged = np.unique(np.concatenate(lists)) if lists else np.empty(0, dtype=np.intp)
            rows = merged[np.argsort(-snap.popularity[merged], kind="stable")]
        else:
            rows = snap.popular[""]
        if self.serves is not None:
            rows = rows[self.serves[rows]]
        scores = snap.popularity[rows].astype(np.float64).tolist()
        return [Pick(row, rounded(score), POPULAR) for row, score in zip(rows.tolist(), scores, strict=True)]

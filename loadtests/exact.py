"""The snapshot as the benchmark reads it from its files, and recall@10 of served answers against
exact search over it (known users: their stored vector; new visitors: the builder's fold-in)."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
import numpy.typing as npt

from index_builder.model import ModelParams, fold_in, profile_confidence, regularized_gram
from loadtests.harness import check_shape

RECALL_K = 10
Floats = npt.NDArray[np.float32]
Rows = npt.NDArray[np.intp]


@dataclass
class Snapshot:
    directory: Path
    version: str
    manifest: dict[str, Any]
    item_ids: list[str]
    item_row: dict[str, int]
    user_ids: list[str]
    item_vectors: Floats
    user_vectors: Floats
    seen_indptr: npt.NDArray[np.int64]
    seen_indices: npt.NDArray[np.int64]
    in_stock: npt.NDArray[np.bool_]
    popular: dict[str, list[int]]
    params: ModelParams = field(init=False)
    event_weights: dict[str, float] = field(init=False)
    gram: npt.NDArray[np.float64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        parameters = self.manifest["parameters"]
        self.params = ModelParams(**parameters["model"])
        self.event_weights = {str(k): float(v) for k, v in parameters["event_weights"].items()}
        self.gram = regularized_gram(self.item_vectors, self.params.regularization)

    @classmethod
    def load(cls, root: Path) -> Snapshot:
        version = (root / "CURRENT").read_text().strip()
        directory = root / version
        items = json.loads((directory / "items.json").read_bytes())
        item_ids = [str(item["item_id"]) for item in items]
        return cls(
            directory=directory,
            version=version,
            manifest=json.loads((directory / "manifest.json").read_bytes()),
            item_ids=item_ids,
            item_row={item_id: row for row, item_id in enumerate(item_ids)},
            user_ids=[str(u) for u in json.loads((directory / "users.json").read_bytes())],
            item_vectors=np.load(directory / "item_vectors.npy"),
            user_vectors=np.load(directory / "user_vectors.npy"),
            seen_indptr=np.load(directory / "seen_indptr.npy").astype(np.int64),
            seen_indices=np.load(directory / "seen_indices.npy").astype(np.int64),
            in_stock=np.array([(item.get("stock") is None or item["stock"] > 0) for item in items], dtype=np.bool_),
            popular={
                str(k): [int(r) for r in v] for k, v in json.loads((directory / "popular.json").read_bytes()).items()
            },
        )

    def seen(self, user_row: int) -> Rows:
        return self.seen_indices[self.seen_indptr[user_row] : self.seen_indptr[user_row + 1]].astype(np.intp)

    def exact_top(self, vector: Floats, exclude: Rows, *, in_stock_only: bool = False) -> set[str]:
        """The ids of the best RECALL_K items, and of every item tied with the last of them: items
        with equal vectors (cold items of the same content) tie, and any of them is a right answer."""
        scores = self.item_vectors @ vector
        scores[exclude] = -np.inf
        if in_stock_only:
            scores[~self.in_stock] = -np.inf
        kth = float(np.partition(-scores, RECALL_K - 1)[RECALL_K - 1])
        tied = np.flatnonzero(scores >= -kth - 1e-5 * max(abs(kth), 1.0))
        return {self.item_ids[int(row)] for row in tied}

    def visitor_vector(self, rows: Sequence[int], event: str) -> tuple[Floats, Rows]:
        """The fold-in the gateway should compute for a visitor whose events are `rows`, oldest first."""
        items = np.asarray(rows, dtype=np.intp)
        weights = np.full(len(items), self.event_weights[event], dtype=np.float32)
        distinct, confidence = profile_confidence(items, weights, self.params)
        return fold_in(self.item_vectors, self.gram, distinct, confidence), distinct


def measure_recall(
    client: httpx.Client, snap: Snapshot, visitors: dict[str, list[int]], samples: int, rng: random.Random
) -> dict[str, Any]:
    """recall@10 of served /v1/recommend results against exact search, for known users and new visitors;
    for never-seen visitors (no reference), only which fallback and reasons they got."""
    out: dict[str, Any] = {}
    problems: list[str] = []
    kinds = ("known", "new", "unknown")
    cases: list[tuple[str, str, Floats | None, Rows | None]] = []
    for user in rng.sample(range(len(snap.user_ids)), min(samples, len(snap.user_ids))):
        cases.append(("known", f"user={snap.user_ids[user]}", snap.user_vectors[user], snap.seen(user)))
    for visitor in rng.sample(list(visitors), min(samples, len(visitors))):
        folded, clicked = snap.visitor_vector(visitors[visitor], "click")
        cases.append(("new", f"visitor={visitor}", folded, clicked))
    cases += [("unknown", f"visitor=anon-{rng.getrandbits(64):016x}", None, None) for _ in range(min(samples, 50))]
    recalls: dict[str, list[float]] = {kind: [] for kind in kinds}
    in_stock: dict[str, list[float]] = {kind: [] for kind in kinds}
    reasons: dict[str, Counter[str]] = {kind: Counter() for kind in kinds}
    fallbacks: dict[str, Counter[str]] = {kind: Counter() for kind in kinds}
    latencies: dict[str, list[float]] = {kind: [] for kind in kinds}
    for kind, query, vector, exclude in cases:
        started = time.perf_counter()
        response = client.get(f"/v1/recommend?{query}&n={RECALL_K}")
        latencies[kind].append((time.perf_counter() - started) * 1000)
        problem = check_shape(response)
        if problem:
            problems.append(f"GET /v1/recommend?{query}: {problem}")
            continue
        body = response.json()
        served = [str(item["id"]) for item in body["items"]]
        fallbacks[kind][str(body["fallback"])] += 1
        for item in body["items"]:
            reasons[kind].update(str(r) for r in item["reasons"])
        if vector is None or exclude is None:
            continue
        recalls[kind].append(len(set(served) & snap.exact_top(vector, exclude)) / RECALL_K)
        in_stock[kind].append(len(set(served) & snap.exact_top(vector, exclude, in_stock_only=True)) / RECALL_K)
    for kind in kinds:
        out[kind] = {
            "recall_at_10": round(float(np.mean(recalls[kind])), 4) if recalls[kind] else None,
            "recall_at_10_vs_exact_in_stock": round(float(np.mean(in_stock[kind])), 4) if in_stock[kind] else None,
            "queries": len(latencies[kind]),
            "fallbacks": dict(fallbacks[kind]),
            "reasons": dict(reasons[kind].most_common(5)),
            "sequential_latency_ms_p50": round(float(np.median(latencies[kind])), 3) if latencies[kind] else None,
        }
    out["problems"] = problems[:20]
    return out

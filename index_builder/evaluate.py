"""Offline ranking metrics on a temporal hold-out, with items the user has already seen removed."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from scipy import stats

from index_builder.dataset import Interactions

# Scores for a batch of user indices: shape (len(users), n_items); higher is better.
Scorer = Callable[[npt.NDArray[np.int32]], npt.NDArray[np.float32]]

K = 10
BATCH = 512
SCORES_PER_BATCH = 1 << 25  # a batch's dense user x item scores stay near 128 MB, whatever the catalog


class Metrics(msgspec.Struct, frozen=True):
    ndcg_at_10: float
    recall_at_10: float
    precision_at_10: float
    map_at_10: float
    coverage: float
    users: int
    # Half-width of the 95% confidence interval of ndcg_at_10 over the users scored (Student's t on
    # their per-user values): a sampled evaluation says how far the full hold-out could be.
    ndcg_ci95: float = 0.0


def top_k_unseen(scores: npt.NDArray[np.float32], seen: sp.csr_matrix, k: int = K) -> npt.NDArray[np.int64]:
    """Best `k` item indices per row, best first, never one the row's user has already seen."""
    scores = np.array(scores, dtype=np.float32, copy=True)
    rows, cols = seen.nonzero()
    scores[rows, cols] = -np.inf
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def evaluate(
    score: Scorer,
    train: Interactions,
    test: Interactions,
    *,
    k: int = K,
    max_users: int | None = None,
    seed: int = 0,
) -> Metrics:
    """nDCG, recall, precision and MAP at `k`, and catalog coverage, over users with unseen test items.

    Relevance is binary: any held-out interaction with an item the user had not met in training.
    Recall divides hits by the number of relevant items; MAP divides by min(k, relevant).
    With `max_users`, a seeded random sample of that many users is evaluated (coverage then
    counts only their lists).
    """
    seen = train.seen_matrix().tocsr()
    relevant = (test.seen_matrix() - seen.multiply(test.seen_matrix())).tocsr()
    relevant.eliminate_zeros()
    users = np.flatnonzero(np.diff(relevant.indptr) > 0).astype(np.int32)
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recall = precision = ap = 0.0
    per_user_ndcg: list[npt.NDArray[np.float64]] = []
    recommended: set[int] = set()
    batch_size = max(1, min(BATCH, SCORES_PER_BATCH // max(train.n_items, 1)))
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        top = top_k_unseen(score(batch), seen[batch], k)
        recommended.update(np.unique(top).tolist())
        hits = np.asarray(relevant[batch][np.arange(len(batch))[:, None], top].todense()) > 0
        ranks = hits.shape[1]  # fewer than k when the catalog is smaller than k
        n_relevant = np.diff(relevant.indptr)[batch]
        ideal = np.array([discounts[: min(int(n), k)].sum() for n in n_relevant])
        per_user_ndcg.append((hits * discounts[:ranks]).sum(axis=1) / ideal)
        recall += float((hits.sum(axis=1) / n_relevant).sum())
        precision += float(hits.sum(axis=1).sum() / k)
        precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, ranks + 1)
        ap += float(((precision_at_i * hits).sum(axis=1) / np.minimum(n_relevant, k)).sum())
    n = max(len(users), 1)
    ndcg = np.concatenate(per_user_ndcg) if per_user_ndcg else np.zeros(0)
    ci95 = float(stats.t.ppf(0.975, len(ndcg) - 1) * stats.sem(ndcg)) if len(ndcg) > 1 else 0.0
    return Metrics(
        ndcg_at_10=float(ndcg.sum()) / n,
        recall_at_10=recall / n,
        precision_at_10=precision / n,
        map_at_10=ap / n,
        coverage=len(recommended) / max(train.n_items, 1),
        users=len(users),
        ndcg_ci95=ci95 if np.isfinite(ci95) else 0.0,
    )

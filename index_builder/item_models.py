"""The item models that rank known users from the snapshot's precomputed pools instead of ALS's
vectors: EASE (`index_builder.ease`) and RP3beta (`index_builder.rp3`). Which one a configuration
names, its scores for profile rows, and the pools. Visitors the build did not know are always
folded into the ALS vectors, so these models need a pool for every known user.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from index_builder import ease, rp3
from index_builder.dataset import Interactions
from index_builder.evaluate import SCORES_PER_BATCH, Scorer, top_k_unseen
from index_builder.model import ModelParams

ItemModel = Literal["als", "ease", "rp3"]


def chosen(params: ModelParams) -> ItemModel:
    if params.ease_regularization > 0:
        return "ease"
    if params.rp3_neighbours > 0:
        return "rp3"
    return "als"


def fit(train: Interactions, params: ModelParams, content: sp.csr_matrix | None = None) -> ease.Apply:
    """The pooled item model `params` names, fitted to `train` (EASE with `content`, the category
    rows, when `params.ease_content_weight` asks for them, and with visit rows when
    `params.ease_visit_weight` does)."""
    if chosen(params) == "ease":
        return ease.fit(
            train, params.ease_regularization, content, params.ease_content_weight, params.ease_visit_weight
        )
    if chosen(params) == "rp3":
        weights = rp3.fit(train, params.rp3_alpha, params.rp3_beta, params.rp3_neighbours)
        return lambda rows: rp3.scores(rows, weights)
    raise ValueError("ALS ranks with its vectors, not with an item-item model")


def scorer(
    train: Interactions, params: ModelParams, profile: sp.csr_matrix | None = None, content: sp.csr_matrix | None = None
) -> Scorer:
    """Scores of the item model `params` names, fitted to `train`, for batches of its users: each
    user's row of `profile` (e.g. recency-weighted, `train.profile_matrix`; default binary) times
    the model's item-item weights."""
    apply = fit(train, params, content)
    rows = (train.seen_matrix() if profile is None else profile).tocsr()
    return lambda batch: apply(rows[batch])


def pools(
    score: Scorer, seen: sp.csr_matrix, users: npt.NDArray[np.int32], size: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Each of `users`' `size` best unseen items by `score`, best first, and their scores: the
    snapshot's precomputed pools, from which the gateway serves known users. Users are scored in
    batches of at most 512 and SCORES_PER_BATCH / 4 dense scores, whatever the catalog."""
    size = min(size, seen.shape[1])
    batch = max(1, min(512, SCORES_PER_BATCH // 4 // max(seen.shape[1], 1)))
    rows = np.empty((len(users), size), dtype=np.int32)
    scores = np.empty((len(users), size), dtype=np.float32)
    for start in range(0, len(users), batch):
        chunk = users[start : start + batch]
        block = score(chunk)
        top = top_k_unseen(block, seen[chunk], size)
        picked = np.take_along_axis(block, top, axis=1)
        # A catalog with fewer unseen items than `size` fills the rest with seen ones, scored -inf.
        picked[np.asarray(seen[chunk][np.arange(len(chunk))[:, None], top].todense()) > 0] = -np.inf
        rows[start : start + len(chunk)] = top
        scores[start : start + len(chunk)] = picked
    return rows, scores

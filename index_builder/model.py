"""The recommender's math that both the builder and the gateway use: recency weights and fold-in.

A visitor is represented by folding their interactions into the item-vector space with implicit's
ALS least-squares step. Each interaction's confidence has two parts: a lasting one (long-term
taste, `long_term_share` of it, never decays) and a recent one (short-term intent, the rest, halves
every `half_life_events` events back). The builder's tuner chooses the blend on its validation
splits; the builder computes stored user vectors this way and the gateway does the same on the fly
for visitors the snapshot does not know (`recent_confidence`), so both paths rank alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt


class ModelParams(msgspec.Struct, frozen=True):
    factors: int = 64
    regularization: float = 10.0
    alpha: float = 5.0
    iterations: int = 15
    # Confidence halves every `half_life_events` events back in a visitor's history; 0 = no decay.
    half_life_events: float = 3.0
    # The share of each event's confidence that never decays: 1 = taste only (no recency), 0 =
    # recency only. Snapshots from before the blend existed have none, hence the default 0.
    long_term_share: float = 0.0
    # > 0: the builder ranked known users with EASE of this λ (index_builder.ease) into the
    # snapshot's precomputed pools; the ALS vectors above still serve everyone else. 0: ALS only.
    ease_regularization: float = 0.0
    # > 0: the builder ranked known users with RP3beta (index_builder.rp3) keeping this many
    # neighbours per item, with these α and β, into the pools instead; 0: not RP3beta.
    rp3_neighbours: int = 0
    rp3_alpha: float = 1.0
    rp3_beta: float = 0.0
    # > 0: ALS's item vectors were fitted with each category as one more row of its input, a
    # pseudo-user who has every item in it at this weight (content.category_rows), so items that
    # share categories share taste; the gateway serves the vectors as any others. 0: interactions only.
    content_weight: float = 0.0
    # > 0: EASE (ease_regularization) was fitted with the same category rows below its users' rows,
    # at this weight (EASE's rows are binary, so its scale is its own).
    ease_content_weight: float = 0.0
    # > 0: EASE was fitted with each visit (Interactions.visit_matrix) as one more row below its
    # users' rows, the rows times √weight, so XᵀX gains weight times the visits' own co-occurrence;
    # λ is scaled by 1 + weight, as every item's count on XᵀX's diagonal is.
    ease_visit_weight: float = 0.0


def recency_decay(events_ago: npt.NDArray[np.int64], half_life: float) -> npt.NDArray[np.float32]:
    """0.5 ** (events_ago / half_life): the newest event weighs 1."""
    if half_life <= 0:
        return np.ones(events_ago.shape, dtype=np.float32)
    return np.power(0.5, events_ago / half_life).astype(np.float32)


def recency_weights(events_ago: npt.NDArray[np.int64], params: ModelParams) -> npt.NDArray[np.float32]:
    """Each event's weight in the profile: long_term_share + (1 - long_term_share) * decay."""
    share = params.long_term_share
    decayed = recency_decay(events_ago, params.half_life_events)
    if share <= 0:
        return decayed
    return (share + (1.0 - share) * decayed).astype(np.float32)


def regularized_gram(item_vectors: npt.NDArray[np.float32], regularization: float) -> npt.NDArray[np.float64]:
    """YᵀY + λI, the part of every fold-in system that does not depend on the visitor."""
    y = item_vectors.astype(np.float64)
    gram = y.T @ y
    gram[np.diag_indices_from(gram)] += regularization
    return gram


def fold_in(
    item_vectors: npt.NDArray[np.float32],
    gram: npt.NDArray[np.float64],
    items: npt.NDArray[np.intp],
    confidence: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    """The user vector x minimising implicit's ALS loss for a fixed item matrix.

    Solves (YᵀY + λI + Yᵤᵀ(Cᵤ - I)Yᵤ) x = Yᵤᵀ Cᵤ pᵤ, exactly what implicit's `_least_squares`
    does for one user, with `confidence` already aggregated per distinct item.
    """
    if len(items) == 0:
        return np.zeros(item_vectors.shape[1], dtype=np.float32)
    y = item_vectors[items].astype(np.float64)
    c = confidence.astype(np.float64)
    a = gram + (y.T * (c - 1.0)) @ y
    b = y.T @ c
    return np.linalg.solve(a, b).astype(np.float32)


def fold_in_low_rank(
    item_vectors: npt.NDArray[np.float32],
    gram_inverse: npt.NDArray[np.floating[Any]],
    items: npt.NDArray[np.intp],
    confidence: npt.NDArray[np.float64],
) -> npt.NDArray[np.float32]:
    """`fold_in` for a short history, from a precomputed (YᵀY + λI)⁻¹ = A⁻¹.

    The visitor's system matrix is A + U D Uᵀ with U = Yᵤᵀ (k x m) and D = diag(c - 1): a rank-m
    update of A. By the Woodbury identity (in the form that needs no D⁻¹, as c may equal 1),

        x = x₀ - P (I + D UᵀP)⁻¹ D Uᵀx₀,   where P = A⁻¹U and x₀ = A⁻¹ Uc = P c,

    so instead of factorising a k x k matrix per visitor (about 60 µs at k = 64) only an m x m
    system is solved. Worth it while m is much smaller than k: the gateway's recent-events lists.
    """
    if len(items) == 0:
        return np.zeros(item_vectors.shape[1], dtype=np.float32)
    y = item_vectors[items].astype(np.float64)  # Uᵀ, m x k
    c = np.asarray(confidence, dtype=np.float64)
    p = gram_inverse @ y.T  # k x m
    x0 = p @ c
    d = c - 1.0
    r = d * (y @ x0)
    if len(c) == 1:  # one item: a scalar equation, and most new visitors have clicked one thing
        correction = r / (1.0 + d[0] * float(y[0] @ p[:, 0]))
    else:
        s = y @ p
        s *= d[:, None]
        s.flat[:: len(c) + 1] += 1.0  # + I
        correction = np.linalg.solve(s, r)
    vector: npt.NDArray[np.float32] = (x0 - p @ correction).astype(np.float32)
    return vector


def recent_confidence(
    items: Sequence[int], weights: Sequence[float], params: ModelParams
) -> tuple[list[int], list[float]]:
    """`profile_confidence` in plain Python, for a history of a few dozen events at most, where
    numpy's per-call overhead would cost more than the arithmetic: distinct items ascending."""
    half_life, alpha, last = params.half_life_events, params.alpha, len(items) - 1
    share = params.long_term_share
    total: dict[int, float] = {}
    for position, (item, weight) in enumerate(zip(items, weights, strict=True)):
        decay = 0.5 ** ((last - position) / half_life) if half_life > 0 else 1.0
        if share > 0:
            decay = share + (1.0 - share) * decay
        total[item] = total.get(item, 0.0) + weight * decay * alpha
    distinct = sorted(total)
    return distinct, [total[item] for item in distinct]


def profile_confidence(
    items: npt.NDArray[np.intp], weights: npt.NDArray[np.float32], params: ModelParams
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Distinct items and their confidence from one visitor's history, oldest event first."""
    events_ago = np.arange(len(items) - 1, -1, -1, dtype=np.int64)
    contribution = weights * recency_weights(events_ago, params) * params.alpha
    distinct, inverse = np.unique(items, return_inverse=True)
    confidence = np.zeros(len(distinct), dtype=np.float32)
    np.add.at(confidence, inverse, contribution)
    return distinct.astype(np.intp), confidence

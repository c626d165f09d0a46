"""RP3beta (Paudel, Christoffel, Chen, Bernstein 2017): item-item weights from a three-step random
walk item → user → item on the bipartite interaction graph, discounted by the target's popularity.

With X the binary users x items matrix, P_ui = X row-normalised (each user's items share 1) and
P_iu = Xᵀ row-normalised (each item's users share 1), both raised elementwise to α:

    W[i, j] = (P_iu^α P_ui^α)[i, j] / popularity(j)^β,   W[i, i] = 0,

and each row of W keeps only its `neighbours` largest weights. A user's scores are their profile
row times W. α < 1 flattens the walk's transition probabilities, β > 0 lets less popular items
through.

W is computed a block of rows at a time, each block sparse and pruned before the next one, so the
memory held is the pruned W (items x neighbours) plus one block's unpruned product, bounded by
BLOCK_ENTRIES stored values (items whose own row exceeds it are computed alone).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from index_builder.dataset import Interactions

# Stored values of one block's unpruned product at most, unless a single item's row is longer (that
# row is then a block of its own). The product and its pruning hold about 40 bytes per value (data,
# indices, the sort's order and ranks), so ~170 MB. On the 1M-event shop (50,000 items) the fit
# peaked 215 MB above its input in 14 blocks and 11.7 s; at 1 << 24, 570 MB in 4 blocks and 15.4 s.
BLOCK_ENTRIES = 1 << 22
# W's stored weights at most (8 bytes each): neighbours per item are capped to MAX_WEIGHTS / items,
# e.g. 200 at 100,000 items. This, not the item count, is RP3beta's size limit.
MAX_WEIGHTS = 20_000_000


def capped(neighbours: int, n_items: int) -> int:
    """`neighbours` per item, or fewer where the catalog is so large W would exceed MAX_WEIGHTS."""
    return max(1, min(neighbours, MAX_WEIGHTS // max(n_items, 1)))


def _blocks(x: sp.csr_matrix) -> list[tuple[int, int]]:
    """Consecutive item ranges whose products stay within BLOCK_ENTRIES: item i's row of the
    unpruned product has at most min(items, Σ over i's users of their item counts) entries."""
    user_degree = np.diff(x.indptr).astype(np.int64)
    paths = np.asarray(x.T @ user_degree.astype(np.float64)).ravel()
    row_entries = np.minimum(paths, x.shape[1]).astype(np.int64)
    ranges: list[tuple[int, int]] = []
    start, held = 0, 0
    for item, entries in enumerate(row_entries.tolist()):
        if held + entries > BLOCK_ENTRIES and item > start:
            ranges.append((start, item))
            start, held = item, 0
        held += entries
    if start < x.shape[1]:
        ranges.append((start, x.shape[1]))
    return ranges


def _prune(block: sp.csr_matrix, neighbours: int) -> sp.csr_matrix:
    """Each row's `neighbours` largest values (ties: the lower column), the rest dropped."""
    block.sort_indices()
    counts = np.diff(block.indptr)
    if counts.max(initial=0) <= neighbours:
        return block
    rows = np.repeat(np.arange(block.shape[0]), counts)
    order = np.lexsort((-block.data, rows))  # by row, then largest first; stable for ties
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(block.indptr[:-1], counts)
    keep = rank < neighbours
    pruned = sp.csr_matrix(
        (block.data[keep], block.indices[keep], np.r_[0, np.cumsum(np.minimum(counts, neighbours))]),
        shape=block.shape,
    )
    return pruned


def fit(train: Interactions, alpha: float, beta: float, neighbours: int) -> sp.csr_matrix:
    """RP3beta's item x item weights W for `train` (float32, at most `neighbours` per row)."""
    x = train.seen_matrix().astype(np.float32)  # binary
    user_degree = np.diff(x.indptr).astype(np.float64)
    item_degree = np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
    # With X binary, P_ui^α = X / deg(u)^α and P_iu^α = Xᵀ / deg(i)^α: the walk's steps in scalings.
    user_step = sp.diags(np.where(user_degree > 0, user_degree, 1.0) ** -alpha) @ x
    discount = np.where(item_degree > 0, np.maximum(item_degree, 1.0) ** -beta, 0.0)
    item_scale = np.where(item_degree > 0, np.maximum(item_degree, 1.0) ** -alpha, 0.0)
    user_step = (user_step @ sp.diags(discount)).tocsr().astype(np.float32)
    by_item = x.T.tocsr()
    parts: list[sp.csr_matrix] = []
    for start, stop in _blocks(x):
        block = (sp.diags(item_scale[start:stop]) @ by_item[start:stop]).astype(np.float32) @ user_step
        block = block.tocsr()
        rows = np.repeat(np.arange(start, stop), np.diff(block.indptr))
        block.data[block.indices == rows] = 0.0  # W[i, i] = 0: a walk back to its start recommends nothing
        block.eliminate_zeros()
        parts.append(_prune(block, neighbours))
    weights = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, x.shape[1]), dtype=np.float32)
    return weights.astype(np.float32)


def scores(profile: sp.csr_matrix, weights: sp.csr_matrix) -> npt.NDArray[np.float32]:
    """Dense scores of profile rows (users x items) under W."""
    return np.asarray((profile.astype(np.float32) @ weights).toarray(), dtype=np.float32)

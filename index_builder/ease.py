"""EASE (Steck 2019): the closed-form linear item-item model, B = I - P diag(1/diag P) with
P = (XᵀX + λI)⁻¹ over the binary users x items matrix X; a user's scores are their row of X times B.

P is dense items x items, so the item count bounds where EASE fits. When there are fewer users
than items the same B follows from a users x users inverse (Woodbury):

    P = (I - Xᵀ K X) / λ,   K = (XXᵀ + λI)⁻¹,

so the dense work is min(users, items) squared in memory and cubed in time (MAX_DENSE). B itself
(items x items) is then made from it where the catalog is narrow enough (MAX_WEIGHTS_ITEMS), as
scoring through K X costs every user scored rows x items; wider catalogs are scored that way.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.linalg.lapack
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from index_builder.content import with_category_rows
from index_builder.dataset import Interactions

# The largest min(users, items) EASE is fitted for. Measured (docs/builder.md, "EASE"): n = 2,000
# takes 1.6 s of CPU and 126 MB at peak, n = 4,000 6.0 s and 278 MB; time grows with n³ and memory
# with n², so n = 5,000 is about 12 s and 400 MB per fit, and the tuner fits it up to 26 times
# (5 λ with and without visit rows, 3 category-row weights, each on 2 splits).
MAX_DENSE = 5_000
# With visit rows (`fit`'s visit_weight) X has a row per user and per visit, so the dense work is
# min(users + visits, items), and this limit is higher: ml-latest-small's tuning splits are about
# 6,750 (610 users, 6,150 visits; 9,742 items), a fit of 15-25 s.
VISITS_MAX_DENSE = 10_000
# With more rows than items, B (items x items) is computed whole when it is at most this many
# items wide (400 MB of float32 at 10,000; 800 MB of float64 while it is made); wider catalogs are
# scored through the rows' inverse, batch by batch, which costs rows x items per user scored.
MAX_WEIGHTS_ITEMS = 10_000


def fits(data: Interactions, *, visits: bool = False) -> bool:
    """Whether EASE (with visit rows: `visits`) is fitted for `data` (MAX_DENSE, VISITS_MAX_DENSE)."""
    if not visits:
        return min(data.n_users, data.n_items) <= MAX_DENSE
    visits_count = int(data.visit_matrix().shape[0])
    return min(data.n_users + visits_count, data.n_items) <= VISITS_MAX_DENSE


def _inverse(gram: npt.NDArray[np.float64], regularization: float) -> npt.NDArray[np.float64]:
    """(gram + λI)⁻¹ of a symmetric positive definite matrix, in place: LAPACK's Cholesky
    (potrf) and inverse from it (potri), a third of the work of solving against the identity."""
    gram[np.diag_indices_from(gram)] += regularization
    factor, info = scipy.linalg.lapack.dpotrf(gram, lower=False, overwrite_a=True, clean=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE gram matrix not positive definite (potrf info {info})")
    inverse, info = scipy.linalg.lapack.dpotri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE inverse failed (potri info {info})")
    full: npt.NDArray[np.float64] = inverse
    for start in range(0, len(full), 512):  # potri fills the upper triangle: mirror it, in place
        stop = start + 512
        full[start:stop, :start] = full[:start, start:stop].T
        block = np.triu(full[start:stop, start:stop])
        full[start:stop, start:stop] = block + np.triu(block, 1).T
    return full


Apply = Callable[[sp.csr_matrix], npt.NDArray[np.float32]]


def fit(
    train: Interactions,
    regularization: float,
    content: sp.csr_matrix | None = None,
    content_weight: float = 0.0,
    visit_weight: float = 0.0,
) -> Apply:
    """EASE fitted to `train`: a function from profile rows (users x items, sparse) to their
    scores, the rows times B (`item_models.scorer` applies it to a profile). With `content_weight`,
    `content`'s rows (categories x items, `content.category_rows`) times it join X below the users.
    With `visit_weight`, so do the visits' rows (`Interactions.visit_matrix`) times its square root,
    and λ is scaled by 1 + visit_weight (each item's count on XᵀX's diagonal is)."""
    x = train.seen_matrix().astype(np.float64)  # binary
    if visit_weight > 0:
        x = sp.vstack([x, np.sqrt(visit_weight) * train.visit_matrix()], format="csr", dtype=np.float64)
        regularization *= 1.0 + visit_weight
    if content_weight > 0:
        x = with_category_rows(x, content, content_weight)
    with threadpool_limits(2, "blas"):
        if train.n_items <= x.shape[0]:
            p = _inverse((x.T @ x).toarray(), regularization)
            return _rows_times(_weights(p))
        k = _inverse((x @ x.T).toarray(), regularization)
        kx = np.asarray(x.T @ k).T  # K X, rows x items (K is symmetric)
        del k
        if train.n_items <= MAX_WEIGHTS_ITEMS:
            return _rows_times(_weights_through_rows(x, kx))
    diag_p = (1.0 - np.asarray(x.multiply(kx).sum(axis=0)).ravel()) / regularization

    def apply(rows: sp.csr_matrix) -> npt.NDArray[np.float32]:
        dense = rows.toarray().astype(np.float64)
        rp = (dense - np.asarray((rows @ x.T) @ kx)) / regularization  # R P
        return np.asarray(dense - rp / diag_p, dtype=np.float32)  # R (I - P diag(1/diag P))

    return apply


def _weights(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """B = I - P diag(1/diag P) from P, in place, as float32 to halve what is kept (any positive
    multiple of P gives the same B)."""
    p /= -np.diag(p)
    p[np.diag_indices_from(p)] = 0.0
    return p.astype(np.float32)


def _weights_through_rows(x: sp.csr_matrix, kx: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """B from λP = I - XᵀKX, a block of columns at a time (the float64 P is never whole): far less
    work than the rows' share of it in every batch of every scoring."""
    n = x.shape[1]
    b = np.empty((n, n), dtype=np.float32)
    xt = x.T.tocsr()
    for start in range(0, n, 1024):
        stop = min(start + 1024, n)
        block = np.asarray(xt @ kx[:, start:stop])  # (XᵀKX)[:, start:stop]
        block *= -1.0
        columns = np.arange(stop - start)
        diagonal = (start + columns, columns)  # P's diagonal within the block
        block[diagonal] += 1.0
        block /= -block[diagonal]
        block[diagonal] = 0.0
        b[:, start:stop] = block
    return b


def _rows_times(b: npt.NDArray[np.float32]) -> Apply:
    return lambda rows: np.asarray(rows.astype(np.float32) @ b, dtype=np.float32)

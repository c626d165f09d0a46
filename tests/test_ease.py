"""EASE: the closed form, both ways of computing it, and its size limit."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from index_builder import ease, item_models
from index_builder.content import category_rows
from index_builder.dataset import Interactions
from index_builder.model import ModelParams


def random_interactions(n_users: int, n_items: int, seed: int) -> Interactions:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, n_users, 400).astype(np.int32)
    item = rng.integers(0, n_items, 400).astype(np.int32)
    return Interactions(user, item, np.ones(400, np.float32), np.arange(400, dtype=np.int64), n_users, n_items)


def reference(data: Interactions, regularization: float) -> np.ndarray:
    """Steck's formula, spelled out densely."""
    x = np.zeros((data.n_users, data.n_items))
    x[data.user, data.item] = 1.0
    p = np.linalg.inv(x.T @ x + regularization * np.eye(data.n_items))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b


def test_primal_and_dual_forms_equal_the_closed_form() -> None:
    for n_users, n_items in ((40, 70), (70, 40)):  # fewer users than items: the users x users inverse
        data = random_interactions(n_users, n_items, seed=n_users)
        b = reference(data, 20.0)
        profile = sp.random(n_users, n_items, density=0.1, random_state=1, format="csr")
        users = np.arange(n_users, dtype=np.int32)
        got = item_models.scorer(data, ModelParams(ease_regularization=20.0), profile)(users)
        np.testing.assert_allclose(got, profile.toarray() @ b, rtol=1e-4, atol=1e-5)


def test_category_rows_join_x_below_the_users_in_both_forms() -> None:
    for n_users, n_items in ((40, 70), (70, 40)):
        data = random_interactions(n_users, n_items, seed=n_users)
        content = category_rows([[f"k{item % 3}"] for item in range(n_items)])
        x = np.zeros((n_users, n_items))
        x[data.user, data.item] = 1.0
        x = np.vstack([x, 5.0 * content.toarray()])
        p = np.linalg.inv(x.T @ x + 20.0 * np.eye(n_items))
        b = -p / np.diag(p)
        np.fill_diagonal(b, 0.0)
        profile = sp.random(n_users, n_items, density=0.1, random_state=1, format="csr")
        params = ModelParams(ease_regularization=20.0, ease_content_weight=5.0)
        got = item_models.scorer(data, params, profile, content)(np.arange(n_users, dtype=np.int32))
        np.testing.assert_allclose(got, profile.toarray() @ b, rtol=1e-4, atol=1e-5)


def test_the_size_limit_is_on_the_smaller_side() -> None:
    assert ease.fits(random_interactions(ease.MAX_DENSE, ease.MAX_DENSE * 10, seed=0))
    assert not ease.fits(random_interactions(ease.MAX_DENSE + 1, ease.MAX_DENSE + 1, seed=0))

"""EASE: the closed form, both ways of computing it, and its size limit."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from index_builder import ease, item_models
from index_builder.content import category_rows
from index_builder.dataset import VISIT_EVENTS, VISIT_GAP_S, Interactions
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


@pytest.mark.parametrize("weights_items", [ease.MAX_WEIGHTS_ITEMS, 0])
def test_primal_and_dual_forms_equal_the_closed_form(monkeypatch: pytest.MonkeyPatch, weights_items: int) -> None:
    # Fewer users than items: the users x users inverse, B then made whole or (catalogs wider than
    # MAX_WEIGHTS_ITEMS) applied batch by batch through it.
    monkeypatch.setattr(ease, "MAX_WEIGHTS_ITEMS", weights_items)
    for n_users, n_items in ((40, 70), (70, 40)):
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


def test_a_visit_is_a_users_events_at_most_the_gap_apart_and_at_most_so_many() -> None:
    gap, most = VISIT_GAP_S, VISIT_EVENTS
    # user 0: two events, then a pause longer than the gap, then one; user 1: a sitting longer
    # than VISIT_EVENTS; listed out of time order, as logs may be
    ts = [gap + 11, 0, 10, *(k * 60 for k in range(most + 2))]
    user = [0, 0, 0, *([1] * (most + 2))]
    item = [2, 0, 1, *(k % 5 for k in range(most + 2))]
    data = Interactions(
        np.array(user, np.int32), np.array(item, np.int32), np.ones(len(ts), np.float32), np.array(ts, np.int64), 2, 5
    )
    visits = data.visit_matrix().toarray()
    expected = np.zeros((4, 5))
    expected[0, [0, 1]] = 1.0  # user 0's first two events
    expected[1, 2] = 1.0  # after the pause
    expected[2, :] = 1.0  # user 1's first VISIT_EVENTS events (items 0-4, each several times: binary)
    expected[3, [most % 5, (most + 1) % 5]] = 1.0  # the rest of the sitting
    np.testing.assert_array_equal(visits, expected)


def test_visit_rows_join_x_scaled_by_the_root_of_their_weight_and_scale_lambda() -> None:
    for n_users, n_items in ((40, 70), (70, 40)):  # both forms: items x items and the Woodbury one
        rng = np.random.default_rng(n_users)
        data = random_interactions(n_users, n_items, seed=n_users)
        data = Interactions(data.user, data.item, data.weight, rng.integers(0, 20_000, len(data)), n_users, n_items)
        x = np.zeros((n_users, n_items))
        x[data.user, data.item] = 1.0
        v = data.visit_matrix().toarray()
        assert 0 < len(v) < len(data)  # some visits hold several events
        p = np.linalg.inv(x.T @ x + 3.0 * v.T @ v + 20.0 * 4.0 * np.eye(n_items))
        b = -p / np.diag(p)
        np.fill_diagonal(b, 0.0)
        profile = sp.random(n_users, n_items, density=0.1, random_state=1, format="csr")
        params = ModelParams(ease_regularization=20.0, ease_visit_weight=3.0)
        got = item_models.scorer(data, params, profile)(np.arange(n_users, dtype=np.int32))
        np.testing.assert_allclose(got, profile.toarray() @ b, rtol=1e-4, atol=1e-5)


def test_the_size_limit_with_visits_counts_the_visit_rows() -> None:
    n_users, n_events, n_items = 4_000, 7_000, ease.VISITS_MAX_DENSE + 1
    rng = np.random.default_rng(0)
    user = rng.integers(0, n_users, n_events).astype(np.int32)
    item = rng.integers(0, n_items, n_events).astype(np.int32)
    apart = np.arange(n_events, dtype=np.int64) * (VISIT_GAP_S + 1)  # every event a visit of its own
    data = Interactions(user, item, np.ones(n_events, np.float32), apart, n_users, n_items)
    assert n_users + data.visit_matrix().shape[0] > ease.VISITS_MAX_DENSE
    assert ease.fits(data) and not ease.fits(data, visits=True)
    together = Interactions(user, item, data.weight, np.zeros(n_events, np.int64), n_users, n_items)
    assert ease.fits(together, visits=True)  # one sitting per user, cut into visits of VISIT_EVENTS

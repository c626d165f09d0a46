"""EASE: the closed form, both ways of computing it, and the pools the builder ships from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from gateway.snapshot import load
from index_builder import ease, snapshot
from index_builder.build import BuildConfig, read_inputs
from index_builder.dataset import Interactions
from index_builder.evaluate import top_k_unseen
from index_builder.train import profile_matrix
from tailor.cli import main


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
        got = ease.ease_scorer(data, 20.0, profile)(users)
        np.testing.assert_allclose(got, profile.toarray() @ b, rtol=1e-4, atol=1e-5)


def test_pools_are_each_users_best_unseen_items_by_ease() -> None:
    data = random_interactions(30, 25, seed=3)
    scorer = ease.ease_scorer(data, 5.0)
    seen = data.seen_matrix().tocsr()
    users = np.array([0, 4, 9], dtype=np.int32)
    rows, scores = ease.pools(scorer, seen, users, size=30)  # more than the catalog: -inf fillers
    expected = top_k_unseen(scorer(users), seen[users], 25)
    np.testing.assert_array_equal(rows, expected)
    for at, user in enumerate(users.tolist()):
        already = set(seen[user].indices.tolist())
        finite = np.isfinite(scores[at])
        assert set(rows[at][~finite].tolist()) == already
        assert not already & set(rows[at][finite].tolist())
        assert np.all(np.diff(scores[at][finite]) <= 0)


def test_the_size_limit_is_on_the_smaller_side() -> None:
    assert ease.fits(random_interactions(ease.MAX_DENSE, ease.MAX_DENSE * 10, seed=0))
    assert not ease.fits(random_interactions(ease.MAX_DENSE + 1, ease.MAX_DENSE + 1, seed=0))


def test_a_build_that_chose_ease_serves_known_users_eases_own_lists(tmp_path: Path) -> None:
    shop, root = tmp_path / "shop", tmp_path / "snapshots"
    synth = ["synth", "--out", str(shop), "--users", "200", "--items", "300", "--events", "6000", "--seed", "5"]
    assert main(synth) == 0
    events, items = shop / "events.csv", shop / "items.jsonl"
    build = ["build", "--events", str(events), "--items", str(items), "--out", str(root), "--quiet"]
    assert main([*build, "--max-trials", "2", "--item-model", "ease", "--force"]) == 0
    snap = load(root / str(snapshot.current_version(root)))
    params = snap.params
    assert params.ease_regularization > 0
    trials = snapshot.load_manifest(root / str(snapshot.current_version(root))).metrics["tuning"]["trials"]
    assert {trial["split"] for trial in trials if trial["params"]["ease_regularization"] > 0} == {"temporal", "random"}

    data, _, user_ids, _, _ = read_inputs(BuildConfig(events=[events], items=items), lambda _: None)
    scorer = ease.ease_scorer(data, params.ease_regularization, profile_matrix(data, params))
    users = np.array([0, 7, 123], dtype=np.int32)
    offline = top_k_unseen(scorer(users), data.seen_matrix().tocsr()[users], 10)
    for at, user in enumerate(users.tolist()):
        served = snap.precomputed(snap.user_row[user_ids[user]], 10)
        assert served is not None
        assert served[0].tolist() == offline[at].tolist()

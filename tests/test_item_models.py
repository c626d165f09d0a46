"""The pooled item models (EASE, RP3beta): the pools the builder ships from them, and builds that
serve known users those lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.snapshot import load
from index_builder import item_models, snapshot
from index_builder.build import BuildConfig, read_inputs
from index_builder.content import category_rows
from index_builder.dataset import Interactions
from index_builder.evaluate import top_k_unseen
from index_builder.model import ModelParams
from index_builder.train import profile_matrix
from tailor.cli import main


def random_interactions(n_users: int, n_items: int, seed: int) -> Interactions:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, n_users, 400).astype(np.int32)
    item = rng.integers(0, n_items, 400).astype(np.int32)
    return Interactions(user, item, np.ones(400, np.float32), np.arange(400, dtype=np.int64), n_users, n_items)


@pytest.mark.parametrize(
    "params", [ModelParams(ease_regularization=5.0), ModelParams(rp3_alpha=0.5, rp3_beta=0.2, rp3_neighbours=10)]
)
def test_pools_are_each_users_best_unseen_items_by_the_model(params: ModelParams) -> None:
    data = random_interactions(30, 25, seed=3)
    scorer = item_models.scorer(data, params)
    seen = data.seen_matrix().tocsr()
    users = np.array([0, 4, 9], dtype=np.int32)
    rows, scores = item_models.pools(scorer, seen, users, size=30)  # more than the catalog: -inf fillers
    expected = top_k_unseen(scorer(users), seen[users], 25)
    np.testing.assert_array_equal(rows, expected)
    for at, user in enumerate(users.tolist()):
        already = set(seen[user].indices.tolist())
        finite = np.isfinite(scores[at])
        assert set(rows[at][~finite].tolist()) == already
        assert not already & set(rows[at][finite].tolist())
        assert np.all(np.diff(scores[at][finite]) <= 0)


@pytest.mark.parametrize("model", ["ease", "rp3"])
def test_a_build_that_chose_a_pooled_model_serves_known_users_its_own_lists(tmp_path: Path, model: str) -> None:
    shop, root = tmp_path / "shop", tmp_path / "snapshots"
    synth = ["synth", "--out", str(shop), "--users", "200", "--items", "300", "--events", "6000", "--seed", "5"]
    assert main(synth) == 0
    events, items = shop / "events.csv", shop / "items.jsonl"
    build = ["build", "--events", str(events), "--items", str(items), "--out", str(root), "--quiet"]
    assert main([*build, "--max-trials", "2", "--item-model", model, "--force"]) == 0
    snap = load(root / str(snapshot.current_version(root)))
    params = snap.params
    assert item_models.chosen(params) == model
    trials = snapshot.load_manifest(root / str(snapshot.current_version(root))).metrics["tuning"]["trials"]
    chosen_trials = [t for t in trials if item_models.chosen(ModelParams(**t["params"])) == model]
    assert {trial["split"] for trial in chosen_trials} == {"temporal", "random"}
    assert all(item_models.chosen(ModelParams(**t["params"])) in {"als", model} for t in trials)  # pinned: no other

    data, catalog, user_ids, _, _ = read_inputs(BuildConfig(events=[events], items=items), lambda _: None)
    content = category_rows([item.categories for item in catalog])  # EASE's rows, if the tuner chose them
    scorer = item_models.scorer(data, params, profile_matrix(data, params), content)
    users = np.array([0, 7, 123], dtype=np.int32)
    offline = top_k_unseen(scorer(users), data.seen_matrix().tocsr()[users], 10)
    for at, user in enumerate(users.tolist()):
        served = snap.precomputed(snap.user_row[user_ids[user]], 10)
        assert served is not None
        assert served[0].tolist() == offline[at].tolist()

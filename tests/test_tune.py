"""The builder's tuner: two validation splits, every trial recorded, expert pins respected."""

from __future__ import annotations

import numpy as np
import pytest

from index_builder import ease, item_models
from index_builder.content import category_rows
from index_builder.dataset import Interactions
from index_builder.model import ModelParams
from index_builder.train import (
    CONTENT_WEIGHTS,
    EASE_CONTENT_WEIGHTS,
    EASE_REGULARIZATION,
    EASE_VISIT_WEIGHTS,
    RP3_GRID,
    Pins,
    Trial,
    tune,
    user_models,
)


def taste_and_intent(n_users: int = 80, n_items: int = 60, seed: int = 2) -> Interactions:
    """Users keep one lasting cluster of items and drift into a second one late in their history."""
    rng = np.random.default_rng(seed)
    user, item, ts = [], [], []
    for u in range(n_users):
        home, late = u % 6, (u + 1 + u // 6) % 6
        picks = [*rng.choice(10, 8, replace=False) + 10 * home, *rng.choice(10, 4, replace=False) + 10 * late]
        user += [u] * len(picks)
        item += picks
        ts += list(range(100 * u, 100 * u + len(picks)))
    return Interactions(
        np.array(user, np.int32),
        np.array(item, np.int32),
        np.ones(len(user), np.float32),
        np.array(ts, np.int64),
        n_users,
        n_items,
    )


def test_every_configuration_is_scored_on_both_splits_and_the_choice_is_the_best_on_both() -> None:
    result = tune(taste_and_intent(), max_trials=4, iterations=5)
    by_split: dict[str, dict[ModelParams, float]] = {"temporal": {}, "random": {}}
    for trial in result.trials:
        by_split[trial.split][trial.params] = trial.ndcg_at_10
    assert by_split["temporal"].keys() == by_split["random"].keys()
    assert len(by_split["temporal"]) >= len(user_models(Pins()))

    def plain_best(split: str) -> float:
        plain = [
            score
            for params, score in by_split[split].items()
            if params.half_life_events == 0 and item_models.chosen(params) == "als"
        ]
        return max(plain)

    def worse_ratio(params: ModelParams) -> float:
        return min(by_split[split][params] / plain_best(split) for split in by_split)

    assert worse_ratio(result.best) == max(worse_ratio(params) for params in by_split["temporal"])
    assert result.ratios == {split: by_split[split][result.best] / plain_best(split) for split in by_split}
    assert {trial.params.half_life_events for trial in result.trials} == {0.0, 2.0, 5.0, 15.0}
    assert {trial.params.ease_regularization for trial in result.trials} == {0.0, *EASE_REGULARIZATION}
    assert "rp3" not in {item_models.chosen(trial.params) for trial in result.trials}  # only when pinned
    assert {trial.params.long_term_share for trial in result.trials} == {0.0, 0.1, 0.2, 0.5}


def test_pinned_choices_are_kept_and_the_rest_is_tuned() -> None:
    pins = Pins(factors=8, half_life_events=5.0, item_model="als")
    result = tune(taste_and_intent(), max_trials=4, iterations=5, pins=pins)
    assert result.best.factors == 8 and result.best.half_life_events == 5.0
    assert {trial.params.factors for trial in result.trials} == {8}
    assert {trial.params.half_life_events for trial in result.trials} == {5.0}
    assert len({trial.params.long_term_share for trial in result.trials}) > 1
    assert {item_models.chosen(trial.params) for trial in result.trials} == {"als"}


def test_a_pinned_item_model_is_chosen_and_no_other_is_tried() -> None:
    result = tune(taste_and_intent(), max_trials=2, iterations=5, pins=Pins(item_model="rp3"))
    assert item_models.chosen(result.best) == "rp3"
    assert {item_models.chosen(trial.params) for trial in result.trials} == {"als", "rp3"}
    rp3_trials = [trial for trial in result.trials if item_models.chosen(trial.params) == "rp3"]
    settings = {(t.params.rp3_alpha, t.params.rp3_beta, t.params.rp3_neighbours) for t in rp3_trials}
    assert settings == set(RP3_GRID)
    assert {trial.split for trial in rp3_trials} == {"temporal", "random"}
    assert result.best in {trial.params for trial in rp3_trials}


def test_the_trial_budget_counts_one_als_fit_per_split() -> None:
    result = tune(taste_and_intent(), max_trials=2, iterations=5)
    assert len({(t.params.factors, t.params.regularization, t.params.alpha) for t in result.trials}) == 1


def test_category_rows_are_tried_at_each_weight_on_both_splits_when_the_catalog_has_categories() -> None:
    data = taste_and_intent()
    plain = tune(data, max_trials=2, iterations=5)
    assert {trial.params.content_weight for trial in plain.trials} == {0.0}
    content = category_rows([[f"cluster{item // 10}"] for item in range(data.n_items)])
    result = tune(data, max_trials=2, iterations=5, content=content)
    weighted = [trial for trial in result.trials if trial.params.content_weight > 0]
    assert {(t.params.content_weight, t.split) for t in weighted} == {
        (weight, split) for weight in CONTENT_WEIGHTS for split in ("temporal", "random")
    }
    assert result.best.content_weight in {0.0, *CONTENT_WEIGHTS}
    eased = [trial for trial in result.trials if trial.params.ease_content_weight > 0]
    assert {(t.params.ease_content_weight, t.split) for t in eased} == {
        (weight, split) for weight in EASE_CONTENT_WEIGHTS for split in ("temporal", "random")
    }
    assert {trial.params.ease_content_weight for trial in plain.trials} == {0.0}
    pinned = tune(data, max_trials=2, iterations=5, content=content, pins=Pins(content_weight=8.0, item_model="als"))
    assert pinned.best.content_weight == 8.0


def test_category_rows_are_not_tried_where_not_allowed_unless_pinned() -> None:
    data = taste_and_intent()
    content = category_rows([[f"cluster{item // 10}"] for item in range(data.n_items)])
    result = tune(data, max_trials=2, iterations=5, content=content, content_allowed=False)
    assert {trial.params.content_weight for trial in result.trials} == {0.0}
    assert result.best.content_weight == 0.0
    pins = Pins(content_weight=8.0, item_model="als")
    pinned = tune(data, max_trials=2, iterations=5, content=content, content_allowed=False, pins=pins)
    assert pinned.best.content_weight == 8.0


def test_an_expert_can_pin_eases_regularization_and_category_rows() -> None:
    data = taste_and_intent()
    content = category_rows([[f"cluster{item // 10}"] for item in range(data.n_items)])
    pins = Pins(item_model="ease", ease_regularization=77.0, ease_content_weight=50.0)
    result = tune(data, max_trials=2, iterations=5, content=content, pins=pins)
    assert result.best.ease_regularization == 77.0
    assert result.best.ease_content_weight == 50.0
    eased = [trial for trial in result.trials if item_models.chosen(trial.params) == "ease"]
    assert {trial.params.ease_regularization for trial in eased} == {77.0}
    assert {trial.params.ease_content_weight for trial in eased} == {0.0, 50.0}
    unweighted = tune(
        data, max_trials=2, iterations=5, content=content, pins=Pins(item_model="ease", ease_content_weight=0)
    )
    assert {trial.params.ease_content_weight for trial in unweighted.trials} == {0.0}
    assert unweighted.best.ease_regularization in EASE_REGULARIZATION


def test_every_lambda_with_and_without_visit_rows_meets_every_user_model_and_pins_hold() -> None:
    data = taste_and_intent()
    result = tune(data, max_trials=2, iterations=5)
    visited = [trial for trial in result.trials if trial.params.ease_visit_weight > 0]
    assert {(t.params.ease_regularization, t.params.ease_visit_weight, t.split) for t in visited} == {
        (value, weight, split)
        for value in EASE_REGULARIZATION
        for weight in EASE_VISIT_WEIGHTS
        for split in ("temporal", "random")
    }
    assert result.best.ease_visit_weight in {0.0, *EASE_VISIT_WEIGHTS}

    # every λ, with and without the rows, is scored with every user model on both splits: the
    # neutral profile does not pick λ for the others
    def setting(trial: Trial) -> tuple[float, float, float, float, str]:
        p = trial.params
        return p.ease_regularization, p.ease_visit_weight, p.half_life_events, p.long_term_share, trial.split

    eased = [t for t in result.trials if t.params.ease_regularization > 0 and t.params.ease_content_weight == 0]
    scored = {setting(trial) for trial in eased}
    assert scored == {
        (value, weight, half_life, share, split)
        for value in EASE_REGULARIZATION
        for weight in (0.0, *EASE_VISIT_WEIGHTS)
        for half_life, share in user_models(Pins())
        for split in ("temporal", "random")
    }
    pinned = tune(data, max_trials=2, iterations=5, pins=Pins(item_model="ease", ease_visit_weight=3.0))
    assert pinned.best.ease_visit_weight == 3.0
    assert {t.params.ease_visit_weight for t in pinned.trials if item_models.chosen(t.params) == "ease"} == {3.0}
    none = tune(data, max_trials=2, iterations=5, pins=Pins(item_model="ease", ease_visit_weight=0))
    assert {trial.params.ease_visit_weight for trial in none.trials} == {0.0}


def test_a_pinned_visit_weight_that_does_not_fit_is_dropped_and_said(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ease, "VISITS_MAX_DENSE", 0)
    said: list[str] = []
    pins = Pins(item_model="ease", ease_visit_weight=2.0)
    result = tune(taste_and_intent(), max_trials=2, iterations=5, pins=pins, progress=said.append)
    assert {trial.params.ease_visit_weight for trial in result.trials} == {0.0}
    assert any("visit rows do not fit" in line for line in said)


def test_visit_rows_are_not_tried_where_the_data_to_be_fitted_has_too_many() -> None:
    # the build's whole data can hold more visits than the tuning input: it says so
    result = tune(taste_and_intent(), max_trials=2, iterations=5, pins=Pins(item_model="ease"), visits_allowed=False)
    eased = [trial for trial in result.trials if item_models.chosen(trial.params) == "ease"]
    assert eased and {trial.params.ease_visit_weight for trial in eased} == {0.0}

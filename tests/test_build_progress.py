"""The build's progress: the estimate of the time left (the time its steps took so far, scaled by
what the remaining steps weigh against the finished ones; tuning's time left out), and long fits
telling how far they got."""

from __future__ import annotations

import numpy as np
import pytest

from index_builder import build, train
from index_builder.dataset import Interactions
from index_builder.model import ModelParams


def test_time_left_scales_the_time_spent_by_the_remaining_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.0, 40.0, 60.0])  # made, then one reading per step
    monkeypatch.setattr(build, "STEP_SHARES", {"read": 0.4, "evaluate": 0.2, "write": 0.4})
    left = build.TimeLeft(clock=lambda: next(clock))
    assert left("read") == ""  # nothing done yet: nothing to scale
    assert left("evaluate") == " (about 60s left)"  # 40 s for 0.4 of the work: 0.6 of it takes 60 s more
    assert left("write") == " (about 40s left)"  # 60 s for 0.6: 0.4 more takes 40 s


def test_tuning_time_counts_for_no_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    # read 40 s, tuning 1,000 s, evaluate 20 s: only the 60 s of read and evaluate are scaled
    clock = iter([0.0, 0.0, 40.0, 1040.0, 1060.0])
    monkeypatch.setattr(build, "STEP_SHARES", {"read": 0.4, "evaluate": 0.2, "write": 0.4})
    left = build.TimeLeft(clock=lambda: next(clock))
    assert left("read") == ""
    assert left(None) == ""  # tuning: no estimate can be made of it
    assert left("evaluate") == " (about 60s left)"  # 40 s for 0.4, as if tuning had not been
    assert left("write") == " (about 40s left)"


def test_no_estimate_rests_on_a_few_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.0, 1.0, 2.0])  # a small file read in a second
    monkeypatch.setattr(build, "STEP_SHARES", {"read": 0.1, "evaluate": 0.2, "write": 0.7})
    left = build.TimeLeft(clock=lambda: next(clock))
    assert left("read") == ""
    assert left("evaluate") == ""  # 1 s of evidence would say 9 s: too little to go on
    assert left("write") == ""  # 2 s


def test_every_step_the_build_announces_has_a_share() -> None:
    assert sum(build.STEP_SHARES.values()) == pytest.approx(1.0)


def test_a_long_fit_tells_its_iterations_and_the_time_to_go() -> None:
    said: list[str] = []
    clock = iter([0.0, 4.0, 12.0, 16.0, 30.0, 40.0])  # made, then one reading per iteration
    report = train.iteration_progress(ModelParams(iterations=5), said.append, clock=lambda: next(clock))
    for iteration in range(5):
        report(iteration, 0.0, 0.0)
    # 10 s apart at least, and nothing after the last iteration (the step's next line follows)
    assert said == [
        "ALS: iteration 2/5 (12s, about 18s to go)",
        "ALS: iteration 4/5 (30s, about 8s to go)",
    ]


def test_the_fits_of_the_build_report_through_implicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train, "ITERATION_PROGRESS_S", 0.0)
    rng = np.random.default_rng(0)
    data = Interactions(
        rng.integers(0, 30, 400, dtype=np.int32),
        rng.integers(0, 40, 400, dtype=np.int32),
        np.ones(400, np.float32),
        np.arange(400, dtype=np.int64),
        30,
        40,
    )
    said: list[str] = []
    train.fit_item_vectors(data, ModelParams(factors=8, iterations=3), progress=said.append)
    assert [line.split(" (")[0] for line in said] == ["ALS: iteration 1/3", "ALS: iteration 2/3"]

"""The build's estimate of the time left: the time its steps took so far, scaled by what the
remaining steps weigh against the finished ones; tuning's time is left out."""

from __future__ import annotations

import pytest

from index_builder import build


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

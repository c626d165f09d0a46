"""The build's estimate of the time left: the time spent so far, scaled by what the remaining steps
weigh against the finished ones."""

from __future__ import annotations

import pytest

from index_builder import build


def test_time_left_scales_the_time_spent_by_the_remaining_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.0, 40.0, 60.0])  # made, then one reading per step
    monkeypatch.setattr(build, "STEP_SHARES", {"read": 0.4, "tune": 0.2, "write": 0.4})
    left = build.TimeLeft(clock=lambda: next(clock))
    assert left("read") == ""  # nothing done yet: nothing to scale
    assert left("tune") == " (about 60s left)"  # 40 s for 0.4 of the work: 0.6 of it takes 60 s more
    assert left("write") == " (about 40s left)"  # 60 s for 0.6: 0.4 more takes 40 s


def test_every_step_the_build_announces_has_a_share() -> None:
    assert sum(build.STEP_SHARES.values()) == pytest.approx(1.0)

"""The benchmark tools that have no wrk or second process run on the small shop."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests import rules_in_process


def assert_timed_runs(capsys: pytest.CaptureFixture[str], labels: list[str]) -> None:
    """The tool printed one line per run, labelled in this order, each with every kind of visitor."""
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(tuple(labels))]
    assert [line.split()[0] for line in lines] == labels
    for line in lines:
        for kind in ("known p50", "new p50", "unknown p50", "all p99"):
            assert kind in line


def test_rules_in_process_times_every_kind_of_visitor_with_and_without_rules(
    small_snapshots: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = rules_in_process.main(
        ["--snapshots", str(small_snapshots), "--calls", "60", "--rounds", "1", "--visitors", "40"]
    )
    assert code == 0
    assert_timed_runs(capsys, ["none", "rules"])


def test_rules_in_process_compares_the_compiled_answer_with_the_steps(
    small_snapshots: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--snapshots", str(small_snapshots), "--paths", "--calls", "60", "--rounds", "1", "--evict", "0.5"]
    code = rules_in_process.main([*args, "--visitors", "40", "--warmup", "30"])
    assert code == 0
    assert_timed_runs(capsys, ["steps", "placed"])

"""The benchmark tools that have no wrk or second process run on the small shop."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from loadtests import bench_rules, bench_workers, rules_in_process, serve_probe


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
        ["--snapshots", str(small_snapshots), "--calls", "60", "--rounds", "1", "--visitors", "40", "--evict", "0.5"]
    )
    assert code == 0
    assert_timed_runs(capsys, ["none", "rules"])


def test_rules_benchmark_runs_each_side_twice_in_abba_order_and_averages_them() -> None:
    assert bench_rules.sides("paced") == ["none_paced_1", "rules_paced_1", "rules_paced_2", "none_paced_2"]

    def run(rate: float, p50: float, p99: float) -> dict[str, object]:
        return {"rate": rate, "latency_ms": {"p50": p50, "p99": p99}}

    runs = {
        "none_full_1": run(1000, 9, 20),
        "rules_full_1": run(800, 11, 30),
        "rules_full_2": run(700, 12, 30),
        "none_full_2": run(900, 9, 20),
        "none_paced_1": run(400, 1.0, 3.0),
        "rules_paced_1": run(400, 1.1, 3.3),
        "rules_paced_2": run(400, 1.5, 4.5),
        "none_paced_2": run(400, 1.0, 3.0),
    }
    ratios = bench_rules.ratios(runs)
    assert ratios["throughput_none_over_rules"] == round(950 / 750, 3)
    assert ratios["p50_rules_over_none_paced"] == 1.3  # (1.1 + 1.5) / 2 against (1.0 + 1.0) / 2
    assert ratios["p99_rules_over_none_paced"] == 1.3
    assert ratios["p50_rules_over_none_paced_pairs"] == [1.1, 1.5]


def test_rules_benchmark_repeats_abba_for_more_pairs_and_averages_all_of_them() -> None:
    assert bench_rules.sides("full", 4) == [
        "none_full_1",
        "rules_full_1",
        "rules_full_2",
        "none_full_2",
        "none_full_3",
        "rules_full_3",
        "rules_full_4",
        "none_full_4",
    ]
    runs = {
        f"{side}_{kind}_{k}": {"rate": 1000 if side == "none" else 500, "latency_ms": {"p50": p50, "p99": 2 * p50}}
        for kind in ("full", "paced")
        for k, (none_p50, rules_p50) in enumerate([(1.0, 1.2), (1.0, 1.0), (2.0, 2.0), (1.0, 1.8)], start=1)
        for side, p50 in (("none", none_p50), ("rules", rules_p50))
    }
    ratios = bench_rules.ratios(runs, 4)
    assert ratios["throughput_none_over_rules"] == 2.0
    assert ratios["p50_rules_over_none_paced"] == 1.2  # 6.0 / 4 against 5.0 / 4
    assert ratios["p50_rules_over_none_paced_pairs"] == [1.2, 1.0, 1.0, 1.8]


def test_workers_benchmark_compares_the_mean_rate_of_each_worker_count_with_one_worker() -> None:
    runs = [{"workers": w, "rate": r} for w, r in ((1, 1000.0), (2, 1800.0), (2, 1600.0), (1, 1000.0))]
    result = bench_workers.summary(runs)
    assert result["mean_rate"] == {"1": 1000.0, "2": 1700.0}
    assert result["ratio"] == {"2_vs_1": 1.7}
    assert result["bar"] == {"2 workers >= 1.7x 1": True}
    short = bench_workers.summary([{"workers": w, "rate": r} for w, r in ((1, 1000.0), (2, 1600.0))])
    assert short["bar"] == {"2 workers >= 1.7x 1": False}


def test_workers_benchmark_order_needs_one_worker_and_another_count() -> None:
    assert bench_workers.parse_order("1,2,2,1") == [1, 2, 2, 1]
    for bad in ("2,2", "1,1", "0,1", "1,x"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_workers.parse_order(bad)


def test_serve_probe_summarises_only_the_samples_of_the_run_by_kind_and_phase() -> None:
    samples: serve_probe.Samples = {
        "lag": [[0.5, 0.050], [1.0, 0.001], [1.5, 0.003]],
        "req": [[0.5, "/v1/recommend", "live", 9.0]]
        + [[1.0 + i / 1000, "/v1/recommend", "snapshot", 0.001] for i in range(98)]
        + [[1.2, "/v1/recommend", "live", 0.020], [1.3, "/v1/recommend", "live", 0.030]],
        "offload": [[1.2, 0.010, 0.002, 0.001, 0.004], [3.0, 1.0, 1.0, 1.0, 1.0]],
        "gc": [[1.1, 0, 0.008], [1.4, 1, 0.001], [2.5, 2, 0.5]],
    }
    summary = serve_probe.summarise(samples, 1.0, 2.0)
    assert summary["loop_lag_ms"] == {"n": 2, "p50": 2.0, "p99": 2.98, "max": 3.0}
    assert summary["request_ms_by_kind"]["live"]["n"] == 2
    assert summary["request_ms_by_kind"]["snapshot"]["n"] == 98
    assert summary["slowest_1pct_by_kind"] == {"live": 1}
    assert summary["offloaded_ms"]["n"] == 1
    assert summary["offloaded_ms"]["wait_for_thread"] == {"p50": 10.0, "p99": 10.0}
    assert summary["offloaded_ms"]["wait_for_loop"] == {"p50": 4.0, "p99": 4.0}
    assert summary["gc"] == {"collections": 2, "over_5ms": 1, "max_ms": 8.0}

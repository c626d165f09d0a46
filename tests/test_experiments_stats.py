"""The statistics of experiment reports, proven by simulation: with no true difference the tests
say 'significant' about as often as alpha promises, an injected uplift is found with the power the
sample size was computed for, intervals cover the truth at their nominal rate, Holm keeps the
family-wise error within alpha, and a broken split is flagged. Degenerate data gives nulls and
notes, never an exception."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
from scipy import stats

from gateway.experiments.stats import (
    REVENUE_PER_VISITOR,
    Comparison,
    Report,
    VariantData,
    holm,
    report,
    required_sample_size,
    sample_ratio_mismatch,
)

ALPHA = 0.05
SPEND_MU, SPEND_SIGMA = 3.0, 1.0  # a buyer's spend is lognormal: skewed, like real baskets
MEAN_SPEND = math.exp(SPEND_MU + SPEND_SIGMA**2 / 2)


def simulated_arm(
    rng: np.random.Generator, name: str, visitors: int, rates: dict[str, float], weight: float = 0.5
) -> VariantData:
    """One arm's running totals from synthetic traffic. Buyers are the 'purchase' converters and
    each spends a lognormal amount; everyone else contributes zero revenue."""
    conversions = {metric: int(rng.binomial(visitors, rate)) for metric, rate in rates.items()}
    spends = rng.lognormal(SPEND_MU, SPEND_SIGMA, conversions.get("purchase", 0))
    return VariantData(
        name=name,
        weight=weight,
        exposures=visitors,
        conversions=conversions,
        revenue_sum=float(spends.sum()),
        revenue_sum_squares=float((spends**2).sum()),
    )


def plausible_counts(trials: int, probability: float) -> tuple[float, float]:
    """The central 99.9% of Binomial(trials, probability): a seeded simulation whose count of
    events falls outside it disagrees with `probability`, not with bad luck."""
    low, high = stats.binom.interval(0.999, trials, probability)
    return float(low), float(high)


def comparison(result: Report, metric: str, variant: str = "B") -> Comparison:
    return next(c for c in result.comparisons if c.metric == metric and c.variant == variant)


def estimate_of(result: Report, variant: str, metric: str) -> tuple[float | None, float | None, float | None]:
    row = next(row for row in result.variants if row.name == variant)
    found = next(estimate for estimate in row.estimates if estimate.metric == metric)
    return found.value, found.ci_low, found.ci_high


def aa_reports(experiments: int, visitors: int, seed: int) -> list[Report]:
    rng = np.random.default_rng(seed)
    rates = {"purchase": 0.10}
    return [
        report(
            [simulated_arm(rng, "A", visitors, rates), simulated_arm(rng, "B", visitors, rates)],
            control="A",
            metrics=["purchase"],
        )
        for _ in range(experiments)
    ]


@pytest.fixture(scope="module")
def aa_simulation() -> list[Report]:
    return aa_reports(experiments=1000, visitors=2000, seed=11)


def test_rate_test_false_positive_rate_is_alpha_without_a_true_difference(aa_simulation: list[Report]) -> None:
    p_values = [comparison(result, "purchase").p_value for result in aa_simulation]
    false_positives = sum(p is not None and p < ALPHA for p in p_values)
    low, high = plausible_counts(len(aa_simulation), ALPHA)
    assert low <= false_positives <= high, f"false-positive rate {false_positives / len(aa_simulation):.3f}"


def test_revenue_test_false_positive_rate_is_alpha_without_a_true_difference(aa_simulation: list[Report]) -> None:
    p_values = [comparison(result, REVENUE_PER_VISITOR).p_value for result in aa_simulation]
    false_positives = sum(p is not None and p < ALPHA for p in p_values)
    low, high = plausible_counts(len(aa_simulation), ALPHA)
    assert low <= false_positives <= high, f"false-positive rate {false_positives / len(aa_simulation):.3f}"


def test_an_uplift_is_detected_with_the_power_the_sample_size_was_computed_for() -> None:
    power = 0.9
    visitors = required_sample_size(0.10, 0.02, alpha=ALPHA, power=power)
    rng = np.random.default_rng(12)
    experiments = 500
    detected = 0
    for _ in range(experiments):
        control = simulated_arm(rng, "A", visitors, {"purchase": 0.10})
        treated = simulated_arm(rng, "B", visitors, {"purchase": 0.12})
        found = comparison(report([control, treated], control="A", metrics=["purchase"], revenue=False), "purchase")
        detected += found.significant and found.difference is not None and found.difference > 0
    low, high = plausible_counts(experiments, power)
    assert low <= detected <= high, f"observed power {detected / experiments:.3f}"


def test_required_sample_size_matches_the_textbook_value() -> None:
    # Fleiss' formula without continuity correction for 10% -> 12%, alpha 0.05, power 0.8.
    assert required_sample_size(0.10, 0.02, alpha=0.05, power=0.8) == 3841


def test_required_sample_size_refuses_rates_outside_zero_and_one() -> None:
    with pytest.raises(ValueError, match="baseline_rate"):
        required_sample_size(0.95, 0.10)


def test_holm_matches_a_hand_checked_example() -> None:
    # Sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> made monotone: 0.06.
    # Same as R's p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm").
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_caps_adjusted_p_values_at_one() -> None:
    assert holm([0.5, 0.6, 0.9]) == pytest.approx([1.0, 1.0, 1.0])


def test_holm_keeps_the_family_wise_error_within_alpha_across_metrics_and_variants() -> None:
    rng = np.random.default_rng(13)
    rates = {"click": 0.30, "signup": 0.05, "purchase": 0.10}
    experiments = 1000
    any_raw, any_adjusted = 0, 0
    for _ in range(experiments):
        arms = [simulated_arm(rng, name, 1500, rates, weight=1 / 3) for name in ("A", "B", "C")]
        result = report(arms, control="A", metrics=list(rates))
        assert len(result.comparisons) == 8
        any_raw += any(c.p_value is not None and c.p_value < ALPHA for c in result.comparisons)
        any_adjusted += any(c.significant for c in result.comparisons)
    assert any_adjusted <= plausible_counts(experiments, ALPHA)[1], f"FWER {any_adjusted / experiments:.3f}"
    # Without the correction eight comparisons would cry wolf far more often than alpha.
    assert any_raw > 3 * plausible_counts(experiments, ALPHA)[1], f"uncorrected FWER {any_raw / experiments:.3f}"


def test_significance_is_decided_on_the_holm_adjusted_p_value() -> None:
    rng = np.random.default_rng(14)
    arms = [simulated_arm(rng, "A", 4000, {"purchase": 0.10}), simulated_arm(rng, "B", 4000, {"purchase": 0.13})]
    for found in report(arms, control="A", metrics=["purchase"]).comparisons:
        assert found.p_adjusted is not None and found.p_value is not None
        assert found.p_adjusted >= found.p_value
        assert found.significant == (found.p_adjusted <= ALPHA)


def test_rate_intervals_cover_the_true_rate_at_the_nominal_frequency(aa_simulation: list[Report]) -> None:
    intervals = [estimate_of(result, "A", "purchase")[1:] for result in aa_simulation]
    covered = sum(low is not None and high is not None and low <= 0.10 <= high for low, high in intervals)
    low, high = plausible_counts(len(intervals), 1 - ALPHA)
    assert low <= covered <= high, f"coverage {covered / len(intervals):.3f}"


def test_rate_difference_intervals_cover_the_true_difference_at_the_nominal_frequency(
    aa_simulation: list[Report],
) -> None:
    found = [comparison(result, "purchase") for result in aa_simulation]
    covered = sum(
        c.difference_ci_low is not None
        and c.difference_ci_high is not None
        and c.difference_ci_low <= 0 <= c.difference_ci_high
        for c in found
    )
    low, high = plausible_counts(len(found), 1 - ALPHA)
    assert low <= covered <= high, f"coverage {covered / len(found):.3f}"


def test_revenue_intervals_cover_the_true_revenue_per_visitor_at_the_nominal_frequency(
    aa_simulation: list[Report],
) -> None:
    true_mean = 0.10 * MEAN_SPEND
    intervals = [estimate_of(result, "A", REVENUE_PER_VISITOR)[1:] for result in aa_simulation]
    covered = sum(low is not None and high is not None and low <= true_mean <= high for low, high in intervals)
    low, high = plausible_counts(len(intervals), 1 - ALPHA)
    assert low <= covered <= high, f"coverage {covered / len(intervals):.3f}"


def test_revenue_per_visitor_is_computed_from_running_sums() -> None:
    spends = [0.0, 0.0, 10.0, 30.0]
    arm = VariantData(
        name="A",
        weight=1.0,
        exposures=len(spends),
        revenue_sum=sum(spends),
        revenue_sum_squares=sum(s * s for s in spends),
    )
    value, low, high = estimate_of(report([arm], control="A", metrics=[]), "A", REVENUE_PER_VISITOR)
    expected_low, expected_high = stats.ttest_1samp(spends, 0.0).confidence_interval(0.95)
    assert value == pytest.approx(10.0)
    assert (low, high) == pytest.approx((expected_low, expected_high))


def test_welch_test_from_sums_matches_the_test_on_raw_revenue() -> None:
    control_spends, treated_spends = [0.0, 5.0, 0.0, 12.0, 3.0], [20.0, 0.0, 7.0, 9.0, 1.0, 0.0]

    def arm(name: str, spends: list[float]) -> VariantData:
        return VariantData(
            name=name,
            weight=0.5,
            exposures=len(spends),
            revenue_sum=sum(spends),
            revenue_sum_squares=sum(s * s for s in spends),
        )

    found = comparison(
        report([arm("A", control_spends), arm("B", treated_spends)], control="A", metrics=[]), REVENUE_PER_VISITOR
    )
    expected = stats.ttest_ind(treated_spends, control_spends, equal_var=False)
    assert found.p_value == pytest.approx(expected.pvalue)
    assert (found.difference_ci_low, found.difference_ci_high) == pytest.approx(expected.confidence_interval(0.95))


def test_a_balanced_split_is_not_flagged_as_sample_ratio_mismatch() -> None:
    arms = [VariantData(name="A", weight=0.5, exposures=5000), VariantData(name="B", weight=0.5, exposures=5000)]
    assert not sample_ratio_mismatch(arms).flagged


def test_a_broken_split_is_flagged_as_sample_ratio_mismatch() -> None:
    arms = [VariantData(name="A", weight=0.5, exposures=5000), VariantData(name="B", weight=0.5, exposures=4500)]
    result = report(arms, control="A", metrics=[])
    assert result.srm.flagged
    assert result.srm.p_value is not None and result.srm.p_value < 0.001
    assert any("sample ratio mismatch" in note for note in result.notes)


def test_sample_ratio_mismatch_follows_the_configured_weights() -> None:
    uneven = [VariantData(name="A", weight=90, exposures=9000), VariantData(name="B", weight=10, exposures=1000)]
    even = [VariantData(name="A", weight=90, exposures=5000), VariantData(name="B", weight=10, exposures=5000)]
    assert not sample_ratio_mismatch(uneven).flagged
    assert sample_ratio_mismatch(even).flagged


def test_traffic_to_a_variant_weighted_zero_is_a_sample_ratio_mismatch() -> None:
    arms = [VariantData(name="A", weight=1, exposures=5000), VariantData(name="B", weight=0, exposures=3)]
    assert sample_ratio_mismatch(arms).flagged


def test_a_correct_split_is_rarely_flagged_in_simulation() -> None:
    rng = np.random.default_rng(15)
    experiments = 2000
    flagged = 0
    for visitors_a in rng.binomial(10_000, 0.9, experiments):
        arms = [
            VariantData(name="A", weight=0.9, exposures=int(visitors_a)),
            VariantData(name="B", weight=0.1, exposures=10_000 - int(visitors_a)),
        ]
        flagged += sample_ratio_mismatch(arms).flagged
    assert flagged <= plausible_counts(experiments, 0.001)[1]


def test_a_note_names_the_variants_below_the_minimum_sample_per_metric() -> None:
    arms = [VariantData(name="A", weight=0.5, exposures=900), VariantData(name="B", weight=0.5, exposures=1200)]
    result = report(arms, control="A", metrics=["purchase", "click"], min_sample={"purchase": 1000}, revenue=False)
    sample_notes = [note for note in result.notes if "minimum sample size" in note]
    assert sample_notes == [
        "purchase: minimum sample size of 1000 per variant not reached (A: 900); results are not conclusive yet"
    ]


def test_a_single_minimum_sample_applies_to_every_metric() -> None:
    arms = [VariantData(name="A", weight=0.5, exposures=10), VariantData(name="B", weight=0.5, exposures=10)]
    result = report(arms, control="A", metrics=["purchase", "click"], min_sample=100)
    sample_notes = [note for note in result.notes if "minimum sample size" in note]
    assert [note.split(":")[0] for note in sample_notes] == ["purchase", "click", REVENUE_PER_VISITOR]


def test_a_variant_without_exposures_gives_nulls_and_a_note() -> None:
    arms = [
        VariantData(name="A", weight=0.5, exposures=1000, conversions={"purchase": 100}),
        VariantData(name="B", weight=0.5, exposures=0),
    ]
    result = report(arms, control="A", metrics=["purchase"])
    assert estimate_of(result, "B", "purchase") == (None, None, None)
    assert all(c.p_value is None and c.p_adjusted is None and not c.significant for c in result.comparisons)
    assert any("B vs A" in note for note in result.notes)


def test_no_exposures_at_all_leaves_the_split_unchecked() -> None:
    arms = [VariantData(name="A", weight=0.5, exposures=0), VariantData(name="B", weight=0.5, exposures=0)]
    result = report(arms, control="A", metrics=["purchase"])
    assert result.srm.p_value is None and not result.srm.flagged
    assert all(row.observed_share is None for row in result.variants)


@pytest.mark.parametrize("converted", [0, 1000], ids=["nobody converted", "everybody converted"])
def test_a_rate_identical_at_zero_or_one_has_no_p_value_and_a_note(converted: int) -> None:
    arms = [
        VariantData(name="A", weight=0.5, exposures=1000, conversions={"purchase": converted}),
        VariantData(name="B", weight=0.5, exposures=1000, conversions={"purchase": converted}),
    ]
    result = report(arms, control="A", metrics=["purchase"], revenue=False)
    found = comparison(result, "purchase")
    assert found.p_value is None and not found.significant
    assert found.difference == 0
    assert found.difference_ci_low is not None and found.difference_ci_low < 0 < (found.difference_ci_high or 0)
    assert any("the test is undefined" in note for note in result.notes)


def test_an_arm_where_everybody_converted_is_still_compared() -> None:
    arms = [
        VariantData(name="A", weight=0.5, exposures=100, conversions={"purchase": 50}),
        VariantData(name="B", weight=0.5, exposures=100, conversions={"purchase": 100}),
    ]
    found = comparison(report(arms, control="A", metrics=["purchase"], revenue=False), "purchase")
    assert found.p_value is not None and found.p_value < 1e-6
    assert found.difference == pytest.approx(0.5)
    assert found.difference_ci_high is not None and found.difference_ci_high <= 1.0


def test_revenue_without_variance_has_no_p_value_and_a_note() -> None:
    arms = [VariantData(name="A", weight=0.5, exposures=500), VariantData(name="B", weight=0.5, exposures=500)]
    result = report(arms, control="A", metrics=[])
    found = comparison(result, REVENUE_PER_VISITOR)
    assert found.p_value is None and found.difference == 0
    assert found.relative_difference is None
    assert any("does not vary" in note for note in result.notes)


def test_more_conversions_than_exposures_is_reported_as_inconsistent_not_raised() -> None:
    arms = [
        VariantData(name="A", weight=0.5, exposures=100, conversions={"purchase": 10}),
        VariantData(name="B", weight=0.5, exposures=100, conversions={"purchase": 120}),
    ]
    result = report(arms, control="A", metrics=["purchase"], revenue=False)
    assert comparison(result, "purchase").p_value is None
    assert estimate_of(result, "B", "purchase") == (None, None, None)
    assert any("inconsistent counts" in note for note in result.notes)


def test_a_single_variant_reports_its_estimates_and_nothing_to_compare() -> None:
    arm = VariantData(name="A", weight=1.0, exposures=1000, conversions={"purchase": 100})
    result = report([arm], control="A", metrics=["purchase"])
    assert result.comparisons == []
    assert result.srm.p_value is None and not result.srm.flagged
    assert estimate_of(result, "A", "purchase")[0] == pytest.approx(0.10)
    assert any("nothing to compare" in note for note in result.notes)


def test_an_unknown_control_is_refused() -> None:
    with pytest.raises(ValueError, match="control"):
        report([VariantData(name="A", weight=1.0, exposures=10)], control="Z", metrics=[])


def test_a_report_with_nulls_round_trips_through_json() -> None:
    arms = [VariantData(name="A", weight=0.5, exposures=0), VariantData(name="B", weight=0.5, exposures=1)]
    result = report(arms, control="A", metrics=["purchase"], min_sample=10)
    assert msgspec.json.decode(msgspec.json.encode(result), type=Report) == result

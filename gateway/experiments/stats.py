"""The statistics behind an experiment report: per-variant rates and revenue per visitor with
confidence intervals, tests of each variant against the control, Holm's correction across all
of them, and a sample-ratio-mismatch check of the split.

Pure functions over running totals (exposures, converted visitors, revenue sum and sum of
squares), so the gateway can keep counters instead of every visitor's history. Data the
statistics cannot speak about (no exposures, no conversions anywhere, no variance) gives nulls
and a note rather than an exception: a report of a young experiment must still render.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import msgspec
import numpy as np
from scipy import stats

REVENUE_PER_VISITOR = "revenue_per_visitor"
SRM_THRESHOLD = 0.001  # the usual SRM bar: strict, because a broken split invalidates every metric

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class VariantData(msgspec.Struct, frozen=True, kw_only=True):
    """Running totals of one variant. A metric missing from `conversions` counts as zero
    converted visitors: a counter that was never incremented."""

    name: str
    weight: NonNegativeFloat
    exposures: NonNegativeInt
    conversions: dict[str, NonNegativeInt] = {}
    revenue_sum: float = 0.0
    revenue_sum_squares: NonNegativeFloat = 0.0


class Estimate(msgspec.Struct, frozen=True, kw_only=True):
    """A rate or a mean of one variant; nulls when there is nothing to estimate from."""

    metric: str
    value: float | None
    ci_low: float | None
    ci_high: float | None


class VariantRow(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    weight: float
    exposures: int
    expected_share: float | None
    observed_share: float | None
    estimates: list[Estimate]


class Comparison(msgspec.Struct, frozen=True, kw_only=True):
    """One variant against the control on one metric. `difference` is variant minus control,
    `relative_difference` that difference over the control's value (null when it is zero)."""

    metric: str
    variant: str
    control: str
    test: Literal["chi2", "welch"]
    difference: float | None
    difference_ci_low: float | None
    difference_ci_high: float | None
    relative_difference: float | None
    p_value: float | None
    p_adjusted: float | None = None
    significant: bool = False


class SampleRatio(msgspec.Struct, frozen=True, kw_only=True):
    p_value: float | None
    flagged: bool


class Report(msgspec.Struct, frozen=True, kw_only=True):
    control: str
    alpha: float
    variants: list[VariantRow]
    comparisons: list[Comparison]
    srm: SampleRatio
    notes: list[str]


def report(
    variants: Sequence[VariantData],
    *,
    control: str,
    metrics: Sequence[str],
    alpha: float = 0.05,
    min_sample: int | Mapping[str, int] | None = None,
    revenue: bool = True,
) -> Report:
    """The report of one experiment. `metrics` names the conversion metrics; revenue per visitor
    is added when `revenue` is true. `min_sample` is the exposures each variant needs, for every
    metric or per metric (see `required_sample_size`).

    Raises ValueError only for a malformed call (duplicate variant names, an unknown control,
    alpha outside (0, 1)); thin or degenerate data gives nulls and notes instead."""
    names = [variant.name for variant in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate variant names: {names}")
    if control not in names:
        raise ValueError(f"control {control!r} is not one of the variants {names}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    notes: list[str] = []
    all_metrics = [*metrics, REVENUE_PER_VISITOR] if revenue else list(metrics)
    baseline = next(variant for variant in variants if variant.name == control)
    rows = _rows(variants, metrics, revenue, alpha)
    comparisons: list[Comparison] = []
    for variant in variants:
        if variant.name == control:
            continue
        comparisons.extend(_compare_rate(variant, baseline, metric, alpha, notes) for metric in metrics)
        if revenue:
            comparisons.append(_compare_revenue(variant, baseline, alpha, notes))
    if not comparisons:
        notes.append("no variant besides the control, or no metric: there is nothing to compare")
    srm, srm_note = _check_split(variants)
    notes.extend([srm_note] if srm_note else [])
    notes.extend(_sample_size_notes(variants, all_metrics, min_sample))
    return Report(
        control=control,
        alpha=alpha,
        variants=rows,
        comparisons=_with_holm(comparisons, alpha),
        srm=srm,
        notes=notes,
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest p is scaled by
    (m - i + 1), and adjusted values are made monotone so a rejection never follows an
    acceptance. Rejecting where adjusted p <= alpha controls the family-wise error rate under
    any dependence between the tests. (scipy only offers FDR control, statsmodels is not a
    dependency.)"""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return [float(value) for value in adjusted]


def sample_ratio_mismatch(variants: Sequence[VariantData]) -> SampleRatio:
    """Chi-square goodness of fit of the observed exposures against the configured weights,
    flagged below p = 0.001."""
    return _check_split(variants)[0]


def _check_split(variants: Sequence[VariantData]) -> tuple[SampleRatio, str | None]:
    """The SRM result and the note the report shows with it. A variant weighted zero takes no
    part unless it received traffic, which is a mismatch on its own."""
    total_weight = sum(variant.weight for variant in variants)
    total = sum(variant.exposures for variant in variants)
    if total_weight <= 0 or total == 0:
        return SampleRatio(p_value=None, flagged=False), "no exposures or no positive weights; split not checked"
    stray = [variant.name for variant in variants if variant.weight == 0 and variant.exposures > 0]
    if stray:
        note = f"sample ratio mismatch: variants weighted zero received traffic: {', '.join(stray)}"
        return SampleRatio(p_value=0.0, flagged=True), note
    weighted = [variant for variant in variants if variant.weight > 0]
    if len(weighted) < 2:
        return SampleRatio(p_value=None, flagged=False), None
    observed = np.array([variant.exposures for variant in weighted], dtype=np.float64)
    expected = np.array([variant.weight for variant in weighted], dtype=np.float64)
    expected *= total / expected.sum()
    p_value = float(stats.chisquare(observed, expected).pvalue)
    if p_value >= SRM_THRESHOLD:
        return SampleRatio(p_value=p_value, flagged=False), None
    note = (
        f"sample ratio mismatch (p = {p_value:.2g}): exposures do not follow the configured weights; "
        "check assignment and logging before trusting any result"
    )
    return SampleRatio(p_value=p_value, flagged=True), note


def required_sample_size(
    baseline_rate: float, minimum_detectable_effect: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Visitors per variant for a two-sided two-proportion test to detect an absolute change of
    `minimum_detectable_effect` from `baseline_rate` with the given power (normal approximation,
    pooled variance under the null and unpooled under the alternative)."""
    treated_rate = baseline_rate + minimum_detectable_effect
    if not (0 < baseline_rate < 1 and 0 < treated_rate < 1 and minimum_detectable_effect != 0):
        raise ValueError("need 0 < baseline_rate, baseline_rate + effect < 1 and a non-zero effect")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError("alpha and power must lie in (0, 1)")
    pooled = (baseline_rate + treated_rate) / 2
    z_alpha = float(stats.norm.ppf(1 - alpha / 2))
    z_power = float(stats.norm.ppf(power))
    spread = z_alpha * math.sqrt(2 * pooled * (1 - pooled)) + z_power * math.sqrt(
        baseline_rate * (1 - baseline_rate) + treated_rate * (1 - treated_rate)
    )
    return math.ceil(spread**2 / minimum_detectable_effect**2)


def _rows(variants: Sequence[VariantData], metrics: Sequence[str], revenue: bool, alpha: float) -> list[VariantRow]:
    total_weight = sum(variant.weight for variant in variants)
    total = sum(variant.exposures for variant in variants)
    rows = []
    for variant in variants:
        estimates = [_rate_estimate(variant, metric, alpha) for metric in metrics]
        if revenue:
            estimates.append(_revenue_estimate(variant, alpha))
        rows.append(
            VariantRow(
                name=variant.name,
                weight=variant.weight,
                exposures=variant.exposures,
                expected_share=variant.weight / total_weight if total_weight > 0 else None,
                observed_share=variant.exposures / total if total > 0 else None,
                estimates=estimates,
            )
        )
    return rows


@functools.lru_cache(maxsize=1024)
def _wilson(successes: int, trials: int, alpha: float) -> tuple[float, float] | None:
    """Wilson's score interval: keeps its coverage near 0 and 1, where the Wald interval
    collapses to a point. None when the counts cannot be a proportion. Cached because a report
    needs each interval twice (the row and the comparison; the control's once per variant) and
    binomtest spends most of its time on an exact p-value we do not use."""
    if trials == 0 or not 0 <= successes <= trials:
        return None
    interval = stats.binomtest(successes, trials).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return float(interval.low), float(interval.high)


def _rate_estimate(variant: VariantData, metric: str, alpha: float) -> Estimate:
    converted = variant.conversions.get(metric, 0)
    interval = _wilson(converted, variant.exposures, alpha)
    if interval is None:
        return Estimate(metric=metric, value=None, ci_low=None, ci_high=None)
    return Estimate(metric=metric, value=converted / variant.exposures, ci_low=interval[0], ci_high=interval[1])


def _untested(metric: str, variant: VariantData, control: VariantData, test: Literal["chi2", "welch"]) -> Comparison:
    return Comparison(
        metric=metric,
        variant=variant.name,
        control=control.name,
        test=test,
        difference=None,
        difference_ci_low=None,
        difference_ci_high=None,
        relative_difference=None,
        p_value=None,
    )


def _compare_rate(
    variant: VariantData, control: VariantData, metric: str, alpha: float, notes: list[str]
) -> Comparison:
    """Pearson's chi-square on the 2x2 table without Yates' continuity correction: it is then
    exactly the two-sided pooled two-proportion z-test, whose size the simulations check;
    Yates' correction makes it conservative and loses power at the sample sizes of A/B tests.
    The difference interval is Newcombe's hybrid score interval, built from the two Wilson
    intervals, so it stays sensible with zero or all conversions."""
    treated_hits, control_hits = variant.conversions.get(metric, 0), control.conversions.get(metric, 0)
    treated_interval = _wilson(treated_hits, variant.exposures, alpha)
    control_interval = _wilson(control_hits, control.exposures, alpha)
    empty = _untested(metric, variant, control, "chi2")
    if treated_interval is None or control_interval is None:
        notes.append(f"{metric}, {variant.name} vs {control.name}: no exposures or inconsistent counts; no test")
        return empty
    treated_rate, control_rate = treated_hits / variant.exposures, control_hits / control.exposures
    difference = treated_rate - control_rate
    low = difference - math.hypot(treated_rate - treated_interval[0], control_interval[1] - control_rate)
    high = difference + math.hypot(treated_interval[1] - treated_rate, control_rate - control_interval[0])
    table = np.array(
        [[treated_hits, variant.exposures - treated_hits], [control_hits, control.exposures - control_hits]]
    )
    p_value: float | None = None
    if table.sum(axis=0).all():
        result = stats.chi2_contingency(table, correction=False)
        p_value = float(result.pvalue)
        if (result.expected_freq < 5).any():
            notes.append(
                f"{metric}, {variant.name} vs {control.name}: fewer than 5 expected in a cell; "
                "the chi-square p-value is approximate"
            )
    else:
        notes.append(
            f"{metric}, {variant.name} vs {control.name}: every visitor converted or none did; the test is undefined"
        )
    return msgspec.structs.replace(
        empty,
        difference=difference,
        difference_ci_low=max(-1.0, low),
        difference_ci_high=min(1.0, high),
        relative_difference=difference / control_rate if control_rate > 0 else None,
        p_value=p_value,
    )


def _mean_and_variance(variant: VariantData) -> tuple[float, float] | None:
    """Mean and sample variance from the running sums; None below two visitors, where the
    variance is undefined. Clamped at zero because the subtraction can come out a hair negative
    in floating point when every visitor spent the same."""
    n = variant.exposures
    if n < 2:
        return None
    mean = variant.revenue_sum / n
    variance = max(0.0, (variant.revenue_sum_squares - n * mean * mean) / (n - 1))
    return mean, variance


def _revenue_estimate(variant: VariantData, alpha: float) -> Estimate:
    moments = _mean_and_variance(variant)
    if moments is None:
        mean = variant.revenue_sum / variant.exposures if variant.exposures else None
        return Estimate(metric=REVENUE_PER_VISITOR, value=mean, ci_low=None, ci_high=None)
    mean, variance = moments
    if variance == 0:
        return Estimate(metric=REVENUE_PER_VISITOR, value=mean, ci_low=mean, ci_high=mean)
    low, high = stats.t.interval(
        1 - alpha, variant.exposures - 1, loc=mean, scale=math.sqrt(variance / variant.exposures)
    )
    return Estimate(metric=REVENUE_PER_VISITOR, value=mean, ci_low=float(low), ci_high=float(high))


def _compare_revenue(variant: VariantData, control: VariantData, alpha: float, notes: list[str]) -> Comparison:
    """Welch's t-test from the summary statistics: revenue variances differ between variants
    whenever the treatment changes who buys, so the pooled-variance test would be miscalibrated.
    The difference interval uses the same Welch-Satterthwaite degrees of freedom."""
    empty = _untested(REVENUE_PER_VISITOR, variant, control, "welch")
    treated_moments, control_moments = _mean_and_variance(variant), _mean_and_variance(control)
    label = f"{REVENUE_PER_VISITOR}, {variant.name} vs {control.name}"
    if treated_moments is None or control_moments is None:
        notes.append(f"{label}: fewer than two visitors in an arm; no test")
        return empty
    (treated_mean, treated_var), (control_mean, control_var) = treated_moments, control_moments
    difference = treated_mean - control_mean
    relative = difference / control_mean if control_mean != 0 else None
    treated_se2, control_se2 = treated_var / variant.exposures, control_var / control.exposures
    if treated_se2 + control_se2 == 0:
        notes.append(f"{label}: revenue does not vary within either arm; the test is undefined")
        return msgspec.structs.replace(empty, difference=difference, relative_difference=relative)
    p_value = float(
        stats.ttest_ind_from_stats(
            treated_mean,
            math.sqrt(treated_var),
            variant.exposures,
            control_mean,
            math.sqrt(control_var),
            control.exposures,
            equal_var=False,
        ).pvalue
    )
    welch_df = (treated_se2 + control_se2) ** 2 / (
        treated_se2**2 / (variant.exposures - 1) + control_se2**2 / (control.exposures - 1)
    )
    low, high = stats.t.interval(1 - alpha, welch_df, loc=difference, scale=math.sqrt(treated_se2 + control_se2))
    return msgspec.structs.replace(
        empty,
        difference=difference,
        difference_ci_low=float(low),
        difference_ci_high=float(high),
        relative_difference=relative,
        p_value=p_value,
    )


def _with_holm(comparisons: list[Comparison], alpha: float) -> list[Comparison]:
    """Adjusts across every comparison that has a p-value: all metrics and all variants form one
    family, so the chance of any false 'significant' on the report stays within alpha."""
    tested = [(index, c.p_value) for index, c in enumerate(comparisons) if c.p_value is not None]
    adjusted = holm([p_value for _, p_value in tested])
    result = list(comparisons)
    for (index, _), p_adjusted in zip(tested, adjusted, strict=True):
        result[index] = msgspec.structs.replace(result[index], p_adjusted=p_adjusted, significant=p_adjusted <= alpha)
    return result


def _sample_size_notes(
    variants: Sequence[VariantData], metrics: Sequence[str], min_sample: int | Mapping[str, int] | None
) -> list[str]:
    if min_sample is None:
        return []
    notes = []
    for metric in metrics:
        required = min_sample if isinstance(min_sample, int) else min_sample.get(metric)
        if required is None:
            continue
        short = [f"{variant.name}: {variant.exposures}" for variant in variants if variant.exposures < required]
        if short:
            notes.append(
                f"{metric}: minimum sample size of {required} per variant not reached ({', '.join(short)}); "
                "results are not conclusive yet"
            )
    return notes

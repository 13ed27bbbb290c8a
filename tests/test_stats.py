"""The verdict's statistics: calibrated under no difference, sensitive to a real one."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import scipy.stats

from proxy.stats import (
    Estimate,
    _bootstrap_percentile,
    cluster_median_ratio,
    mann_whitney_p,
    median_ratio,
    percentile,
    sample_ratio,
    samples_needed,
    verdict,
)


def lognormal(rng: np.random.Generator, median: float, sigma: float, n: int) -> np.ndarray:
    return rng.lognormal(math.log(median), sigma, n)


def test_bootstrap_matches_explicit_resampling() -> None:
    """The order-statistic shortcut draws from the same distribution as resampling does."""
    rng = np.random.default_rng(7)
    x = np.sort(np.round(lognormal(rng, 1.0, 1.0, 20), 1))  # rounding adds ties
    for q in (50.0, 37.0, 90.0):  # even-n median and off-grid percentiles interpolate
        resampled = x[rng.integers(0, x.size, size=(40_000, x.size))]
        # Rounded: the two interpolate in a different order, so equal values can differ by an ulp
        explicit = np.round(np.percentile(resampled, q, axis=1), 9)
        shortcut = np.round(_bootstrap_percentile(x, q, 40_000, rng), 9)
        assert scipy.stats.ks_2samp(explicit, shortcut).pvalue > 0.001, q


def test_a_a_comparison_is_judged_no_difference() -> None:
    """Same distribution on both sides: the verdict rarely claims a difference.

    Each criterion alone errs about 5% of the time by design; the verdict needs both.
    """
    started = time.perf_counter()
    claims = low_p = interval_misses = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        a, b = lognormal(rng, 50.0, 0.5, 300), lognormal(rng, 50.0, 0.5, 300)
        ratio = median_ratio(a, b, rng=rng, n_boot=500)
        p = mann_whitney_p(a, b)
        assert p is not None and ratio.low is not None and ratio.high is not None
        line = verdict(
            "latency",
            "speculative",
            "baseline",
            ratio,
            p,
            300,
            300,
            higher_is_better=False,
            needed=None,
        )
        claims += "faster" in line or "slower" in line  # a direction claimed
        low_p += p < 0.05
        interval_misses += not ratio.low <= 1.0 <= ratio.high
    assert claims <= 10  # at least 95% judged "no difference"
    assert low_p <= 20 and interval_misses <= 20  # each near its nominal 5%, not far above
    assert time.perf_counter() - started < 20


def test_known_speedup_is_found() -> None:
    """A 1.3x decode speed-up is found, estimated near 1.3 and reported as faster."""
    rng = np.random.default_rng(0)
    baseline = lognormal(rng, 30.0, 0.25, 400)
    speculative = 1.3 * lognormal(rng, 30.0, 0.25, 400)
    ratio = median_ratio(speculative, baseline, rng=rng)
    p = mann_whitney_p(speculative, baseline)
    assert ratio.low is not None and ratio.high is not None and ratio.value is not None
    assert 1.0 < ratio.low <= 1.3 <= ratio.high
    assert p is not None and p < 0.001
    line = verdict(
        "decode", "speculative", "baseline", ratio, p, 400, 400, higher_is_better=True, needed=None
    )
    assert line.startswith(f"speculative: decode {ratio.value:.2f}x faster than baseline (")
    assert f"{ratio.value:.1f}" == "1.3"
    assert "p<0.001, n=400/400)" in line


def test_slowdown_is_found_in_the_other_direction() -> None:
    """Swapping the sides gives the reciprocal ratio, so a slower backend is not 'faster'."""
    rng = np.random.default_rng(1)
    fast, slow = lognormal(rng, 39.0, 0.25, 400), lognormal(rng, 30.0, 0.25, 400)
    forward = median_ratio(fast, slow, rng=rng)
    backward = median_ratio(slow, fast, rng=rng)
    assert forward.value is not None and backward.value is not None
    assert forward.value * backward.value == pytest.approx(1.0)
    assert backward.high is not None and backward.high < 1.0


def test_split_of_70_30_against_configured_50_50_is_a_mismatch() -> None:
    result = sample_ratio(
        {"baseline": 700, "speculative": 300}, {"baseline": 50, "speculative": 50}
    )
    assert result.mismatch
    assert result.p_value is not None and result.p_value < 1e-30
    assert result.observed_share == {"baseline": 0.7, "speculative": 0.3}
    assert result.expected_share == {"baseline": 0.5, "speculative": 0.5}


def test_fair_50_50_split_rarely_alarms() -> None:
    """Binomial draws from the configured split alarm at about the threshold rate, 0.1%."""
    rng = np.random.default_rng(3)
    alarms = 0
    for _ in range(500):
        to_baseline = int(rng.binomial(1000, 0.5))
        counts = {"baseline": to_baseline, "speculative": 1000 - to_baseline}
        alarms += sample_ratio(counts, {"baseline": 50, "speculative": 50}).mismatch
    assert alarms <= 5  # expected 0.5; a threshold of 0.05 would give about 25


def test_uneven_configured_split_is_respected() -> None:
    """A 90/10 split that delivered 90/10 is fine; shares are normalised from the weights."""
    result = sample_ratio({"baseline": 905, "speculative": 95}, {"baseline": 45, "speculative": 5})
    assert not result.mismatch
    assert result.expected_share == {"baseline": 0.9, "speculative": 0.1}


def test_traffic_to_a_zero_weight_backend_is_a_mismatch_even_when_small() -> None:
    weights = {"baseline": 100, "drained": 0}
    result = sample_ratio({"baseline": 10, "drained": 1}, weights)
    assert (result.p_value, result.mismatch) == (0.0, True)
    assert result.expected_share == {"baseline": 1.0}


def test_backend_missing_from_the_split_counts_as_weight_zero() -> None:
    result = sample_ratio({"baseline": 500, "ghost": 5}, {"baseline": 100})
    assert result.mismatch
    assert result.observed["ghost"] == 5


def test_too_few_requests_give_no_p_value() -> None:
    result = sample_ratio({"baseline": 15, "speculative": 0}, {"baseline": 50, "speculative": 50})
    assert (result.p_value, result.mismatch) == (None, False)
    assert result.observed == {"baseline": 15, "speculative": 0}


def test_percentile_interval_covers_the_true_percentile_about_95_percent() -> None:
    true_p90 = float(scipy.stats.lognorm(s=0.5, scale=100.0).ppf(0.90))
    covered = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        estimate = percentile(lognormal(rng, 100.0, 0.5, 500), 90, rng=rng, n_boot=1000)
        assert estimate.low is not None and estimate.high is not None
        covered += estimate.low <= true_p90 <= estimate.high
    assert 90 <= covered <= 99  # neither too narrow nor uselessly wide


def test_percentile_value_is_numpys_and_inside_its_interval() -> None:
    rng = np.random.default_rng(5)
    x = lognormal(rng, 100.0, 0.5, 1000)
    estimate = percentile(x, 95, rng=rng)
    assert estimate.value == pytest.approx(np.percentile(x, 95))
    assert estimate.value is not None and estimate.low is not None and estimate.high is not None
    assert estimate.low < estimate.value < estimate.high
    assert estimate.n == 1000


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ([], Estimate(None, None, None, 0)),
        ([42.0], Estimate(42.0, None, None, 1)),
        ([7.0] * 50, Estimate(7.0, 7.0, 7.0, 50)),
        ([np.nan, 3.0, np.inf], Estimate(3.0, None, None, 1)),
    ],
    ids=["empty", "one", "all-equal", "non-finite-dropped"],
)
def test_percentile_of_degenerate_samples(samples: list[float], expected: Estimate) -> None:
    assert percentile(np.array(samples), 50, rng=np.random.default_rng(0)) == expected


@pytest.mark.parametrize("q", [0.0, 100.0])
def test_extreme_percentiles_are_the_sample_range(q: float) -> None:
    x = np.array([3.0, 1.0, 2.0])
    estimate = percentile(x, q, rng=np.random.default_rng(0))
    assert estimate.value == (1.0 if q == 0 else 3.0)
    assert estimate.low is not None and estimate.high is not None
    assert 1.0 <= estimate.low <= estimate.high <= 3.0


def test_percentile_rejects_q_outside_0_to_100() -> None:
    with pytest.raises(ValueError, match="q must be in"):
        percentile(np.array([1.0, 2.0]), 101, rng=np.random.default_rng(0))


def test_median_ratio_of_degenerate_samples() -> None:
    rng = np.random.default_rng(0)
    assert median_ratio(np.array([]), np.array([1.0]), rng=rng) == Estimate(None, None, None, 0)
    assert median_ratio(np.array([1.0]), np.array([0.0]), rng=rng).value is None
    assert median_ratio(np.array([3.0]), np.array([2.0]), rng=rng) == Estimate(1.5, None, None, 1)
    same = median_ratio(np.full(9, 4.0), np.full(5, 2.0), rng=rng)
    assert same == Estimate(2.0, 2.0, 2.0, 5)


def test_median_ratio_with_zero_bootstrap_medians_is_unbounded_not_a_warning() -> None:
    """Mostly-zero b: some resampled medians of b are 0, which bounds nothing from above."""
    b = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
    ratio = median_ratio(np.ones(5), b, rng=np.random.default_rng(0))
    assert ratio.value == 1.0
    assert ratio.high == math.inf


@pytest.mark.parametrize(
    ("a", "b"),
    [([], [1.0, 2.0]), ([1.0], [1.0, 2.0]), ([5.0, 5.0, 5.0], [5.0, 5.0])],
    ids=["empty", "one-sample", "all-identical"],
)
def test_mann_whitney_gives_none_when_nothing_can_be_ranked(a: list[float], b: list[float]) -> None:
    assert mann_whitney_p(np.array(a), np.array(b)) is None


def test_mann_whitney_separates_disjoint_samples() -> None:
    p = mann_whitney_p(np.arange(30.0), np.arange(100.0, 130.0))
    assert p is not None and p < 1e-9


def test_samples_needed_matches_the_formula_for_a_known_spread() -> None:
    """sigma 0.5 on the log scale, 10% effect: 2 * (2.8016 * 0.5 / log 1.1)^2 * pi/3 = 452."""
    rng = np.random.default_rng(2)
    needed = samples_needed(lognormal(rng, 50.0, 0.5, 50_000), lognormal(rng, 60.0, 0.5, 50_000))
    assert needed is not None and 440 <= needed <= 465


def test_samples_needed_gives_about_80_percent_power() -> None:
    """At the suggested size, Mann-Whitney detects a true 10% change about 80% of the time."""
    rng = np.random.default_rng(4)
    n = samples_needed(lognormal(rng, 1.0, 0.5, 20_000), lognormal(rng, 1.0, 0.5, 20_000))
    assert n is not None
    detected = 0
    for _ in range(200):
        p = mann_whitney_p(lognormal(rng, 1.1, 0.5, n), lognormal(rng, 1.0, 0.5, n))
        detected += p is not None and p < 0.05
    assert 140 <= detected <= 184  # 70% to 92%


def test_samples_needed_shrinks_with_spread_and_grows_as_effect_shrinks() -> None:
    rng = np.random.default_rng(6)
    wide = [lognormal(rng, 50.0, 0.6, 2000) for _ in range(2)]
    narrow = [lognormal(rng, 50.0, 0.2, 2000) for _ in range(2)]
    n_wide, n_narrow = samples_needed(*wide), samples_needed(*narrow)
    n_small_effect = samples_needed(*wide, effect=0.05)
    assert n_wide is not None and n_narrow is not None and n_small_effect is not None
    assert n_narrow * 5 < n_wide  # a third of the spread needs about a ninth of the samples
    assert n_small_effect > 3 * n_wide  # half the effect needs about four times the samples


def test_samples_needed_is_none_without_two_positive_samples_a_side() -> None:
    assert samples_needed(np.array([0.0, -1.0, 5.0]), np.array([1.0, 2.0])) is None
    assert samples_needed(np.array([1.0, 2.0, 3.0]), np.array([])) is None


def test_verdict_for_a_significant_latency_improvement() -> None:
    ratio = Estimate(0.8, 0.75, 0.86, 500)
    line = verdict(
        "latency",
        "speculative",
        "baseline",
        ratio,
        0.0004,
        512,
        500,
        higher_is_better=False,
        needed=100,
    )
    assert line == (
        "speculative: latency 0.80x of baseline, faster (95% CI 0.75-0.86, p<0.001, n=512/500)"
    )


def test_verdict_for_a_significant_decode_slowdown() -> None:
    ratio = Estimate(0.71, 0.65, 0.77, 300)
    line = verdict(
        "decode",
        "speculative",
        "baseline",
        ratio,
        0.0123,
        300,
        310,
        higher_is_better=True,
        needed=None,
    )
    assert line == (
        "speculative: decode 0.71x as fast as baseline, slower"
        " (95% CI 0.65-0.77, p=0.012, n=300/310)"
    )


def test_verdict_without_significance_says_how_many_more_requests() -> None:
    ratio = Estimate(1.02, 0.97, 1.08, 790)
    line = verdict(
        "decode",
        "speculative",
        "baseline",
        ratio,
        0.41,
        812,
        790,
        higher_is_better=True,
        needed=1000,
    )
    assert line == (
        "speculative: no significant difference in decode vs baseline"
        " (ratio 1.02, 95% CI 0.97-1.08, p=0.41, n=812/790)"
        "; need about 210 more requests per backend to detect a 10% difference"
    )


def test_verdict_needs_test_and_interval_to_agree() -> None:
    """A small p with an interval still holding 1 is not called a difference, and no advice
    on sample size is given once there are enough requests."""
    ratio = Estimate(1.05, 0.99, 1.11, 900)
    line = verdict(
        "decode",
        "speculative",
        "baseline",
        ratio,
        0.03,
        900,
        900,
        higher_is_better=True,
        needed=800,
    )
    assert line.startswith("speculative: inconclusive for decode vs baseline")
    assert "faster" not in line and "slower" not in line
    assert "need about" not in line


def test_verdict_without_enough_data() -> None:
    line = verdict(
        "decode",
        "speculative",
        "baseline",
        Estimate(1.5, None, None, 1),
        None,
        3,
        1,
        higher_is_better=True,
        needed=None,
    )
    assert line == "speculative: not enough data yet for decode (n=3/1)"


def test_verdict_waits_for_a_minimum_of_requests() -> None:
    """3 against 4 requests: the rank test cannot reach p < 0.05, whatever the interval."""
    line = verdict(
        "decode",
        "speculative",
        "baseline",
        Estimate(0.43, 0.37, 0.62, 3),
        0.057,
        3,
        4,
        higher_is_better=True,
        needed=42,
    )
    assert line.startswith("speculative: not enough data yet for decode (n=3/4")
    assert "ratio so far 0.43" in line


# --- the cluster bootstrap ---------------------------------------------------------------------


def session_runs(rng: np.random.Generator, sessions: int = 40, per: int = 20) -> tuple[
    np.ndarray, np.ndarray, np.ndarray, np.ndarray
]:  # fmt: skip
    """One A/A experiment: `sessions` sessions of `per` requests an arm, each session with
    its own level (log-sd 0.5), requests around it (log-sd 0.5)."""
    codes = np.repeat(np.arange(sessions), per)

    def arm() -> np.ndarray:
        return np.exp(rng.normal(0.0, 0.5, sessions)[codes] + rng.normal(0.0, 0.5, codes.size))

    return arm(), arm(), codes, codes + sessions


def test_cluster_bootstrap_a_a_with_sessions_at_most_5_percent_false() -> None:
    """40 sessions x 20 requests an arm, per-session log-sd 0.5, 200 seeded A/A runs: the
    cluster bootstrap's 95% interval excludes 1 in about 5% of them (at most 7%, the Monte
    Carlo margin); resampling requests instead excludes it in far more (the control)."""
    rng = np.random.default_rng(21)
    runs = 200
    clustered = plain = 0
    for _ in range(runs):
        a, b, ca, cb = session_runs(rng)
        ratio, p = cluster_median_ratio(a, b, ca, cb, rng=rng, n_boot=300)
        assert ratio.low is not None and ratio.high is not None and p is not None
        clustered += not ratio.low <= 1.0 <= ratio.high
        naive = median_ratio(a, b, rng=rng, n_boot=300)
        assert naive.low is not None and naive.high is not None
        plain += not naive.low <= 1.0 <= naive.high
    assert clustered / runs <= 0.07, clustered
    assert plain / runs >= 0.25, plain


def test_cluster_bootstrap_of_singletons_matches_the_plain_bootstrap() -> None:
    """Every request its own session (negative clusters): the interval is the plain one's,
    within Monte Carlo error, and the value is the same median ratio."""
    rng = np.random.default_rng(5)
    a, b = lognormal(rng, 30.0, 0.3, 3000), lognormal(rng, 20.0, 0.3, 3000)
    none = np.full(a.size, -1)
    ratio, p = cluster_median_ratio(a, b, none, none, rng=rng, n_boot=2000)
    plain = median_ratio(a, b, rng=rng, n_boot=2000)
    assert ratio.value == plain.value and ratio.n == 3000 and p == 0.0
    assert ratio.low == pytest.approx(plain.low, rel=0.01)
    assert ratio.high == pytest.approx(plain.high, rel=0.01)


def test_cluster_bootstrap_counts_sessions_and_drops_non_finite() -> None:
    rng = np.random.default_rng(1)
    a = np.array([1.0, 2.0, np.nan, 3.0, 4.0, 5.0])
    ratio, p = cluster_median_ratio(a, a, [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], rng=rng)
    assert ratio.n == 3 and ratio.value == 1.0 and p == 1.0
    one, _ = cluster_median_ratio(a, a, np.zeros(6), np.zeros(6), rng=rng)
    assert one == Estimate(1.0, None, None, 1)
    with pytest.raises(ValueError, match="3 clusters for 6 values"):
        cluster_median_ratio(a, a, [0, 1, 2], np.zeros(6), rng=rng)

"""The always-valid verdict: false verdicts at most alpha however often one looks, with
sessions and several arms; real effects still found; the streaming state exact.

The simulations are vectorised over runs: each computes, at every look, the same means and
variances of the mean that `ArmState` keeps (a test below checks they agree with it exactly,
verdict for verdict), and the intervals with the module's own `half_width` and
`alpha_budget`. A false-verdict rate is checked with a binomial test: it fails when 1,000
runs show the rate is above 5% (one-sided p < 0.01, i.e. about 67 or more of 1,000), the
Monte Carlo margin of a method that errs exactly 5% of the time. Each check is paired with
a control: the same simulation judged by the naive fixed-horizon interval at every look
(or without the session correction) must fail it, so the check is able to fail.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
import numpy.typing as npt
import pytest
import scipy.stats

from proxy.sequential import (
    GUARDRAILS,
    RATE_SCALE,
    SESSION_CAP,
    TIME_SCALE,
    ArmState,
    Guardrail,
    Interval,
    MeanStream,
    Metric,
    Moments,
    Observation,
    Primary,
    alpha_budget,
    always_valid_p,
    compare,
    decide,
    guardrail_outcome,
    half_width,
    primary_outcome,
    rate_variance,
    sample_ratios,
)

Array = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
Indices = npt.NDArray[np.intp]
Width = Callable[[Array, float, float], Array]
LOOKS = np.arange(50, 1001, 50)  # requests per arm at each look
RUNS = 1000
ALPHA = 0.05


def sequential(variance: Array, alpha: float, scale: float) -> Array:
    return half_width(variance, alpha=alpha, scale=scale)


def naive(variance: Array, alpha: float, scale: float) -> Array:
    """The fixed-horizon z interval, read at every look: what the checks must catch."""
    return NormalDist().inv_cdf(1 - alpha / 2) * np.sqrt(variance)


def above_five_percent(failures: int, runs: int = RUNS) -> bool:
    """Do the runs show the rate exceeds 5%? (exact binomial test, one-sided, p < 0.01)"""
    return bool(scipy.stats.binomtest(failures, runs, ALPHA, alternative="greater").pvalue < 0.01)


def at_looks(x: Array) -> tuple[Array, Array]:
    """Mean and variance of the mean of each run (row) after each look's first n values."""
    shift = x[:, :1]
    c1 = np.cumsum(x - shift, axis=1)[:, LOOKS - 1]
    c2 = np.cumsum((x - shift) ** 2, axis=1)[:, LOOKS - 1]
    mean = c1 / LOOKS
    return mean + shift, (c2 - c1 * mean) / (LOOKS - 1) / LOOKS


def rate_at_looks(errors: npt.NDArray[np.bool_] | Array) -> tuple[Array, Array]:
    mean, variance = at_looks(errors.astype(np.float64))
    return mean, rate_variance(mean, LOOKS, variance)


def log_metrics(
    rng: np.random.Generator, runs: int, n: int, speedup: float = 1.0
) -> dict[Metric, Array]:
    """Log-values of one arm's requests: decode near lognormal, TTFT skewed, latency with a
    5% tail four times slower, 2% errors."""
    return {
        Metric.DECODE_TPS: rng.normal(math.log(30 * speedup), 0.3, (runs, n)),
        Metric.TTFT_MS: rng.normal(math.log(200), 0.5, (runs, n)) + rng.exponential(0.5, (runs, n)),
        Metric.LATENCY_MS: rng.normal(math.log(2000), 0.4, (runs, n))
        + math.log(4) * (rng.random((runs, n)) < 0.05),
        Metric.ERROR_RATE: (rng.random((runs, n)) < 0.02).astype(np.float64),
    }


def false_verdicts(arms: int, width: Width, seed: int) -> Array:
    """A/A with `arms` arms against a baseline, looked at every 50 per arm: whether each run
    ever gives a false verdict (primary interval excludes 1, or a guardrail shows harm)."""
    rng = np.random.default_rng(seed)
    budget = alpha_budget(ALPHA, arms, len(GUARDRAILS))
    base = {m: _moments(m, x) for m, x in log_metrics(rng, RUNS, LOOKS[-1]).items()}
    wrong = np.zeros(RUNS, dtype=bool)
    for _ in range(arms):
        arm = {m: _moments(m, x) for m, x in log_metrics(rng, RUNS, LOOKS[-1]).items()}
        for metric, (mean, variance) in arm.items():
            d, v = mean - base[metric][0], variance + base[metric][1]
            if metric is Metric.DECODE_TPS:
                wrong |= (np.abs(d) > width(v, budget.primary, TIME_SCALE)).any(axis=1)
            else:
                scale = RATE_SCALE if metric is Metric.ERROR_RATE else TIME_SCALE
                wrong |= (d > width(v, budget.guardrail, scale)).any(axis=1)  # harm: higher
    return wrong


def _moments(metric: Metric, x: Array) -> tuple[Array, Array]:
    return rate_at_looks(x) if metric is Metric.ERROR_RATE else at_looks(x)


# --- always valid ------------------------------------------------------------------------------


def test_a_a_peeking_every_50_gives_at_most_5_percent_false_verdicts() -> None:
    """One arm, four metrics, 20 looks: any false verdict in at most 5% of runs (measured
    0.7%; the naive interval at every look, 19.6%)."""
    started = time.perf_counter()
    wrong = false_verdicts(1, sequential, seed=1)
    assert not above_five_percent(int(wrong.sum())), wrong.mean()
    assert above_five_percent(int(false_verdicts(1, naive, seed=1).sum()))  # the control
    assert time.perf_counter() - started < 20


def test_three_speculative_arms_a_a_family_wise_at_most_5_percent() -> None:
    """Arms with 2, 3 and 5 draft tokens all as fast as the baseline: any false verdict of
    any arm in at most 5% of runs (measured 0.6%; naive, 18.7%)."""
    wrong = false_verdicts(3, sequential, seed=2)
    assert not above_five_percent(int(wrong.sum())), wrong.mean()
    assert above_five_percent(int(false_verdicts(3, naive, seed=2).sum()))


def decode_runs(seed: int, ratio: float, sigma: float) -> tuple[Array, Array]:
    """Log-ratio estimate and its variance at each look, arm decode `ratio` x baseline."""
    rng = np.random.default_rng(seed)
    arm = rng.normal(math.log(ratio), sigma, (RUNS, LOOKS[-1]))
    base = rng.normal(0.0, sigma, (RUNS, LOOKS[-1]))
    (ma, va), (mb, vb) = at_looks(arm), at_looks(base)
    return ma - mb, va + vb


def test_interval_covers_the_true_ratio_at_every_look() -> None:
    """A 1.3x speed-up: the 95% interval holds 1.3 at all 20 looks in 95% of runs."""
    d, v = decode_runs(3, 1.3, 0.8)
    for width, valid in ((sequential, True), (naive, False)):
        w = width(v, ALPHA, TIME_SCALE)
        misses = (np.abs(d - math.log(1.3)) > w).any(axis=1)
        assert above_five_percent(int(misses.sum())) is not valid, (width, misses.mean())


def test_a_decode_speed_up_of_1_3x_is_found() -> None:
    """A 1.3x speed-up with log-sd 0.8 (and the alpha of one arm's primary) is found by
    1,000 per arm in nearly every run, at about twice the fixed-horizon sample size.

    Measured (seed 4, 1,000 runs): found in 100% of runs; median look at detection 250 per
    arm, 80% found by 350; the fixed-horizon test at the same alpha needs 177 per arm for
    80% power.
    """
    budget = alpha_budget(ALPHA, 1, len(GUARDRAILS))
    d, v = decode_runs(4, 1.3, 0.8)
    better = d - half_width(v, alpha=budget.primary, scale=TIME_SCALE) > 0
    found = better.any(axis=1)
    first = np.where(found, LOOKS[np.argmax(better, axis=1)], np.inf)
    fixed = fixed_horizon_n(1.3, 0.8, budget.primary, power=0.8)
    assert found.mean() >= 0.99
    assert fixed <= np.median(first) <= 2 * fixed
    assert np.quantile(first, 0.8) <= 2 * fixed


def fixed_horizon_n(ratio: float, sigma: float, alpha: float, *, power: float) -> float:
    """Per arm, for a two-sided z test of the log-ratio at `power`."""
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return 2 * (z * sigma / math.log(ratio)) ** 2


# --- sessions ----------------------------------------------------------------------------------

SESSIONS, PER_SESSION = 40, 20


def session_runs(seed: int) -> tuple[Bools, Indices, Array]:
    """A/A, 40 sessions of 20 requests, each session's log-times shifted by N(0, 0.5^2):
    which arm each session is on, the session of each request in time order, the values."""
    rng = np.random.default_rng(seed)
    on_arm = rng.random((RUNS, SESSIONS)) < 0.5
    effect = rng.normal(0.0, 0.5, (RUNS, SESSIONS))
    order = np.argsort(rng.random((RUNS, SESSIONS * PER_SESSION)), axis=1) // PER_SESSION
    values = np.take_along_axis(effect, order, axis=1) + rng.normal(0.0, 0.5, order.shape)
    return on_arm, order, values


def session_moments(
    on_arm: Bools, order: Indices, values: Array, seen: int, side: bool
) -> tuple[Array, Array, Array, Array]:
    """Mean, cluster-robust and naive variance of the mean, and sessions, of one side after
    the first `seen` requests of every run."""
    runs = on_arm.shape[0]
    cells = (np.arange(runs)[:, None] * SESSIONS + order[:, :seen]).ravel()
    y = np.bincount(cells, values[:, :seen].ravel(), runs * SESSIONS).reshape(runs, SESSIONS)
    n = np.bincount(cells, None, runs * SESSIONS).reshape(runs, SESSIONS).astype(np.float64)
    mine = on_arm == side
    g, total = ((n > 0) & mine).sum(axis=1), (n * mine).sum(axis=1)
    mean = (y * mine).sum(axis=1) / total
    clustered = g / (g - 1) * (mine * (y - mean[:, None] * n) ** 2).sum(axis=1) / total**2
    request_on = np.take_along_axis(mine, order[:, :seen], axis=1)
    squares = (values[:, :seen] ** 2 * request_on).sum(axis=1)
    plain = (squares - total * mean**2) / (total - 1) / total
    return mean, clustered, plain, g


def test_sessions_a_a_at_most_5_percent_only_with_the_session_correction() -> None:
    """Sticky A/A, 40 sessions x 20 requests, per-session log-sd 0.5, looked at every 100
    requests: at most 5% false verdicts with sessions as the unit; treating requests as
    independent is far above 5% (measured at the primary's alpha, 0.025: 0 runs of 1,000
    against 33%; a fixed-horizon test at the end, treating requests as independent, 49%)."""
    budget = alpha_budget(ALPHA, 1, len(GUARDRAILS))
    on_arm, order, values = session_runs(5)
    wrong = {"clustered": np.zeros(RUNS, dtype=bool), "plain": np.zeros(RUNS, dtype=bool)}
    for seen in range(100, SESSIONS * PER_SESSION + 1, 100):
        ma, ca, pa, ga = session_moments(on_arm, order, values, seen, True)
        mb, cb, pb, gb = session_moments(on_arm, order, values, seen, False)
        enough = (ga >= 10) & (gb >= 10)  # MIN_VERDICT_SAMPLES units a side
        for name, v in (("clustered", ca + cb), ("plain", pa + pb)):
            w = half_width(v, alpha=budget.primary, scale=TIME_SCALE)
            wrong[name] |= enough & (np.abs(ma - mb) > w)
    assert not above_five_percent(int(wrong["clustered"].sum())), wrong["clustered"].mean()
    assert above_five_percent(int(wrong["plain"].sum())), wrong["plain"].mean()


# --- error rate --------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.002, 0.02, 0.2])
def test_error_rate_interval_covers_the_difference_at_every_look(rate: float) -> None:
    """Arm errs 2 points more than the baseline (1 point at 0.2%): the 95% interval of the
    difference holds it at all 20 looks in 95% of runs; the naive one does not at 2% and
    20%. (At 0.2% the naive one is also valid: a handful of errors per arm.)"""
    rng = np.random.default_rng(6)
    extra = 0.01 if rate < 0.01 else 0.02
    arm = rng.random((RUNS, LOOKS[-1])) < rate + extra
    base = rng.random((RUNS, LOOKS[-1])) < rate
    (ma, va), (mb, vb) = rate_at_looks(arm), rate_at_looks(base)
    d, v = ma - mb, va + vb
    for width in (sequential, naive):
        misses = (np.abs(d - extra) > width(v, ALPHA, RATE_SCALE)).any(axis=1)
        if width is sequential:
            assert not above_five_percent(int(misses.sum())), misses.mean()
        elif rate >= 0.01:
            assert above_five_percent(int(misses.sum())), misses.mean()


def test_error_rate_harm_is_found() -> None:
    """2% errors on the baseline, 6% on the arm: found as harm by 1,000 per arm in most runs,
    at the alpha a guardrail of one arm gets (0.0083). Measured: 83%, median look 700, where
    a fixed-horizon one-sided test at that alpha needs 497 per arm for 80% power."""
    budget = alpha_budget(ALPHA, 1, len(GUARDRAILS))
    rng = np.random.default_rng(7)
    (ma, va) = rate_at_looks(rng.random((RUNS, LOOKS[-1])) < 0.06)
    (mb, vb) = rate_at_looks(rng.random((RUNS, LOOKS[-1])) < 0.02)
    harm = (ma - mb - half_width(va + vb, alpha=budget.guardrail, scale=RATE_SCALE)) > 0
    assert harm.any(axis=1).mean() >= 0.8


# --- non-inferiority ---------------------------------------------------------------------------


def outcomes_at_looks(d: Array, v: Array, alpha: float, margin: float) -> list[list[Primary]]:
    """The primary verdict of every run at every look, through `primary_outcome` itself."""
    w = half_width(v, alpha=alpha, scale=TIME_SCALE)
    return [
        [
            primary_outcome(_ratio_interval(d[r, j], w[r, j], alpha), margin)
            for j in range(d.shape[1])
        ]
        for r in range(d.shape[0])
    ]


def _ratio_interval(d: float, w: float, alpha: float) -> Interval:
    value, low, high = math.exp(d), math.exp(d - w), math.exp(d + w)
    return Interval(Metric.DECODE_TPS, value, low, high, alpha, None, 1, 1, 1, 1, False)


def test_two_percent_slower_is_not_worse_with_a_five_percent_margin() -> None:
    """Decode 0.98x with log-sd 0.15 (a 15% spread): `not_worse` at 1,000 per arm in most
    runs, never `better`. Measured: 86% `not_worse` at 1,000 (the rest `worse`: entirely
    below 1 and not excluding 0.95), first `not_worse` at a median 500 per arm; a
    fixed-horizon test at the same alpha needs 442 for 80% power."""
    budget = alpha_budget(ALPHA, 1, len(GUARDRAILS))
    d, v = decode_runs(8, 0.98, 0.15)
    last = [row[-1] for row in outcomes_at_looks(d, v, budget.primary, 0.05)]
    assert last.count(Primary.NOT_WORSE) / RUNS >= 0.8
    assert Primary.BETTER not in last


@pytest.mark.parametrize("ratio", [0.90, 0.95])
def test_slower_than_the_margin_is_rarely_not_worse(ratio: float) -> None:
    """Decode 10% slower (and exactly 5%, the margin): `not_worse` at any look in at most 5%
    of runs, even with all of alpha on the primary; the naive interval at every look
    exceeds that at the margin."""
    d, v = decode_runs(9, ratio, 0.15)
    claims = sum(Primary.NOT_WORSE in row for row in outcomes_at_looks(d, v, ALPHA, 0.05))
    assert not above_five_percent(claims), claims / RUNS
    if ratio == 0.95:
        naive_low = d - naive(v, ALPHA, TIME_SCALE)
        assert above_five_percent(int((naive_low > math.log(0.95)).any(axis=1).sum()))


# --- the streaming state and the verdict -------------------------------------------------------


def test_stream_matches_batch_variance_with_and_without_sessions() -> None:
    """Welford and the per-session sums give numpy's variance and the direct CR1 formula."""
    rng = np.random.default_rng(10)
    x = rng.normal(5.0, 0.4, 500)
    plain = MeanStream()
    for value in x:
        plain.add(float(value), None)
    m = plain.moments()
    assert m.mean == pytest.approx(x.mean()) and m.units == 500 and not m.clustered
    assert m.variance == pytest.approx(x.var(ddof=1) / 500)

    sessions = rng.integers(0, 30, 500)
    cells: dict[int, list[float]] = {}
    clustered = MeanStream()
    for value, s in zip(x, sessions, strict=True):
        clustered.add(float(value), cells.setdefault(int(s), [0.0, 0.0]))
    c = clustered.moments()
    ids = np.unique(sessions)
    sums = np.array([x[sessions == g].sum() for g in ids])
    counts = np.array([(sessions == g).sum() for g in ids])
    expected = len(ids) / (len(ids) - 1) * ((sums - x.mean() * counts) ** 2).sum() / 500**2
    assert c.clustered and c.units == len(ids)
    assert c.variance == pytest.approx(expected)


def test_stream_of_singleton_sessions_equals_the_plain_variance() -> None:
    rng = np.random.default_rng(11)
    stream = MeanStream()
    x = rng.normal(0.0, 1.0, 200)
    for value in x:
        stream.add(float(value), [0.0, 0.0])
    assert stream.moments().variance == pytest.approx(x.var(ddof=1) / 200)


def test_decide_agrees_with_the_simulations_formulas() -> None:
    """The streaming state and `decide` give, at each look, the intervals the simulations
    compute from the same requests: mean, variance of the mean, `half_width`, the budget.
    A failed request counts for the error rate only."""
    rng = np.random.default_rng(12)
    budget = alpha_budget(ALPHA, 1, len(GUARDRAILS))
    arm, base = log_metrics(rng, 3, 300, speedup=1.1), log_metrics(rng, 3, 300)
    for r in range(3):
        states = {"baseline": ArmState(), "spec": ArmState()}
        for i in range(300):
            states["spec"].observe(_observation(arm, r, i))
            states["baseline"].observe(_observation(base, r, i))
            if (i + 1) % 50:
                continue
            verdict = decide(states, "baseline")
            assert verdict.arms["spec"].primary.interval.alpha == budget.primary
            for metric in Metric:
                got = (
                    verdict.arms["spec"].primary.interval
                    if metric is Metric.DECODE_TPS
                    else verdict.arms["spec"].guardrails[metric].interval
                )
                low, high = _expected_bounds(metric, arm, base, r, i + 1, got.alpha)
                assert (got.low, got.high) == pytest.approx((low, high), rel=1e-9, abs=1e-12)


def _expected_bounds(
    metric: Metric,
    arm: dict[Metric, Array],
    base: dict[Metric, Array],
    r: int,
    n: int,
    alpha: float,
) -> tuple[float, float]:
    means, variances = [], []
    for data in (arm, base):
        ok = data[Metric.ERROR_RATE][r, :n] == 0
        x = data[metric][r, :n] if metric is Metric.ERROR_RATE else data[metric][r, :n][ok]
        means.append(x.mean())
        variances.append(x.var(ddof=1) / x.size)
        if metric is Metric.ERROR_RATE:
            variances[-1] = float(rate_variance(x.mean(), x.size, variances[-1]))
    d, v = means[0] - means[1], variances[0] + variances[1]
    scale = RATE_SCALE if metric is Metric.ERROR_RATE else TIME_SCALE
    w = float(half_width(v, alpha=alpha, scale=scale))
    if metric is Metric.ERROR_RATE:
        return d - w, d + w
    return math.exp(d - w), math.exp(d + w)


def _observation(data: dict[Metric, Array], run: int, i: int) -> Observation:
    if data[Metric.ERROR_RATE][run, i]:
        return Observation(error=True)
    return Observation(
        error=False,
        decode_tps=math.exp(data[Metric.DECODE_TPS][run, i]),
        ttft_ms=math.exp(data[Metric.TTFT_MS][run, i]),
        latency_ms=math.exp(data[Metric.LATENCY_MS][run, i]),
    )


def _state(
    values: dict[Metric, list[float]], errors: int = 0, session: str | None = None
) -> ArmState:
    state = ArmState()
    for i in range(len(values[Metric.DECODE_TPS])):
        state.observe(
            Observation(
                error=False,
                decode_tps=values[Metric.DECODE_TPS][i],
                ttft_ms=values[Metric.TTFT_MS][i],
                latency_ms=values[Metric.LATENCY_MS][i],
                session=session and f"{session}{i % 12}",
            )
        )
    for _ in range(errors):
        state.observe(Observation(error=True, session=session and f"{session}0"))
    return state


def _values(
    rng: np.random.Generator, decode: float, latency: float, n: int = 200
) -> dict[Metric, list[float]]:
    return {
        Metric.DECODE_TPS: list(rng.lognormal(math.log(decode), 0.1, n)),
        Metric.TTFT_MS: list(rng.lognormal(math.log(200), 0.1, n)),
        Metric.LATENCY_MS: list(rng.lognormal(math.log(latency), 0.1, n)),
    }


def test_verdict_reads_better_and_harm_from_the_intervals() -> None:
    """A clearly faster arm with clearly slower latency and more errors: `better`, and harm
    on latency and error rate but not on TTFT; each interval says its n and alpha."""
    rng = np.random.default_rng(13)
    states = {
        "baseline": _state(_values(rng, 30, 2000)),
        "spec": _state(_values(rng, 45, 2600), errors=40),
    }
    arm = decide(states, "baseline").arms["spec"]
    assert arm.primary.outcome is Primary.BETTER
    assert arm.primary.interval.low is not None and arm.primary.interval.low > 1.3
    outcomes = {m: g.outcome for m, g in arm.guardrails.items()}
    assert outcomes == {
        Metric.TTFT_MS: Guardrail.NO_HARM_DETECTED,
        Metric.LATENCY_MS: Guardrail.HARM,
        Metric.ERROR_RATE: Guardrail.HARM,
    }
    assert arm.harm
    rate = arm.guardrails[Metric.ERROR_RATE].interval
    assert (rate.n, rate.n_baseline) == (240, 200)
    assert rate.alpha == pytest.approx(0.025 / 3)
    assert rate.value == pytest.approx(40 / 240)


def test_primary_outcomes_at_the_margin() -> None:
    """Ratios: better above 1; not_worse above 1 - margin (even if entirely below 1);
    worse below 1 and reaching past the margin; else inconclusive. Lower-is-better mirrors."""

    def outcome(low: float, high: float, metric: Metric = Metric.DECODE_TPS) -> Primary:
        return primary_outcome(
            Interval(metric, 1.0, low, high, 0.05, None, 1, 1, 1, 1, False), 0.05
        )

    assert outcome(1.01, 1.2) is Primary.BETTER
    assert outcome(0.96, 1.1) is Primary.NOT_WORSE
    assert outcome(0.96, 0.99) is Primary.NOT_WORSE
    assert outcome(0.90, 0.99) is Primary.WORSE
    assert outcome(0.90, 1.10) is Primary.INCONCLUSIVE
    assert outcome(0.8, 0.99, Metric.LATENCY_MS) is Primary.BETTER
    assert outcome(0.9, 1.04, Metric.LATENCY_MS) is Primary.NOT_WORSE
    assert outcome(1.01, 1.2, Metric.LATENCY_MS) is Primary.WORSE
    none = Interval(Metric.DECODE_TPS, None, None, None, 0.05, None, 3, 3, 3, 3, False)
    assert primary_outcome(none, 0.05) is Primary.INCONCLUSIVE
    assert guardrail_outcome(none) is Guardrail.NO_HARM_DETECTED


def test_too_few_units_give_no_interval() -> None:
    """Below 10 sessions a side there is no interval, however many requests."""
    rng = np.random.default_rng(14)
    few = {
        "baseline": _state(_values(rng, 30, 2000), session="b"),
        "spec": _state(_values(rng, 60, 2000), session="s"),
    }
    arm = decide(few, "baseline").arms["spec"]
    assert arm.primary.interval.units == 12 and arm.primary.interval.n == 200
    assert arm.primary.outcome is Primary.BETTER  # 12 sessions: enough
    few["spec"] = _state(_values(rng, 60, 2000, n=9))
    arm = decide(few, "baseline").arms["spec"]
    assert arm.primary.outcome is Primary.INCONCLUSIVE and arm.primary.interval.low is None


def test_p_value_agrees_with_the_interval() -> None:
    """The always-valid p-value is below alpha exactly when the interval excludes 0."""
    for estimate in np.linspace(-0.3, 0.3, 61):
        w = float(half_width(0.004, alpha=0.05, scale=TIME_SCALE))
        p = always_valid_p(float(estimate), 0.004, scale=TIME_SCALE)
        if abs(abs(estimate) - w) > 1e-9:
            assert (p < 0.05) == (abs(estimate) > w), estimate


def test_sessions_past_the_cap_are_forgotten_oldest_first() -> None:
    """Memory stays bounded: past the cap the least recently seen session goes; a session
    seen again stays."""
    state = ArmState(session_cap=3)
    for key in ["a", "b", "c", "a", "d", "e"]:
        state.observe(Observation(error=False, decode_tps=30.0, session=key))
    assert list(state._open) == ["a", "d", "e"]
    assert (state.sessions, state.evicted, state.requests) == (5, 2, 6)
    assert state.moments(Metric.DECODE_TPS).units == 5
    assert SESSION_CAP >= 1000


def test_sample_ratio_counts_sessions_for_sticky_and_requests_for_split() -> None:
    """One session of 100 requests is one unit of assignment, not 100."""
    states = {"baseline": ArmState(), "spec": ArmState()}
    for i in range(60):
        states["baseline" if i % 2 else "spec"].observe(Observation(error=False, session=f"s{i}"))
    for _ in range(100):
        states["spec"].observe(Observation(error=False, session="s0"))
    for i in range(40):
        states["baseline" if i % 2 else "spec"].observe(Observation(error=False))
    checks = sample_ratios(states, {"baseline": 50, "spec": 50})
    assert checks["sessions"].observed == {"baseline": 30, "spec": 30}
    assert not checks["sessions"].mismatch
    assert checks["requests"].observed == {"baseline": 20, "spec": 20}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, "alpha must be in (0, 1), got 0.0"),
        ({"margin": 1.0}, "margin must be in [0, 1), got 1.0"),
        ({"primary": Metric.ERROR_RATE}, "the primary metric must be a time"),
        ({"primary_share": 1.0}, "primary_share 1 leaves no alpha for the guardrails"),
    ],
)
def test_bad_arguments_name_what_was_wrong(kwargs: dict[str, object], message: str) -> None:
    states = {"baseline": ArmState(), "spec": ArmState()}
    with pytest.raises(ValueError, match=re.escape(message)):
        decide(states, "baseline", **kwargs)  # type: ignore[arg-type]


def test_unknown_baseline_is_named() -> None:
    with pytest.raises(ValueError, match="no state for the baseline 'base'"):
        decide({"spec": ArmState()}, "base")


def test_alpha_budget_sums_to_alpha() -> None:
    """Bonferroni: every interval's alpha, over arms and metrics, adds up to alpha."""
    budget = alpha_budget(0.05, 3, 3)
    assert 3 * (budget.primary + 3 * budget.guardrail) == pytest.approx(0.05)
    assert alpha_budget(0.05, 2, 0).primary == 0.025


def test_unmeasured_and_non_positive_times_are_skipped() -> None:
    state = ArmState()
    state.observe(Observation(error=False, decode_tps=0.0, ttft_ms=None, latency_ms=math.inf))
    state.observe(Observation(error=False, decode_tps=10.0))
    assert state.moments(Metric.DECODE_TPS).n == 1
    assert state.moments(Metric.LATENCY_MS).n == 0
    assert state.moments(Metric.ERROR_RATE).n == 2


def test_compare_uses_metric_scale() -> None:
    moments = Moments(100, 100, 0.0, 0.001, False)
    interval = compare(moments, moments, Metric.ERROR_RATE, alpha=0.05)
    assert interval.value == 0.0 and interval.low is not None
    assert interval.low == pytest.approx(-float(half_width(0.002, alpha=0.05, scale=RATE_SCALE)))

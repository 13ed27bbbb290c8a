"""Always-valid A/B statistics: a verdict that stays valid however often it is read.

A fixed-horizon test (`proxy.stats`) holds at one sample size chosen in advance; read every 50
requests until it says something, it finds a difference between identical backends far more
often than 5% of the time. This module gives confidence sequences instead: intervals that
cover the true value at every sample size at once, with probability 1 - alpha. Stopping
whenever one of them excludes "no difference" is then a valid test, however many looks.

The interval. For times (decode tokens/s, TTFT, latency) the effect is the ratio of
geometric means, arm / baseline: the difference d of the means of log(value), exp of its
bounds. For the error rate it is the difference of proportions. Either way the estimate d
has an estimated variance v (the two arms' variances of the mean, added), and the interval
is d +- w with the normal-mixture boundary (Howard, Ramdas, McAuliffe, Sekhon 2021; the
mixture SPRT of Johari et al. 2017, which Optimizely runs):

    w = sqrt( v (v + tau^2) / tau^2 * log( (v + tau^2) / (v alpha^2) ) )

It is asymptotic in the sense of Waudby-Smith et al. 2023 ("Time-uniform central limit
theory and asymptotic confidence sequences", the CS Eppo uses): exact for normal data with
known variance, and valid in the limit with v estimated, for any distribution with a finite
variance. `tau` is the effect size the mixture bets on: the interval is narrowest relative
to a fixed-horizon one when its half-width is near tau. Defaults: log(1.10) for times (the
10% of `proxy.stats.DEFAULT_EFFECT`), 0.02 (two percentage points) for the error rate. The
price of peeking is a wider interval: at alpha 0.025, about 1.5x the fixed-horizon
half-width near the tuning point, up to 2.4x when the interval is still far wider than tau
(computed for log-sd 0.8: 2.4x at 50 requests per arm, 1.7x at 200, 1.47-1.57x from 500 to
20,000). In sample size, 80% power comes at 1.7-2.3x the fixed-horizon sample size
(simulated in tests/test_sequential.py).

Sessions. Sticky routing assigns sessions, not requests, and requests of one session are
alike, so requests are not independent. When requests carry a `session`, the variance of
a mean is the cluster-robust (CR1) one over sessions: with Y_g and n_g the sum and count of
session g, mean m = sum Y_g / N, G sessions,

    v = G / (G - 1) * sum_g (Y_g - m n_g)^2 / N^2

which is the plain s^2 / N when every request is its own session. It is kept in O(1) per
request from running sums of Y_g^2, Y_g n_g and n_g^2 plus each open session's (n_g, Y_g).
At most `session_cap` sessions are tracked per arm; past it the least recently seen one is
forgotten (its sums stay in the totals), and if it comes back it counts as a new session:
the variance then treats its two halves as independent, slightly too small. `evicted`
counts them.

Multiplicity (Bonferroni, which holds at every stopping time, since each confidence
sequence already holds at all times at once): alpha is split equally between the k
compared arms; within an arm the primary metric gets `primary_share` of it (default half)
and the guardrails share the rest equally. With three guardrails and alpha 0.05: one arm,
primary 0.025 and each guardrail 0.0083; three arms, 0.0083 and 0.0028. The chance that
any interval of any arm misses its true value at any look is then at most alpha, so is the
chance of any false verdict. (Holm over always-valid p-values would also be valid at any
stopping time, but gives no matching intervals.) Each guardrail is one-sided (harm only),
tested with the two-sided interval at its alpha, which is conservative.

Verdicts, per arm: the primary metric is `better` (interval entirely on the good side of
1), `not_worse` (not better, but the interval excludes a loss bigger than `margin`),
`worse` (entirely on the bad side, and not ruling out a loss bigger than the margin) or
`inconclusive`;
each guardrail `harm` (entirely on the bad side) or `no_harm_detected`. Fewer than
`proxy.stats.MIN_VERDICT_SAMPLES` units (sessions, or requests without sessions) on a side
give no interval, hence `inconclusive` / `no_harm_detected`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from proxy.stats import DEFAULT_EFFECT, MIN_VERDICT_SAMPLES, SampleRatio, shares

FloatArray = npt.NDArray[np.float64]

TIME_SCALE = math.log1p(DEFAULT_EFFECT)  # tau for log-ratio effects
RATE_SCALE = 0.02  # tau for error-rate differences: two percentage points
SESSION_CAP = 10_000  # sessions tracked per arm: about 8 MB (measured, 32-character keys)


class Metric(StrEnum):
    DECODE_TPS = "decode_tps"
    TTFT_MS = "ttft_ms"
    LATENCY_MS = "latency_ms"
    ERROR_RATE = "error_rate"


TIMES = (Metric.DECODE_TPS, Metric.TTFT_MS, Metric.LATENCY_MS)
HIGHER_IS_BETTER = {
    Metric.DECODE_TPS: True,
    Metric.TTFT_MS: False,
    Metric.LATENCY_MS: False,
    Metric.ERROR_RATE: False,
}
GUARDRAILS = (Metric.TTFT_MS, Metric.LATENCY_MS, Metric.ERROR_RATE)


class Primary(StrEnum):
    BETTER = "better"
    NOT_WORSE = "not_worse"
    WORSE = "worse"
    INCONCLUSIVE = "inconclusive"


class Guardrail(StrEnum):
    HARM = "harm"
    NO_HARM_DETECTED = "no_harm_detected"


# --- the boundary ----------------------------------------------------------------------------


def half_width(variance: npt.ArrayLike, *, alpha: float, scale: float) -> FloatArray:
    """Half-width of the normal-mixture confidence sequence for an estimate of this variance.

    Vectorised: `variance` may be an array (the tests simulate thousands of experiments at
    once). A variance of 0 gives 0; an infinite one, infinity.
    """
    _check_alpha(alpha)
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    v = np.asarray(variance, dtype=np.float64)
    tau2 = scale * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        log_term = np.log1p(tau2 / v) - 2.0 * math.log(alpha)
        width = np.sqrt(v * (v + tau2) / tau2 * log_term)
    return np.where(v > 0, width, 0.0)


def always_valid_p(estimate: float, variance: float, *, scale: float) -> float:
    """1 / the mixture likelihood ratio against "no difference": P(ever this low) <= p.

    The interval at level alpha excludes 0 exactly when this is below alpha. Not monotone
    in time: a caller that stops at the first p below alpha keeps the running minimum.
    """
    if variance <= 0:
        return 1.0 if estimate == 0 else 0.0
    tau2 = scale * scale
    log_ratio = 0.5 * math.log(variance / (variance + tau2)) + tau2 * estimate**2 / (
        2.0 * variance * (variance + tau2)
    )
    return 1.0 if log_ratio <= 0 else math.exp(-log_ratio)


# --- streaming state ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Moments:
    """What the interval needs from one arm's metric."""

    n: int  # values
    units: int  # independent units: sessions when clustered, else values
    mean: float
    variance: float  # of the mean
    clustered: bool


@dataclass
class MeanStream:
    """Running mean and the variance of the mean of one metric of one arm, O(1) per value.

    Welford's count, mean and M2 give the variance for independent values. The cluster
    sums are of values shifted by the first one seen (the CR1 variance is shift-invariant,
    and shifting keeps sum-of-squares cancellation away), one term per session.
    """

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    shift: float | None = None
    clusters: int = 0
    sessions_seen: bool = False
    sum_yy: float = 0.0  # sum over sessions of Y_g^2
    sum_yn: float = 0.0  # of Y_g n_g
    sum_nn: float = 0.0  # of n_g^2

    def add(self, value: float, cell: list[float] | None) -> None:
        """Add one value; `cell` is its session's running [n_g, Y_g] (None: no session)."""
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)
        if self.shift is None:
            self.shift = value
        y = value - self.shift
        n_g, y_g = (0.0, 0.0) if cell is None else (cell[0], cell[1])
        self.clusters += n_g == 0
        self.sum_yy += 2.0 * y_g * y + y * y
        self.sum_yn += y_g + y * n_g + y
        self.sum_nn += 2.0 * n_g + 1.0
        if cell is not None:
            self.sessions_seen = True
            cell[0], cell[1] = n_g + 1.0, y_g + y

    @classmethod
    def of(cls, values: FloatArray, sessions: npt.NDArray[np.integer]) -> MeanStream:
        """The stream that adding `values` in this order would leave, in a few numpy
        passes (a report reads a million requests): `sessions` numbers each value's session
        (negative: none). Unlike `ArmState`, nothing is forgotten: no session cap."""
        n = int(values.size)
        if n == 0:
            return cls()
        mean = float(values.mean())
        shift = float(values[0])
        y = values - shift
        grouped = sessions >= 0
        _, index = np.unique(sessions[grouped], return_inverse=True)
        y_g = np.bincount(index, weights=y[grouped])
        n_g = np.bincount(index).astype(np.float64)
        alone = y[~grouped]
        return cls(
            n=n,
            mean=mean,
            m2=float(np.square(values - mean).sum()),
            shift=shift,
            clusters=int(y_g.size + alone.size),
            sessions_seen=bool(grouped.any()),
            sum_yy=float(np.square(y_g).sum() + np.square(alone).sum()),
            sum_yn=float((y_g * n_g).sum() + alone.sum()),
            sum_nn=float(np.square(n_g).sum() + alone.size),
        )

    def moments(self) -> Moments:
        if not self.sessions_seen:
            variance = self.m2 / (self.n - 1) / self.n if self.n > 1 else math.inf
            return Moments(self.n, self.n, self.mean, variance, clustered=False)
        g, total = self.clusters, float(self.n)
        m = (self.mean - (self.shift or 0.0)) if self.n else 0.0
        spread = self.sum_yy - 2.0 * m * self.sum_yn + m * m * self.sum_nn
        variance = g / (g - 1) * max(spread, 0.0) / (total * total) if g > 1 else math.inf
        return Moments(self.n, g, self.mean, variance, clustered=True)


@dataclass(frozen=True)
class Observation:
    """One request as the verdict sees it: an error, or its figures (None: not measured).

    `error` counts for the error rate; the figures only for successful requests (give None
    for a failed one). TTFT of a non-stream request is the time to its whole answer: give
    None. `session` is the keyed hash of the sticky header's value, None for split traffic.
    """

    error: bool
    decode_tps: float | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    session: str | None = None


@dataclass
class ArmState:
    """Everything the verdict needs about one arm, in memory bounded by `session_cap`."""

    session_cap: int = SESSION_CAP
    requests: int = 0
    split_requests: int = 0  # requests without a session
    sessions: int = 0  # distinct sessions seen (a session forgotten and back counts twice)
    evicted: int = 0
    streams: dict[Metric, MeanStream] = field(
        default_factory=lambda: {metric: MeanStream() for metric in Metric}
    )
    _open: OrderedDict[str, dict[Metric, list[float]]] = field(
        default_factory=OrderedDict, init=False, repr=False
    )

    def observe(self, observation: Observation) -> None:
        self.requests += 1
        cells = self._cells(observation.session)
        self.streams[Metric.ERROR_RATE].add(
            float(observation.error), _cell(cells, Metric.ERROR_RATE)
        )
        if observation.error:
            return
        for metric in TIMES:
            value = getattr(observation, metric.value)
            if value is not None and value > 0 and math.isfinite(value):
                self.streams[metric].add(math.log(value), _cell(cells, metric))

    def moments(self, metric: Metric) -> Moments:
        return self.streams[metric].moments()

    def _cells(self, session: str | None) -> dict[Metric, list[float]] | None:
        if session is None:
            self.split_requests += 1
            return None
        cells = self._open.get(session)
        if cells is not None:
            self._open.move_to_end(session)
            return cells
        self.sessions += 1
        cells = self._open[session] = {}
        if len(self._open) > self.session_cap:
            self._open.popitem(last=False)
            self.evicted += 1
        return cells


def _cell(cells: dict[Metric, list[float]] | None, metric: Metric) -> list[float] | None:
    if cells is None:
        return None
    cell = cells.get(metric)
    if cell is None:
        cell = cells[metric] = [0.0, 0.0]
    return cell


# --- the verdict -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """An always-valid interval of one metric, arm against baseline.

    Times: `value`, `low`, `high` are ratios arm / baseline of geometric means. Error rate:
    differences arm - baseline of proportions. None where there is too little data.
    """

    metric: Metric
    value: float | None
    low: float | None
    high: float | None
    alpha: float  # the share of the family's alpha this interval used
    p_value: float | None  # always-valid, against "no difference"
    n: int
    n_baseline: int
    units: int  # sessions when clustered, else requests
    units_baseline: int
    clustered: bool


@dataclass(frozen=True)
class PrimaryVerdict:
    outcome: Primary
    interval: Interval
    margin: float


@dataclass(frozen=True)
class GuardrailVerdict:
    outcome: Guardrail
    interval: Interval


@dataclass(frozen=True)
class ArmVerdict:
    primary: PrimaryVerdict
    guardrails: dict[Metric, GuardrailVerdict]

    @property
    def harm(self) -> bool:
        return any(g.outcome is Guardrail.HARM for g in self.guardrails.values())


@dataclass(frozen=True)
class Verdict:
    baseline: str
    alpha: float
    primary: Metric
    arms: dict[str, ArmVerdict]


@dataclass(frozen=True)
class Budget:
    primary: float
    guardrail: float


def alpha_budget(alpha: float, arms: int, guardrails: int, primary_share: float = 0.5) -> Budget:
    """Bonferroni split of alpha: equally between arms, then primary vs each guardrail."""
    _check_alpha(alpha)
    if arms < 1:
        raise ValueError(f"arms must be at least 1, got {arms}")
    if not 0.0 < primary_share <= 1.0:
        raise ValueError(f"primary_share must be in (0, 1], got {primary_share}")
    per_arm = alpha / arms
    if guardrails == 0:
        return Budget(per_arm, 0.0)
    if primary_share == 1.0:
        raise ValueError("primary_share 1 leaves no alpha for the guardrails")
    return Budget(per_arm * primary_share, per_arm * (1.0 - primary_share) / guardrails)


def compare(
    arm: Moments, baseline: Moments, metric: Metric, *, alpha: float, scale: float | None = None
) -> Interval:
    """The always-valid interval of `metric`, arm against baseline, at level alpha."""
    scale = (
        scale if scale is not None else (RATE_SCALE if metric is Metric.ERROR_RATE else TIME_SCALE)
    )
    counts = (arm.n, baseline.n, arm.units, baseline.units, arm.clustered or baseline.clustered)
    if min(arm.units, baseline.units) < MIN_VERDICT_SAMPLES:
        return Interval(metric, None, None, None, alpha, None, *counts)
    estimate = arm.mean - baseline.mean
    variance = arm.variance + baseline.variance
    if metric is Metric.ERROR_RATE:
        variance = float(rate_variance(arm.mean, arm.n, arm.variance)) + float(
            rate_variance(baseline.mean, baseline.n, baseline.variance)
        )
    width = float(half_width(variance, alpha=alpha, scale=scale))
    p = always_valid_p(estimate, variance, scale=scale)
    low, high = estimate - width, estimate + width
    if metric is Metric.ERROR_RATE:  # a difference of proportions lies in [-1, 1]
        low, high = max(low, -1.0), min(high, 1.0)
    else:
        estimate, low, high = math.exp(estimate), math.exp(low), math.exp(high)
    return Interval(metric, estimate, low, high, alpha, p, *counts)


def decide(
    states: Mapping[str, ArmState],
    baseline: str,
    *,
    alpha: float = 0.05,
    primary: Metric = Metric.DECODE_TPS,
    margin: float = 0.05,
    guardrails: Sequence[Metric] | None = None,
    primary_share: float = 0.5,
    planned_arms: int | None = None,
) -> Verdict:
    """The verdict of every arm against `baseline`, valid at whatever moment it is asked.

    `margin` is the non-inferiority margin of the primary metric, relative: 0.05 means
    "not more than 5% worse" (a ratio above 0.95 for decode, below 1.05 for a time).
    `guardrails` default to the other metrics of TTFT, latency and error rate.
    `planned_arms` is how many arms alpha is split between: by default those in `states`
    besides the baseline; to add arms mid-way without spending more than alpha, plan for
    them from the start.
    """
    if primary is Metric.ERROR_RATE:
        raise ValueError("the primary metric must be a time (decode_tps, ttft_ms, latency_ms)")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if baseline not in states:
        raise ValueError(f"no state for the baseline {baseline!r}")
    guards = tuple(g for g in (GUARDRAILS if guardrails is None else guardrails) if g != primary)
    arms = [name for name in states if name != baseline]
    budget = alpha_budget(alpha, planned_arms or max(len(arms), 1), len(guards), primary_share)
    base = states[baseline]
    verdicts = {}
    for name in arms:
        state = states[name]
        main = compare(state.moments(primary), base.moments(primary), primary, alpha=budget.primary)
        checks = {
            g: compare(state.moments(g), base.moments(g), g, alpha=budget.guardrail) for g in guards
        }
        verdicts[name] = ArmVerdict(
            PrimaryVerdict(primary_outcome(main, margin), main, margin),
            {g: GuardrailVerdict(guardrail_outcome(i), i) for g, i in checks.items()},
        )
    return Verdict(baseline, alpha, primary, verdicts)


def primary_outcome(interval: Interval, margin: float) -> Primary:
    """Better beats not-worse beats worse: an arm worse by less than the margin is not_worse."""
    if interval.low is None or interval.high is None:
        return Primary.INCONCLUSIVE
    if HIGHER_IS_BETTER[interval.metric]:
        good, bad, within = interval.low > 1.0, interval.high < 1.0, interval.low > 1.0 - margin
    else:
        good, bad, within = interval.high < 1.0, interval.low > 1.0, interval.high < 1.0 + margin
    if good:
        return Primary.BETTER
    if within:
        return Primary.NOT_WORSE
    return Primary.WORSE if bad else Primary.INCONCLUSIVE


def guardrail_outcome(interval: Interval) -> Guardrail:
    if interval.low is None or interval.high is None:
        return Guardrail.NO_HARM_DETECTED
    no_change = 0.0 if interval.metric is Metric.ERROR_RATE else 1.0
    if HIGHER_IS_BETTER[interval.metric]:
        harm = interval.high < no_change
    else:
        harm = interval.low > no_change
    return Guardrail.HARM if harm else Guardrail.NO_HARM_DETECTED


def sample_ratios(
    states: Mapping[str, ArmState], expected_pct: Mapping[str, float], *, threshold: float = 0.001
) -> dict[str, SampleRatio]:
    """Sample ratio checks by unit of assignment: sessions for sticky traffic, requests for
    split traffic (`sequential_sample_ratio` on each), keyed "sessions" / "requests"; only
    the kinds of traffic present. Sequential, so valid however often they are read."""
    checks = {}
    sessions = {name: state.sessions for name, state in states.items()}
    requests = {name: state.split_requests for name, state in states.items()}
    for unit, counts in (("sessions", sessions), ("requests", requests)):
        if any(counts.values()):
            checks[unit] = sequential_sample_ratio(counts, expected_pct, alpha=threshold)
    return checks


SRM_CONCENTRATION = 100.0  # the Dirichlet prior's total weight: see sequential_sample_ratio


def sequential_sample_ratio(
    observed: Mapping[str, int], expected_pct: Mapping[str, float], *, alpha: float = 0.001
) -> SampleRatio:
    """A sample ratio check valid at any look: the Dirichlet-multinomial mixture Bayes
    factor of the counts against the expected shares (Lindon and Malek 2022, "Anytime-valid
    inference for multinomial count data"), prior Dirichlet(`SRM_CONCENTRATION` x share).

        BF = B(a + x) / B(a) / prod(p_i ^ x_i),  B(a) = prod Gamma(a_i) / Gamma(sum a_i)

    Under the expected shares BF is a nonnegative martingale of mean 1, so by Ville's
    inequality it ever reaches 1/alpha with probability at most alpha, however often it is
    read: `p_value` is min(1, 1/BF), and `mismatch` is p_value < alpha. The concentration
    sets what the test is quickest to see: with 100, 55/45 against 50/50 was flagged in
    every one of 100 seeded runs read every 100 requests up to 5,000, at a median of 1,750
    (300 to 4,000; tests/test_verdict.py), and 70/30 at a median of 200. A request to a backend with
    weight 0 (or missing from the split) is a routing bug, not chance: p 0."""
    _check_alpha(alpha)
    counts, expected_share, observed_share = shares(observed, expected_pct)
    total = sum(counts.values())
    p_value: float | None
    if not total:
        p_value = None
    elif any(count and name not in expected_share for name, count in counts.items()):
        p_value = 0.0
    else:
        log_bf = _log_mixture_bf([counts[n] for n in expected_share], list(expected_share.values()))
        p_value = min(1.0, math.exp(-log_bf)) if log_bf < 745 else 0.0
    mismatch = p_value is not None and p_value < alpha
    return SampleRatio(counts, expected_share, observed_share, p_value, mismatch)


def _log_mixture_bf(counts: Sequence[int], shares: Sequence[float]) -> float:
    prior = [SRM_CONCENTRATION * p for p in shares]

    def log_beta(a: Sequence[float]) -> float:
        return sum(math.lgamma(x) for x in a) - math.lgamma(sum(a))

    posterior = [a + x for a, x in zip(prior, counts, strict=True)]
    null = sum(x * math.log(p) for x, p in zip(counts, shares, strict=True) if x)
    return log_beta(posterior) - log_beta(prior) - null


def rate_variance(rate: npt.ArrayLike, n: npt.ArrayLike, variance: npt.ArrayLike) -> FloatArray:
    """The variance of an error rate's mean, never below that of a rate of (errors + 1) /
    (n + 2): with no errors yet, an arm's interval would otherwise have zero width."""
    p, count = np.asarray(rate, dtype=np.float64), np.asarray(n, dtype=np.float64)
    smoothed = (p * count + 1.0) / (count + 2.0)
    return np.maximum(np.asarray(variance, dtype=np.float64), smoothed * (1.0 - smoothed) / count)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")

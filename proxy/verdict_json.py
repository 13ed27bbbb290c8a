"""A sequential verdict as JSON: the one shape of `GET /verdict` and of the report's part.

Both build `sequential.ArmState`s (the proxy as requests finish, the report from the log),
ask `sequential.decide` for the `Verdict`, and turn it into this document here, so a
reader sees the same keys with the same meaning in both:

    {"schema": 1, "baseline": "baseline", "primary": "decode_tps", "alpha": 0.05,
     "margin": 0.05,
     "counts": {"baseline": COUNTS, "speculative": COUNTS},
     "arms": {"speculative": {
         "error_rate": {"arm": 0.0, "baseline": 0.0012},
         "primary": {"metric": "decode_tps", "verdict": "better", "margin": 0.05,
                     "interval": INTERVAL},
         "guardrails": {"ttft_ms": {"verdict": "no_harm_detected", "interval": INTERVAL},
                        "latency_ms": {...}, "error_rate": {...}},
         "harm": false}},
     "sample_ratio": {"sessions": {"observed": {...}, "expected_share": {...},
                                   "observed_share": {...}, "p_value": 0.61,
                                   "mismatch": false}},
     "notes": ["..."]}

    COUNTS = {"requests": 812, "sessions": 64, "split_requests": 0, "evicted": 0}
    INTERVAL = {"effect": "ratio", "value": 1.42, "low": 1.21, "high": 1.66,
                "alpha": 0.025, "p_value": 0.0001,
                "n": {"arm": 812, "baseline": 790}, "units": {"arm": 64, "baseline": 61},
                "unit": "sessions"}

`counts` are of every backend compared, the baseline's included: requests (errors too),
distinct sessions, requests without a session, and sessions forgotten past the cap of
tracked ones (see sequential.py). `effect` is "ratio" (arm / baseline of geometric means)
for times, "difference" (arm - baseline) for the error rate; `value`, `low`, `high` and
`p_value` are null while a side has fewer than `proxy.stats.MIN_VERDICT_SAMPLES` units.
`unit` is "sessions" when either side's requests carried sessions, else "requests".
`margin` is null when nothing is compared. `sample_ratio` has an entry per unit of
assignment present ("sessions" for sticky traffic, "requests" for split traffic).
Non-finite numbers are null.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from proxy.sequential import (
    ArmState,
    ArmVerdict,
    Interval,
    Metric,
    Verdict,
    sample_ratios,
)
from proxy.stats import MIN_VERDICT_SAMPLES, SampleRatio

SCHEMA = 1


def verdict_json(
    verdict: Verdict,
    states: Mapping[str, ArmState],
    expected_pct: Mapping[str, float],
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The document for `verdict`, decided from `states` (one per backend, the baseline's
    included) under a split of `expected_pct` (percent by backend); `notes` are the
    caller's, after those this function draws from the data."""
    base = states[verdict.baseline]
    arms = {name: _arm(arm, states[name], base) for name, arm in verdict.arms.items()}
    ratios = sample_ratios(states, expected_pct)
    margins = [arm.primary.margin for arm in verdict.arms.values()]
    return {
        "schema": SCHEMA,
        "baseline": verdict.baseline,
        "primary": verdict.primary.value,
        "alpha": verdict.alpha,
        "margin": margins[0] if margins else None,
        "counts": {name: _counts(state) for name, state in states.items()},
        "arms": arms,
        "sample_ratio": {unit: _ratio(check) for unit, check in ratios.items()},
        "notes": [*_notes(verdict, states, ratios), *notes],
    }


def _arm(verdict: ArmVerdict, state: ArmState, base: ArmState) -> dict[str, Any]:
    primary = verdict.primary
    return {
        "error_rate": {"arm": _error_rate(state), "baseline": _error_rate(base)},
        "primary": {
            "metric": primary.interval.metric.value,
            "verdict": primary.outcome.value,
            "margin": primary.margin,
            "interval": interval_json(primary.interval),
        },
        "guardrails": {
            metric.value: {"verdict": g.outcome.value, "interval": interval_json(g.interval)}
            for metric, g in verdict.guardrails.items()
        },
        "harm": verdict.harm,
    }


def _counts(state: ArmState) -> dict[str, int]:
    return {
        "requests": state.requests,
        "sessions": state.sessions,
        "split_requests": state.split_requests,
        "evicted": state.evicted,
    }


def interval_json(interval: Interval) -> dict[str, Any]:
    return {
        "effect": "difference" if interval.metric is Metric.ERROR_RATE else "ratio",
        "value": _number(interval.value),
        "low": _number(interval.low),
        "high": _number(interval.high),
        "alpha": interval.alpha,
        "p_value": _number(interval.p_value),
        "n": {"arm": interval.n, "baseline": interval.n_baseline},
        "units": {"arm": interval.units, "baseline": interval.units_baseline},
        "unit": "sessions" if interval.clustered else "requests",
    }


def _ratio(check: SampleRatio) -> dict[str, Any]:
    data = asdict(check)
    data["p_value"] = _number(check.p_value)
    return data


def _error_rate(state: ArmState) -> float | None:
    moments = state.moments(Metric.ERROR_RATE)
    return moments.mean if moments.n else None


def _notes(
    verdict: Verdict, states: Mapping[str, ArmState], ratios: Mapping[str, SampleRatio]
) -> list[str]:
    notes = []
    for unit, check in ratios.items():
        if check.mismatch:
            notes.append(
                f"sample ratio mismatch in {unit} (p {check.p_value:.2g}): the arms differ in"
                " more than their backend, so no comparison between them is fair until the"
                " cause is found (failover, a client choosing its backend, a routing bug)"
            )
    for name, arm in verdict.arms.items():
        interval = arm.primary.interval
        if interval.low is None:
            unit = "sessions" if interval.clustered else "requests"
            notes.append(
                f"{name}: fewer than {MIN_VERDICT_SAMPLES} {unit} on a side"
                f" ({interval.units} against {interval.units_baseline}): no interval yet"
            )
    for name, state in states.items():
        if state.evicted:
            notes.append(
                f"{name}: {state.evicted} sessions were forgotten past the cap of"
                f" {state.session_cap} and counted again on return: the intervals are"
                " slightly too narrow"
            )
    return notes


def _number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None

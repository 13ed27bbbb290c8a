"""A sequential verdict as JSON: the one shape of a verdict, in the report and `GET /verdict`.

`verdict_json(verdict)` is a pure function of a `sequential.Verdict`; the report's
`verdict.result` is exactly that. `GET /verdict` is the same document with what the live
state knows besides (`experiment_json`): counts, each arm's error rates, the sample ratio
check and notes. So both show the same keys with the same meaning:

    {"baseline": "baseline", "alpha": 0.05, "primary": "decode_tps",
     "arms": {"speculative": {
         "primary": {**INTERVAL, "margin": 0.05},
         "guardrails": {"ttft_ms": INTERVAL, "latency_ms": INTERVAL, "error_rate": INTERVAL},
         "harm": false}}}

    INTERVAL = {"metric": "decode_tps", "verdict": "better", "ratio": 1.42, "low": 1.21,
                "high": 1.66, "alpha": 0.025, "p_value": 0.0001, "n": 812,
                "n_baseline": 790, "units": 64, "units_baseline": 61, "clustered": true,
                "unit": "ratio"}

`verdict` is a `Primary` or `Guardrail` value. `unit` says what `ratio`, `low` and `high`
are: "ratio" (arm / baseline of geometric means, for times) or "difference" (arm -
baseline, for the error rate). `units` count sessions when `clustered` (the requests
carried sessions), else requests. Figures are null while a side has fewer than
`proxy.stats.MIN_VERDICT_SAMPLES` units; non-finite numbers are null.

`experiment_json` adds: `schema`; `margin` (null when nothing is compared); `counts` per
backend compared, the baseline's included (`requests`, errors too; distinct `sessions`;
`split_requests`, those without a session; `evicted`, sessions forgotten past the cap of
tracked ones, see sequential.py); per arm `error_rate` {`arm`, `baseline`}; `sample_ratio`
per unit of assignment present (`sessions` for sticky traffic, `requests` for split
traffic); and `notes`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from proxy.sequential import ArmState, Interval, Metric, Verdict, sample_ratios
from proxy.stats import MIN_VERDICT_SAMPLES, SampleRatio

SCHEMA = 1


def verdict_json(verdict: Verdict) -> dict[str, Any]:
    return {
        "baseline": verdict.baseline,
        "alpha": verdict.alpha,
        "primary": verdict.primary.value,
        "arms": {
            name: {
                "primary": {
                    **_interval(arm.primary.interval, arm.primary.outcome.value),
                    "margin": arm.primary.margin,
                },
                "guardrails": {
                    metric.value: _interval(g.interval, g.outcome.value)
                    for metric, g in arm.guardrails.items()
                },
                "harm": arm.harm,
            }
            for name, arm in verdict.arms.items()
        },
    }


def experiment_json(
    verdict: Verdict,
    states: Mapping[str, ArmState],
    expected_pct: Mapping[str, float],
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """`verdict_json`, and what `states` (one per backend, the baseline's included) under a
    split of `expected_pct` (percent by backend) tell besides; `notes` are the caller's,
    after those drawn from the data."""
    document = verdict_json(verdict)
    base = states[verdict.baseline]
    for name, arm in document["arms"].items():
        arm["error_rate"] = {"arm": _error_rate(states[name]), "baseline": _error_rate(base)}
    ratios = sample_ratios(states, expected_pct)
    margins = [arm.primary.margin for arm in verdict.arms.values()]
    document.update(
        schema=SCHEMA,
        margin=margins[0] if margins else None,
        counts={name: _counts(state) for name, state in states.items()},
        sample_ratio={unit: _ratio(check) for unit, check in ratios.items()},
        notes=[*_notes(verdict, states, ratios), *notes],
    )
    return document


def _interval(interval: Interval, outcome: str) -> dict[str, Any]:
    return {
        "metric": interval.metric.value,
        "verdict": outcome,
        "ratio": _number(interval.value),
        "low": _number(interval.low),
        "high": _number(interval.high),
        "alpha": interval.alpha,
        "p_value": _number(interval.p_value),
        "n": interval.n,
        "n_baseline": interval.n_baseline,
        "units": interval.units,
        "units_baseline": interval.units_baseline,
        "clustered": interval.clustered,
        "unit": "difference" if interval.metric is Metric.ERROR_RATE else "ratio",
    }


def _counts(state: ArmState) -> dict[str, int]:
    return {
        "requests": state.requests,
        "sessions": state.sessions,
        "split_requests": state.split_requests,
        "evicted": state.evicted,
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
                " cause is found (requests count for the arm they were assigned to, moved"
                " or not, so look for a routing bug or lines missing from the log)"
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

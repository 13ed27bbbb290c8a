"""A `sequential.Verdict` as JSON: the one shape of a verdict, for the report and the proxy.

    {"baseline": "baseline", "alpha": 0.05, "primary": "decode_tps",
     "arms": {"speculative": {
         "primary": {"metric", "verdict", "ratio", "low", "high", "alpha", "p_value",
                     "n", "n_baseline", "units", "units_baseline", "clustered", "unit",
                     "margin"},
         "guardrails": {"ttft_ms": {...the same keys but margin...}, ...},
         "harm": false}}}

`verdict` is a `Primary` or `Guardrail` value; `unit` says what `ratio`, `low`, `high`
are: "ratio" (arm / baseline of geometric means, times) or "difference" (arm - baseline,
the error rate). Nulls where there is too little data. A pure function of the verdict.
"""

from __future__ import annotations

import math
from typing import Any

from proxy.sequential import Interval, Metric, Verdict


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


def _interval(interval: Interval, outcome: str) -> dict[str, Any]:
    return {
        "metric": interval.metric.value,
        "verdict": outcome,
        "ratio": _finite(interval.value),
        "low": _finite(interval.low),
        "high": _finite(interval.high),
        "alpha": interval.alpha,
        "p_value": _finite(interval.p_value),
        "n": interval.n,
        "n_baseline": interval.n_baseline,
        "units": interval.units,
        "units_baseline": interval.units_baseline,
        "clustered": interval.clustered,
        "unit": "difference" if interval.metric is Metric.ERROR_RATE else "ratio",
    }


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: an unbounded figure is null."""
    return value if value is not None and math.isfinite(value) else None

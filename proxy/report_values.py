"""Figures as the report's JSON holds them: plain floats, null for anything missing (never
NaN), ISO 8601 times. Shared by `proxy.report` and `proxy.report_routing`."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import numpy as np

from proxy import stats
from proxy.logread import Floats


def finite(values: Floats) -> Floats:
    return values[np.isfinite(values)]


def median(values: Floats) -> float | None:
    values = finite(values)
    return float(np.median(values)) if values.size else None


def quantile(values: Floats, q: float) -> float | None:
    """The q-th percentile of the finite values, or null when there are none."""
    values = finite(values)
    return float(np.percentile(values, q)) if values.size else None


def number(value: float | np.floating[Any] | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def estimate(value: stats.Estimate) -> dict[str, Any]:
    return {
        "value": number(value.value),
        "low": number(value.low),
        "high": number(value.high),
        "n": int(value.n),
    }


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(float(seconds), UTC).isoformat().replace("+00:00", "Z")


def time_span(timestamps: Floats) -> tuple[str | None, str | None]:
    """The first and last of these times (seconds since the epoch), or nulls."""
    times = finite(timestamps)
    return (iso(times.min()), iso(times.max())) if times.size else (None, None)

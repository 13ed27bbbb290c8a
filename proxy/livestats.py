"""Per-backend figures since the proxy started, for `GET /stats`, in bounded memory; and
the same for each replica of a backend (`replicas`, by URL).

Counts are exact. Percentiles come from a uniform reservoir sample of each metric (Vitter's
algorithm R, 2048 values per metric and backend): every request since start has the same
chance to be in it, memory stays fixed, and the p50/p90 it gives are within a few percent
of the exact ones. The full report (`python -m proxy report`) reads the logs for exact
figures and confidence intervals.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from proxy.accesslog import RequestRecord

RESERVOIR_SIZE = 2048
METRICS = ("ttft_ms", "latency_ms", "decode_tps")
# A replica's: what tells one slow server from the rest of its arm, at half the cost.
REPLICA_METRICS = ("ttft_ms", "decode_tps")


@dataclass
class Reservoir:
    size: int = RESERVOIR_SIZE
    seen: int = 0
    values: list[float] = field(default_factory=list)

    def add(self, value: float, rng: random.Random) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            # Not `randrange`: a Python function, three times per request. A float's 53 bits
            # keep the draw uniform to within seen / 2**53.
            slot = int(rng.random() * self.seen)
            if slot < self.size:
                self.values[slot] = value

    def percentiles(self) -> dict[str, float | None]:
        ordered = sorted(self.values)
        return {f"p{q}": _percentile(ordered, q) for q in (50, 90, 99)}


@dataclass
class BackendStats:
    requests: int = 0
    experiment: int = 0  # routed at random and served there: A/B data (`Reason.is_experiment`)
    errors: int = 0
    client_disconnects: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    reservoirs: dict[str, Reservoir] = field(
        default_factory=lambda: {metric: Reservoir() for metric in METRICS}
    )
    shadow_checks: int = 0
    shadow_matches: int = 0
    # Each replica's own figures (the same, less the shadow checks), by URL.
    replicas: dict[str, BackendStats] = field(default_factory=dict)


class LiveStats:
    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()
        self._backends: dict[str, BackendStats] = {}

    def observe(self, record: RequestRecord) -> None:
        if record.backend is None:
            return
        stats = self._stats(record.backend)
        self._count(stats, record)
        if record.replica is not None:
            replica = stats.replicas.get(record.replica)
            if replica is None:
                reservoirs = {metric: Reservoir() for metric in REPLICA_METRICS}
                replica = stats.replicas[record.replica] = BackendStats(reservoirs=reservoirs)
            self._count(replica, record)

    def _count(self, stats: BackendStats, record: RequestRecord) -> None:
        stats.requests += 1
        stats.errors += record.error is not None
        stats.client_disconnects += record.client_disconnected
        if record.reason is not None:
            stats.by_reason[record.reason] = stats.by_reason.get(record.reason, 0) + 1
            stats.experiment += record.reason.is_experiment
        if record.error is None and record.status == 200:
            for metric, reservoir in stats.reservoirs.items():
                value = getattr(record, metric)
                if value is not None:
                    reservoir.add(value, self._rng)

    def observe_shadow(self, source: str, match: bool) -> None:
        stats = self._stats(source)
        stats.shadow_checks += 1
        stats.shadow_matches += match

    def _stats(self, backend: str) -> BackendStats:
        stats = self._backends.get(backend)
        if stats is None:  # not `setdefault`: it would build a BackendStats every time
            stats = self._backends[backend] = BackendStats()
        return stats

    def snapshot(self) -> dict[str, Any]:
        return {name: _summary(stats) for name, stats in sorted(self._backends.items())}


def _summary(stats: BackendStats) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "requests": stats.requests,
        "experiment_requests": stats.experiment,
        "errors": stats.errors,
        "error_rate": round(stats.errors / stats.requests, 4) if stats.requests else None,
        "client_disconnects": stats.client_disconnects,
        "by_reason": dict(sorted(stats.by_reason.items())),
    }
    for metric, reservoir in stats.reservoirs.items():
        summary[metric] = {"n": reservoir.seen, **reservoir.percentiles()}
    if stats.shadow_checks:
        summary["shadow"] = {
            "checks": stats.shadow_checks,
            "match_rate": round(stats.shadow_matches / stats.shadow_checks, 4),
        }
    if stats.replicas:
        summary["replicas"] = {url: _summary(r) for url, r in sorted(stats.replicas.items())}
    return summary


def _percentile(ordered: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks, as numpy's default."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (position - low), 3)

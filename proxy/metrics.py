"""`GET /metrics`: the proxy's live figures in the Prometheus text format.

Each app has its own registry (no global one), so several proxies in one process (tests)
never share counters. Per-request figures are observed once, when the request's log line
is written; gauges (in flight, queued, health, config) are read from the running state at
scrape time by a collector, so they cost nothing per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.accesslog import RequestRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a few ms (a fake or tiny model) to the minutes a CPU prefill can take.
_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TPS_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500)


@dataclass(frozen=True, slots=True)
class BackendGauges:
    """One backend's state at scrape time."""

    name: str
    in_flight: int
    queued: int
    healthy: bool
    ejections: int


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], tuple[str, Iterable[BackendGauges]]]):
        self._read = read

    def collect(self) -> Iterator[Metric]:
        version, backends = self._read()
        in_flight = GaugeMetricFamily(
            "specproxy_in_flight", "Requests being answered by the backend", labels=["backend"]
        )
        queued = GaugeMetricFamily(
            "specproxy_queued", "Requests waiting for a concurrency slot", labels=["backend"]
        )
        healthy = GaugeMetricFamily(
            "specproxy_backend_healthy",
            "1 if the backend takes traffic, 0 if ejected",
            labels=["backend"],
        )
        ejections = CounterMetricFamily(
            "specproxy_backend_ejections",
            "Times the backend was ejected as unhealthy",
            labels=["backend"],
        )
        for b in backends:
            in_flight.add_metric([b.name], b.in_flight)
            queued.add_metric([b.name], b.queued)
            healthy.add_metric([b.name], 1 if b.healthy else 0)
            ejections.add_metric([b.name], b.ejections)
        config = GaugeMetricFamily(
            "specproxy_config_info", "The effective routes config", labels=["config_version"]
        )
        config.add_metric([version], 1)
        yield from (in_flight, queued, healthy, ejections, config)


class Metrics:
    def __init__(self, read_state: Callable[[], tuple[str, Iterable[BackendGauges]]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "specproxy_requests", "Finished requests", ["backend", "status", "reason"], registry=r
        )
        self._errors = Counter(
            "specproxy_request_errors",
            "Requests that ended in an error",
            ["backend", "error"],
            registry=r,
        )
        self._fallbacks = Counter(
            "specproxy_fallbacks",
            "Requests moved off the backend first chosen",
            ["from_backend", "to_backend", "cause"],
            registry=r,
        )
        self._ttft = Histogram(
            "specproxy_ttft_seconds",
            "Time to first token (non-stream: to the answer's head)",
            ["backend", "stream"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self._latency = Histogram(
            "specproxy_latency_seconds",
            "Time to the last byte",
            ["backend", "stream"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self._decode = Histogram(
            "specproxy_decode_tokens_per_second",
            "Decode speed of streamed answers",
            ["backend"],
            buckets=_TPS_BUCKETS,
            registry=r,
        )
        self._queue = Histogram(
            "specproxy_queue_wait_seconds",
            "Wait for a concurrency slot",
            ["backend"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self._shadow = Counter(
            "specproxy_shadow_checks", "Shadow checks by outcome", ["outcome"], registry=r
        )
        self._reloads = Counter(
            "specproxy_config_reloads", "Config reloads by outcome", ["outcome"], registry=r
        )
        r.register(_StateCollector(read_state))
        self._children: dict[tuple[str, bool], tuple[Histogram, ...]] = {}
        self._request_children: dict[tuple[str, int | None, str | None], Counter] = {}

    def observe(self, record: RequestRecord) -> None:
        backend = record.backend or "none"  # rejected before routing: bad body, auth
        self._counted(backend, record.status, record.reason).inc()
        if record.error is not None:
            self._errors.labels(backend, record.error).inc()
        if record.fallback_from is not None:
            self._fallbacks.labels(
                record.fallback_from, backend, record.fallback_cause or "unknown"
            ).inc()
        ttft, latency, decode, queue = self._timings(backend, record.stream)
        if record.ttft_ms is not None:
            ttft.observe(record.ttft_ms / 1000)
        if record.latency_ms is not None:
            latency.observe(record.latency_ms / 1000)
        if record.decode_tps is not None:
            decode.observe(record.decode_tps)
        if record.queue_ms is not None:
            queue.observe(record.queue_ms / 1000)

    def _counted(self, backend: str, status: int | None, reason: str | None) -> Counter:
        """The request counter's child for these labels, looked up once (see `_timings`)."""
        key = (backend, status, reason)
        child = self._request_children.get(key)
        if child is None:
            labels = (backend, str(status), reason or "none")
            child = self._request_children[key] = self._requests.labels(*labels)
        return child

    def _timings(self, backend: str, stream: bool) -> tuple[Histogram, ...]:
        """The labelled histograms of a backend, looked up once: `labels()` takes a lock
        and builds a key on every call, and this runs for every request."""
        key = (backend, stream)
        found = self._children.get(key)
        if found is None:
            flag = "true" if stream else "false"
            found = self._children[key] = (
                self._ttft.labels(backend, flag),
                self._latency.labels(backend, flag),
                self._decode.labels(backend),
                self._queue.labels(backend),
            )
        return found

    def shadow(self, outcome: str) -> None:
        """ "match", "mismatch", "failed" or "dropped"."""
        self._shadow.labels(outcome).inc()

    def reload(self, outcome: str) -> None:
        """ "applied" or "rejected"."""
        self._reloads.labels(outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

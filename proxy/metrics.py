"""`GET /metrics`: the proxy's live figures in the Prometheus text format.

Each app has its own registry (no global one), so several proxies in one process (tests)
never share counters. Per-request figures are plain Python numbers, added to once, when the
request's log line is written, and turned into metric families only at scrape time;
gauges (in flight, queued, health, config) are read from the running state at scrape time
too, and so is the live verdict (decided once per scrape). None costs a lock or a
prometheus_client call per request.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import accumulate

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy import sequential
from proxy.accesslog import RequestRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a few ms (a fake or tiny model) to the minutes a CPU prefill can take.
_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TPS_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500)


@dataclass(frozen=True, slots=True)
class BackendGauges:
    """One replica's state at scrape time (a backend of one server has one)."""

    name: str
    replica: str  # its URL
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
        per_replica = _replica_families()
        arms: dict[str, list[BackendGauges]] = {}
        for b in backends:
            arms.setdefault(b.name, []).append(b)
            labels = [b.name, b.replica]
            per_replica[0].add_metric(labels, b.in_flight)
            per_replica[1].add_metric(labels, b.queued)
            per_replica[2].add_metric(labels, 1 if b.healthy else 0)
            per_replica[3].add_metric(labels, b.ejections)
        for name, replicas in arms.items():  # an arm: the sum of its replicas; healthy if any
            in_flight.add_metric([name], sum(b.in_flight for b in replicas))
            queued.add_metric([name], sum(b.queued for b in replicas))
            healthy.add_metric([name], 1 if any(b.healthy for b in replicas) else 0)
            ejections.add_metric([name], sum(b.ejections for b in replicas))
        config = GaugeMetricFamily(
            "specproxy_config_info", "The effective routes config", labels=["config_version"]
        )
        config.add_metric([version], 1)
        yield from (in_flight, queued, healthy, ejections, *per_replica, config)


def _replica_families() -> tuple[
    GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily
]:
    labels = ["backend", "replica"]
    return (
        GaugeMetricFamily(
            "specproxy_replica_in_flight", "Requests being answered by the replica", labels=labels
        ),
        GaugeMetricFamily(
            "specproxy_replica_queued", "Requests waiting for one of its slots", labels=labels
        ),
        GaugeMetricFamily(
            "specproxy_replica_healthy",
            "1 if the replica takes traffic, 0 if ejected",
            labels=labels,
        ),
        CounterMetricFamily(
            "specproxy_replica_ejections", "Times the replica was ejected", labels=labels
        ),
    )


class _VerdictCollector(Collector):
    def __init__(self, read: Callable[[], sequential.Verdict]):
        self._read = read

    def collect(self) -> Iterator[Metric]:
        ratio = GaugeMetricFamily(
            "specproxy_verdict_ratio",
            "Arm / baseline of a time's geometric mean, and the bounds of its always-valid"
            " interval (GET /verdict); absent while there are too few requests",
            labels=["arm", "metric", "bound"],
        )
        for arm, verdict in self._read().arms.items():
            for interval in (
                verdict.primary.interval,
                *(g.interval for g in verdict.guardrails.values()),
            ):
                if interval.metric is sequential.Metric.ERROR_RATE:
                    continue  # a difference, not a ratio: in /verdict
                bounds = (("value", interval.value), ("low", interval.low), ("high", interval.high))
                for bound, value in bounds:
                    if value is not None:
                        ratio.add_metric([arm, interval.metric.value, bound], value)
        yield ratio


class _Histogram:
    """One labelled histogram: a count per bucket (not cumulative; the last is +Inf)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (`le`).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


_Counts = dict[tuple[str, ...], int]


def _counter(name: str, doc: str, labels: list[str], counts: _Counts) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, count in counts.items():
        family.add_metric(values, count)
    return family


def _histogram(
    name: str, doc: str, labels: list[str], series: Mapping[tuple[str, ...], _Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, h in series.items():
        les = [*map(floatToGoString, h.bounds), "+Inf"]  # as prometheus_client writes them
        family.add_metric(values, list(zip(les, accumulate(h.counts), strict=True)), h.sum)
    return family


class _Figures(Collector):
    """The per-request figures, as metric families when the registry is scraped.

    No locks: observe, shadow, reload and render all run on the proxy's one event-loop
    thread, so no two of them ever interleave.
    """

    def __init__(self) -> None:
        # Keyed as observed; made label values when scraped (see `collect`).
        self.requests: dict[tuple[str, int | None, str | None], int] = {}
        self.errors: _Counts = {}
        self.fallbacks: _Counts = {}
        self.shadow: _Counts = {}
        self.reloads: _Counts = {}
        self.ttft: dict[tuple[str, ...], _Histogram] = {}
        self.latency: dict[tuple[str, ...], _Histogram] = {}
        self.decode: dict[tuple[str, ...], _Histogram] = {}
        self.queue: dict[tuple[str, ...], _Histogram] = {}
        # Per replica (backend, URL): enough to see one slow or failing server in a fleet.
        self.replica_requests: dict[tuple[str, str, int | None], int] = {}
        self.replica_ttft: dict[tuple[str, ...], _Histogram] = {}
        self.replica_decode: dict[tuple[str, ...], _Histogram] = {}

    def collect(self) -> Iterator[Metric]:
        requests: _Counts = {}
        for (backend, status, reason), count in self.requests.items():
            labels = (backend, str(status), reason or "none")
            requests[labels] = requests.get(labels, 0) + count
        backend_stream = ["backend", "stream"]
        yield from (
            _counter(
                "specproxy_requests", "Finished requests", ["backend", "status", "reason"], requests
            ),
            _counter(
                "specproxy_request_errors",
                "Requests that ended in an error",
                ["backend", "error"],
                self.errors,
            ),
            _counter(
                "specproxy_fallbacks",
                "Requests moved off the backend first chosen",
                ["from_backend", "to_backend", "cause"],
                self.fallbacks,
            ),
            _histogram(
                "specproxy_ttft_seconds",
                "Time to first token (non-stream: to the answer's head)",
                backend_stream,
                self.ttft,
            ),
            _histogram(
                "specproxy_latency_seconds", "Time to the last byte", backend_stream, self.latency
            ),
            _histogram(
                "specproxy_decode_tokens_per_second",
                "Decode speed of streamed answers",
                ["backend"],
                self.decode,
            ),
            _histogram(
                "specproxy_queue_wait_seconds",
                "Wait for a concurrency slot",
                ["backend"],
                self.queue,
            ),
            _counter(
                "specproxy_replica_requests",
                "Finished requests, by the replica that served them last",
                ["backend", "replica", "status"],
                {(b, r, str(status)): n for (b, r, status), n in self.replica_requests.items()},
            ),
            _histogram(
                "specproxy_replica_ttft_seconds",
                "Time to first token, by replica",
                ["backend", "replica"],
                self.replica_ttft,
            ),
            _histogram(
                "specproxy_replica_decode_tokens_per_second",
                "Decode speed of streamed answers, by replica",
                ["backend", "replica"],
                self.replica_decode,
            ),
            _counter(
                "specproxy_shadow_checks", "Shadow checks by outcome", ["outcome"], self.shadow
            ),
            _counter(
                "specproxy_config_reloads", "Config reloads by outcome", ["outcome"], self.reloads
            ),
        )


class Metrics:
    def __init__(
        self,
        read_state: Callable[[], tuple[str, Iterable[BackendGauges]]],
        read_verdict: Callable[[], sequential.Verdict] | None = None,
    ):
        self.registry = CollectorRegistry()
        self._figures = _Figures()
        self.registry.register(self._figures)
        self.registry.register(_StateCollector(read_state))
        if read_verdict is not None:
            self.registry.register(_VerdictCollector(read_verdict))
        self._requests = self._figures.requests  # one attribute less on every request
        self._timings: dict[tuple[str, bool], tuple[_Histogram, ...]] = {}
        self._replica_timings: dict[tuple[str, str], tuple[_Histogram, _Histogram]] = {}

    def observe(self, record: RequestRecord) -> None:
        backend = record.backend or "none"  # rejected before routing: bad body, auth
        key = (backend, record.status, record.reason)
        self._requests[key] = self._requests.get(key, 0) + 1
        if record.error is not None:
            _add(self._figures.errors, (backend, record.error))
        if record.fallback_from is not None:
            cause = record.fallback_cause or "unknown"
            _add(self._figures.fallbacks, (record.fallback_from, backend, cause))
        timings = self._timings.get((backend, record.stream)) or self._add_timings(
            backend, record.stream
        )
        ttft, latency, decode, queue = timings
        if record.ttft_ms is not None:
            ttft.observe(record.ttft_ms / 1000)
        if record.latency_ms is not None:
            latency.observe(record.latency_ms / 1000)
        if record.decode_tps is not None:
            decode.observe(record.decode_tps)
        if record.queue_ms is not None:
            queue.observe(record.queue_ms / 1000)
        if record.replica is not None:
            self._observe_replica(record, backend, record.replica)

    def _observe_replica(self, record: RequestRecord, backend: str, replica: str) -> None:
        counts = self._figures.replica_requests
        key = (backend, replica, record.status)
        counts[key] = counts.get(key, 0) + 1
        timings = self._replica_timings.get((backend, replica))
        if timings is None:
            timings = self._replica_timings[backend, replica] = (
                self._figures.replica_ttft.setdefault(
                    (backend, replica), _Histogram(_TIME_BUCKETS)
                ),
                self._figures.replica_decode.setdefault(
                    (backend, replica), _Histogram(_TPS_BUCKETS)
                ),
            )
        if record.ttft_ms is not None:
            timings[0].observe(record.ttft_ms / 1000)
        if record.decode_tps is not None:
            timings[1].observe(record.decode_tps)

    def _add_timings(self, backend: str, stream: bool) -> tuple[_Histogram, ...]:
        """A backend's histograms, made on its first request (so, as before, a backend's
        series show from then on, at zero until observed) and looked up once per request.
        Decode speed and queue wait are by backend only: both streams share them."""
        f = self._figures
        flag = "true" if stream else "false"
        found = self._timings[backend, stream] = (
            f.ttft.setdefault((backend, flag), _Histogram(_TIME_BUCKETS)),
            f.latency.setdefault((backend, flag), _Histogram(_TIME_BUCKETS)),
            f.decode.setdefault((backend,), _Histogram(_TPS_BUCKETS)),
            f.queue.setdefault((backend,), _Histogram(_TIME_BUCKETS)),
        )
        return found

    def shadow(self, outcome: str) -> None:
        """ "match", "mismatch", "failed" or "dropped"."""
        _add(self._figures.shadow, (outcome,))

    def reload(self, outcome: str) -> None:
        """ "applied" or "rejected"."""
        _add(self._figures.reloads, (outcome,))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _add(counts: _Counts, labels: tuple[str, ...]) -> None:
    counts[labels] = counts.get(labels, 0) + 1

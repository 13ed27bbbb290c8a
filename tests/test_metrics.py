"""`Metrics`: what a scrape exposes after given requests, shadow checks and reloads."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.accesslog import RequestRecord
from proxy.metrics import BackendGauges, Metrics

# The exposed buckets, pinned: dashboards and alerts are written against them.
TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TPS_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500)
# The bounds in ms, as records carry them: k / 1000 is exactly the bound (asserted below).
TIME_BOUNDS_MS = tuple(round(b * 1000) for b in TIME_BUCKETS)
HISTOGRAMS = (
    "specproxy_ttft_seconds",
    "specproxy_latency_seconds",
    "specproxy_decode_tokens_per_second",
    "specproxy_queue_wait_seconds",
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def no_state() -> tuple[str, list[BackendGauges]]:
    return "v1", []


def scrape(text: bytes, *prefixes: str) -> Samples:
    """The samples whose names start with one of `prefixes`, without `_created`."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if s.name.startswith(prefixes) and not s.name.endswith("_created")
    }


def record(**fields: Any) -> RequestRecord:
    return RequestRecord(request_id="r", **fields)


def reference(records: list[RequestRecord]) -> bytes:
    """The same observations through prometheus_client's own histograms."""
    r = CollectorRegistry()
    doc = "Time to first token (non-stream: to the answer's head)"
    ttft = Histogram(HISTOGRAMS[0], doc, ["backend", "stream"], buckets=TIME_BUCKETS, registry=r)
    doc = "Time to the last byte"
    latency = Histogram(HISTOGRAMS[1], doc, ["backend", "stream"], buckets=TIME_BUCKETS, registry=r)
    doc = "Decode speed of streamed answers"
    decode = Histogram(HISTOGRAMS[2], doc, ["backend"], buckets=TPS_BUCKETS, registry=r)
    doc = "Wait for a concurrency slot"
    queue = Histogram(HISTOGRAMS[3], doc, ["backend"], buckets=TIME_BUCKETS, registry=r)
    for rec in records:
        backend, flag = rec.backend or "none", "true" if rec.stream else "false"
        children = (
            ttft.labels(backend, flag),
            latency.labels(backend, flag),
            decode.labels(backend),
            queue.labels(backend),
        )
        values = (rec.ttft_ms, rec.latency_ms, rec.decode_tps, rec.queue_ms)
        scales = (1000, 1000, 1, 1000)
        for child, value, scale in zip(children, values, scales, strict=True):
            if value is not None:
                child.observe(value / scale)
    return generate_latest(r)


def around(bounds: tuple[float, ...]) -> st.SearchStrategy[float | None]:
    """None, zero, the bounds themselves and their neighbours, any value up to and well
    above the last bound."""
    on = st.sampled_from(bounds)
    return st.one_of(
        st.none(),
        st.just(0.0),
        on,
        on.map(lambda b: math.nextafter(b, math.inf)),
        on.map(lambda b: math.nextafter(b, 0)),
        st.floats(0, bounds[-1] * 2),
        st.floats(bounds[-1], 1e12),
    )


records = st.builds(
    record,
    backend=st.sampled_from(["baseline", "speculative", None]),
    stream=st.booleans(),
    status=st.just(200),
    ttft_ms=around(TIME_BOUNDS_MS),
    latency_ms=around(TIME_BOUNDS_MS),
    decode_tps=around(TPS_BUCKETS),
    queue_ms=around(TIME_BOUNDS_MS),
)


def test_the_ms_bounds_are_exactly_the_second_bounds() -> None:
    assert all(ms / 1000 == b for ms, b in zip(TIME_BOUNDS_MS, TIME_BUCKETS, strict=True))


@settings(deadline=None, database=None)  # no .hypothesis/ left in the repository
@given(st.lists(records, max_size=30))
def test_histograms_expose_what_prometheus_client_would(observed: list[RequestRecord]) -> None:
    metrics = Metrics(no_state)
    for rec in observed:
        metrics.observe(rec)
    ours, theirs = metrics.render(), reference(observed)
    assert scrape(ours, *HISTOGRAMS) == scrape(theirs, *HISTOGRAMS)
    # The parser makes prometheus_client's `_created` samples families of their own.
    described = [
        {
            (f.name, f.type, f.documentation)
            for f in text_string_to_metric_families(text.decode())
            if not f.name.endswith("_created")
        }
        for text in (ours, theirs)
    ]
    assert described[1] <= described[0]


def test_a_value_on_a_bound_counts_in_that_bucket_and_those_above() -> None:
    metrics = Metrics(no_state)
    metrics.observe(record(backend="baseline", stream=True, ttft_ms=25.0, decode_tps=7.5))
    samples = scrape(metrics.render(), "specproxy_ttft_seconds_bucket", "specproxy_decode")
    buckets = {
        le: samples[
            "specproxy_ttft_seconds_bucket",
            (("backend", "baseline"), ("le", le), ("stream", "true")),
        ]
        for le in ("0.01", "0.025", "0.05", "+Inf")
    }
    assert buckets == {"0.01": 0, "0.025": 1, "0.05": 1, "+Inf": 1}
    decode = {
        le: samples[
            "specproxy_decode_tokens_per_second_bucket", (("backend", "baseline"), ("le", le))
        ]
        for le in ("5.0", "7.5", "10.0")
    }
    assert decode == {"5.0": 0, "7.5": 1, "10.0": 1}


def test_a_request_without_timings_observes_no_histogram_sample() -> None:
    metrics = Metrics(no_state)
    metrics.observe(record(backend="baseline", status=502, reason="split", stream=True))
    samples = scrape(metrics.render(), *HISTOGRAMS)
    assert samples and set(samples.values()) == {0}  # the series show, at zero
    metrics.observe(record(backend="baseline", status=200, stream=True, queue_ms=0.0))
    counts = {
        name: value
        for (name, _), value in scrape(metrics.render(), *HISTOGRAMS).items()
        if name.endswith("_count")
    }
    assert counts == {
        "specproxy_ttft_seconds_count": 0,
        "specproxy_latency_seconds_count": 0,
        "specproxy_decode_tokens_per_second_count": 0,
        "specproxy_queue_wait_seconds_count": 1,
    }


def test_counters_count_by_their_labels() -> None:
    metrics = Metrics(no_state)
    for rec in (
        record(backend="baseline", status=200, reason="split"),
        record(backend="baseline", status=200, reason="split", stream=True),
        record(backend="speculative", status=200, reason="header"),
        record(backend="baseline", status=502, reason="split", error="backend_error"),
        # Rejected before routing: no backend, no reason.
        record(status=400, error="invalid_request"),
        # Never answered: no status.
        record(backend="speculative", reason="split", error="client_disconnected"),
        record(
            backend="baseline",
            status=200,
            reason="split",
            fallback_from="speculative",
            fallback_cause="failed",
        ),
        record(backend="baseline", status=200, reason="split", fallback_from="speculative"),
    ):
        metrics.observe(rec)
    for outcome in ("match", "mismatch", "match", "failed", "dropped", "match"):
        metrics.shadow(outcome)
    for outcome in ("applied", "rejected", "rejected"):
        metrics.reload(outcome)
    samples = scrape(metrics.render(), "specproxy_")

    def family(name: str) -> dict[tuple[str, ...], float]:
        return {tuple(v for _, v in labels): n for (s, labels), n in samples.items() if s == name}

    # Label values in the order of their sorted names: backend, reason, status.
    assert family("specproxy_requests_total") == {
        ("baseline", "split", "200"): 4,
        ("speculative", "header", "200"): 1,
        ("baseline", "split", "502"): 1,
        ("none", "none", "400"): 1,
        ("speculative", "split", "None"): 1,
    }
    # backend, error
    assert family("specproxy_request_errors_total") == {
        ("baseline", "backend_error"): 1,
        ("none", "invalid_request"): 1,
        ("speculative", "client_disconnected"): 1,
    }
    # cause, from_backend, to_backend
    assert family("specproxy_fallbacks_total") == {
        ("failed", "speculative", "baseline"): 1,
        ("unknown", "speculative", "baseline"): 1,
    }
    assert family("specproxy_shadow_checks_total") == {
        ("match",): 3,
        ("mismatch",): 1,
        ("failed",): 1,
        ("dropped",): 1,
    }
    assert family("specproxy_config_reloads_total") == {("applied",): 1, ("rejected",): 2}


def test_state_is_read_at_scrape_time() -> None:
    states = [("v1", [BackendGauges("baseline", "http://b", 2, 1, healthy=True, ejections=0)])]
    metrics = Metrics(lambda: states[-1])
    assert scrape(metrics.render(), "specproxy_in_flight", "specproxy_config_info") == {
        ("specproxy_in_flight", (("backend", "baseline"),)): 2,
        ("specproxy_config_info", (("config_version", "v1"),)): 1,
    }
    states.append(("v2", [BackendGauges("baseline", "http://b", 0, 0, healthy=False, ejections=1)]))
    assert scrape(metrics.render(), "specproxy_backend", "specproxy_config_info") == {
        ("specproxy_backend_healthy", (("backend", "baseline"),)): 0,
        ("specproxy_backend_ejections_total", (("backend", "baseline"),)): 1,
        ("specproxy_config_info", (("config_version", "v2"),)): 1,
    }

"""The live verdict (`GET /verdict`): what counts, when it starts again, its memory, its
document; and through the proxy on real sockets, against fake backends paced apart."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from proxy.accesslog import RequestRecord
from proxy.config import Config, load_config, parse_config
from proxy.liveverdict import LiveVerdict
from proxy.metrics import Metrics
from proxy.routing import FallbackCause, Reason
from proxy.sequential import Guardrail, Metric, sequential_sample_ratio
from proxy.stats import sample_ratio
from tests.conftest import RunningProxy, make_config
from tests.fakebackend import FakeBackend, wait_until

CHAT = "/v1/chat/completions"
STREAM = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
V = "v1"


def config(split: dict[str, float] | None = None, **routing: Any) -> Config:
    return parse_config(
        {
            "model": "m",
            "backends": {
                "baseline": {"url": "http://127.0.0.1:1"},
                "speculative": {"url": "http://127.0.0.1:2"},
            },
            "routing": {"split": split or {"baseline": 50, "speculative": 50}, **routing},
            "logging": {"path": None},
        }
    )


def with_backend(extra: dict[str, Any] | None = None, **speculative: Any) -> Config:
    """`config()` with the speculative backend's fields changed, and `extra` backends."""
    definition = {k: v for k, v in {"url": "http://127.0.0.1:2", **speculative}.items() if v}
    return parse_config(
        {
            "model": "m",
            "backends": {
                "baseline": {"url": "http://127.0.0.1:1"},
                "speculative": definition,
                **(extra or {}),
            },
            "routing": {"split": {"baseline": 50, "speculative": 50}},
            "logging": {"path": None},
        }
    )


def record(backend: str = "speculative", reason: Reason = Reason.SPLIT, **fields: Any) -> Any:
    figures: dict[str, Any] = {
        "config_version": V,
        "stream": True,
        "status": 200,
        "ttft_ms": 50.0,
        "latency_ms": 200.0,
        "decode_tps": 20.0,
    }
    return RequestRecord("r", backend=backend, reason=reason, **{**figures, **fields})


def counted(live: LiveVerdict, name: str = "speculative") -> dict[Metric, int]:
    return {metric: live.states[name].moments(metric).n for metric in Metric}


def test_only_requests_assigned_at_random_count_and_for_the_arm_assigned() -> None:
    """Split and sticky count; forced, behind a shadow, under another config, left by the
    client, or rejected before routing do not. One moved off the baseline by failover
    counts for the baseline, as its error (intention to treat), not for where it went."""
    live = LiveVerdict(config(), V)
    live.observe(record(reason=Reason.SPLIT))
    live.observe(record(reason=Reason.STICKY, session="0123456789abcdef"))
    live.observe(record(reason=Reason.HEADER))
    moved = record(reason=Reason.FALLBACK, fallback_from="baseline")
    live.observe(dataclass_replace(moved, fallback_cause=FallbackCause.FAILED))
    live.observe(record(behind_shadow=True))
    live.observe(record(config_version="another"))
    live.observe(record(status=499, client_disconnected=True))
    live.observe(RequestRecord("r", status=400, error="bad_request"))
    assert live.states["speculative"].requests == 2
    assert live.states["speculative"].sessions == 1
    assert live.states["baseline"].requests == 1
    assert counted(live, "baseline") == {
        Metric.ERROR_RATE: 1,
        Metric.DECODE_TPS: 0,
        Metric.TTFT_MS: 0,
        Metric.LATENCY_MS: 0,
    }
    assert live.states["baseline"].moments(Metric.ERROR_RATE).mean == 1.0


@pytest.mark.parametrize("cause", list(FallbackCause))
def test_a_request_moved_off_its_arm_is_that_arms_error_whatever_the_cause(
    cause: FallbackCause,
) -> None:
    """Failed, ejected (unhealthy) or full: the arm did not serve what it was assigned,
    and what the fallback did then (here: answered, or was full too) is not its data."""
    live = LiveVerdict(config(), V)
    live.observe(record("baseline", Reason.FALLBACK, fallback_from="speculative",
                        fallback_cause=cause))  # fmt: skip
    live.observe(record("baseline", Reason.FALLBACK, fallback_from="speculative",
                        fallback_cause=cause, status=503, error="backend_busy"))  # fmt: skip
    assert live.states["baseline"].requests == 0
    errors = live.states["speculative"].moments(Metric.ERROR_RATE)
    assert (errors.n, errors.mean) == (2, 1.0)
    assert counted(live)[Metric.DECODE_TPS] == 0


def test_an_arm_failing_40_percent_retried_on_the_baseline_shows_harm_on_the_error_rate() -> None:
    """Review finding 4: the speculative arm fails 40% of what it is assigned before
    answering, and failover retries those on the baseline. Dropping the moved requests
    left it an error rate of 0 and `no_harm_detected`; by intention to treat it is 0.4."""
    live = LiveVerdict(config(), V)
    rng = random.Random(1)
    for _ in range(4000):
        if rng.random() < 0.5:
            live.observe(record("baseline"))
        elif rng.random() < 0.4:
            live.observe(record("baseline", Reason.FALLBACK, fallback_from="speculative",
                                fallback_cause=FallbackCause.FAILED))  # fmt: skip
        else:
            live.observe(record("speculative"))
    errors = live.states["speculative"].moments(Metric.ERROR_RATE)
    assert 0.35 < errors.mean < 0.45
    assert live.states["baseline"].moments(Metric.ERROR_RATE).mean == 0.0
    arm = live.snapshot().arms["speculative"]
    assert arm.guardrails[Metric.ERROR_RATE].outcome is Guardrail.HARM and arm.harm
    # counted for the arm assigned, the split stays 50/50: no sample ratio mismatch
    assert not live.document()["sample_ratio"]["requests"]["mismatch"]


def dataclass_replace(line: RequestRecord, **fields: Any) -> RequestRecord:
    return RequestRecord(**{**{f: getattr(line, f) for f in line.__slots__}, **fields})


def test_errors_count_for_the_error_rate_only_and_ttft_for_streams_only() -> None:
    """A stream the backend broke counts as its error even if the client then left."""
    live = LiveVerdict(config(), V)
    live.observe(record(status=502, error="backend_unreachable", ttft_ms=None))
    live.observe(record(status=200, error="stream_interrupted", client_disconnected=True))
    live.observe(record(stream=False, decode_tps=None))
    assert counted(live) == {
        Metric.ERROR_RATE: 3,
        Metric.DECODE_TPS: 0,
        Metric.TTFT_MS: 0,  # a non-stream answer's first byte is its last
        Metric.LATENCY_MS: 1,
    }
    assert live.states["speculative"].moments(Metric.ERROR_RATE).mean == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "line",
    [
        # the client stopped reading a complete-looking stream and was dropped (WriteWatch)
        record(status=200, error="client_write_timeout", client_disconnected=True),
        record(status=200, error="client_write_timeout"),
        # cut at shutdown after the grace period
        record(status=200, error="cancelled"),
        record(status=None, error="cancelled", ttft_ms=None),
        # the client hung up
        record(status=499, client_disconnected=True),
    ],
)
def test_what_the_client_or_the_shutdown_did_is_not_the_arms_error(line: RequestRecord) -> None:
    """Review finding 5: neither an error nor a timing of the arm."""
    live = LiveVerdict(config(), V)
    live.observe(line)
    assert live.states["speculative"].requests == 0
    assert set(counted(live).values()) == {0}


def test_a_reload_of_the_same_split_keeps_the_experiment_and_counts_its_version() -> None:
    live = LiveVerdict(config(), V)
    live.observe(record())
    since = live.since
    assert not live.follow(config(header="X-Other"), "v2")
    assert not live.follow(with_backend(timeouts={"connect": 9}, max_in_flight=4), "v2")
    live.observe(record(config_version="v2"))
    live.observe(record(config_version=V))  # in flight across the reload
    assert live.states["speculative"].requests == 3
    assert (live.since, live.version, live.versions) == (since, "v2", {V, "v2"})


@pytest.mark.parametrize(
    "changed",
    [
        config({"baseline": 70, "speculative": 30}),  # other assignment probabilities
        config(baseline="speculative"),  # another reference arm
        # review finding 6: the arm is another server, or runs another model
        with_backend(url="http://127.0.0.1:9"),
        with_backend(model="other-draft-setup"),
        with_backend(
            url=None, replicas=[{"url": "http://127.0.0.1:2"}, {"url": "http://127.0.0.1:3"}]
        ),
        config(sticky_header="X-Session"),  # another unit of assignment
        parse_config(  # another backend, even one out of the split
            {
                "model": "m",
                "backends": {
                    "baseline": {"url": "http://127.0.0.1:1"},
                    "speculative": {"url": "http://127.0.0.1:2"},
                    "third": {"url": "http://127.0.0.1:3"},
                },
                "routing": {"split": {"baseline": 50, "speculative": 50}},
            }
        ),
    ],
)
def test_a_reload_that_changes_the_experiment_starts_a_new_one(changed: Config) -> None:
    live = LiveVerdict(config(), V)
    live.observe(record())
    assert live.follow(changed, "v2")
    assert live.versions == {"v2"} and live.reason.startswith("reload")
    assert all(state.requests == 0 for state in live.states.values())
    live.observe(record())  # an old config's request, finishing late: not this experiment's
    assert all(state.requests == 0 for state in live.states.values())


def test_a_sticky_header_spelled_otherwise_or_an_unused_backend_moved_keeps_it() -> None:
    live = LiveVerdict(config(sticky_header="X-Session"), V)
    assert not live.follow(config(sticky_header="x-session"), "v2")
    three = {"third": {"url": "http://127.0.0.1:3"}}
    live = LiveVerdict(with_backend(extra=three), V)
    assert not live.follow(with_backend(extra={"third": {"url": "http://127.0.0.1:4"}}), "v2")
    assert live.follow(config(sticky_header="X-Session"), "v3")


def test_reset_drops_the_data_and_says_why() -> None:
    live = LiveVerdict(config(), V)
    live.observe(record())
    live.reset("ramp to 25%")
    assert live.states["speculative"].requests == 0 and live.reason == "ramp to 25%"
    assert live.document()["started_by"] == "ramp to 25%"


def test_the_sample_ratio_check_holds_its_alpha_however_often_it_is_read() -> None:
    """Review finding 11. Balanced 50/50 traffic, the check read every 100 requests up to
    5,000, 300 seeded runs at alpha 0.01: a false mismatch at any look in at most ~1% of
    runs. The control, the fixed-horizon test (`stats.sample_ratio`) read the same way,
    finds one far more often: peeking is what this guards against."""
    rng = np.random.default_rng(17)
    runs, alpha = 300, 0.01
    heads = np.cumsum(rng.random((runs, 5000)) < 0.5, axis=1)
    looks = range(100, 5001, 100)
    split = {"baseline": 50.0, "speculative": 50.0}
    sequential = fixed = 0
    for row in heads:
        counts = [{"baseline": int(row[n - 1]), "speculative": n - int(row[n - 1])} for n in looks]
        sequential += any(sequential_sample_ratio(c, split, alpha=alpha).mismatch for c in counts)
        fixed += any(sample_ratio(c, split, threshold=alpha).mismatch for c in counts)
    assert sequential / runs <= 0.015, sequential
    assert fixed / runs >= 0.05, fixed


def test_a_55_45_split_against_50_50_is_flagged_and_a_balanced_one_is_not() -> None:
    """At the live alpha (0.001): 100 seeded runs of 5,000 requests drawn 55/45, read every
    100, are each flagged by the end; through `/verdict`'s document too."""
    rng = np.random.default_rng(23)
    split = {"baseline": 50.0, "speculative": 50.0}
    heads = np.cumsum(rng.random((100, 5000)) < 0.55, axis=1)
    first = []
    for row in heads:
        for n in range(100, 5001, 100):
            counts = {"baseline": int(row[n - 1]), "speculative": n - int(row[n - 1])}
            if sequential_sample_ratio(counts, split).mismatch:
                first.append(n)
                break
    assert len(first) == 100 and float(np.median(first)) < 2500
    for share, mismatch in ((0.55, True), (0.5, False)):
        live = LiveVerdict(config(), V)
        draws = random.Random(5)
        for _ in range(5000):
            live.observe(record("baseline" if draws.random() < share else "speculative"))
        assert live.document()["sample_ratio"]["requests"]["mismatch"] is mismatch


def test_alpha_is_split_over_the_planned_arms_before_any_has_traffic() -> None:
    three = parse_config(
        {
            "model": "m",
            "backends": {name: {"url": f"http://127.0.0.1:{port}"} for port, name in
                         enumerate(("baseline", "a", "b", "off"), start=1)},
            "routing": {"split": {"baseline": 50, "a": 25, "b": 25}},
        }
    )  # fmt: skip
    live = LiveVerdict(three, V)
    verdict = live.snapshot()
    assert set(verdict.arms) == {"a", "b"}  # "off" has no share of the split
    assert verdict.arms["a"].primary.interval.alpha == pytest.approx(0.05 / 2 / 2)


def _records(n: int, rng: random.Random, sessions: bool) -> list[RequestRecord]:
    return [
        record(
            backend=rng.choice(("baseline", "speculative")),
            decode_tps=rng.lognormvariate(3, 0.3),
            ttft_ms=rng.lognormvariate(4, 0.3),
            latency_ms=rng.lognormvariate(5, 0.3),
            session=f"{i:016x}" if sessions else None,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("sessions", [False, True])
def test_memory_stays_bounded_over_100k_requests(sessions: bool) -> None:
    """Without sessions a few fixed numbers per arm; with a new session per request, at
    most the cap of tracked sessions (here 1000) per arm."""
    live = LiveVerdict(config(), V, session_cap=1000)
    records = _records(100_000, random.Random(3), sessions)  # made before tracing starts
    tracemalloc.start()
    try:
        for line in records[:20_000]:
            live.observe(line)
        early, _ = tracemalloc.get_traced_memory()
        for line in records[20_000:]:
            live.observe(line)
        late, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(state.requests for state in live.states.values()) == 100_000
    assert late - early < 64 * 1024, (early, late)  # not growing with the requests
    assert peak < (4 if sessions else 1) * 1024 * 1024, peak
    if sessions:
        assert all(state.evicted > 0 for state in live.states.values())


def test_the_document_has_the_shared_shape_and_is_strict_json() -> None:
    live = LiveVerdict(config(), V)
    for line in _records(200, random.Random(1), sessions=False):
        live.observe(line)
    document = live.document()
    json.dumps(document, allow_nan=False)  # what Starlette's JSONResponse demands
    assert set(document) == {
        "schema", "since", "started_by", "config_version", "config_versions", "baseline",
        "primary", "alpha", "margin", "counts", "arms", "sample_ratio", "notes",
    }  # fmt: skip
    assert (document["baseline"], document["primary"]) == ("baseline", "decode_tps")
    assert (document["alpha"], document["margin"], document["schema"]) == (0.05, 0.05, 1)
    assert set(document["counts"]) == {"baseline", "speculative"}
    arm = document["arms"]["speculative"]
    assert set(arm) == {"error_rate", "primary", "guardrails", "harm"}
    assert set(arm["guardrails"]) == {"ttft_ms", "latency_ms", "error_rate"}
    primary = arm["primary"]
    assert set(primary) == {
        "metric", "verdict", "ratio", "low", "high", "alpha", "p_value", "n", "n_baseline",
        "units", "units_baseline", "clustered", "unit", "margin",
    }  # fmt: skip
    assert primary["unit"] == "ratio" and primary["clustered"] is False
    assert primary["low"] < primary["ratio"] < primary["high"]
    assert arm["guardrails"]["error_rate"]["unit"] == "difference"
    assert set(document["sample_ratio"]) == {"requests"}


def test_too_few_requests_say_so_in_the_notes() -> None:
    live = LiveVerdict(config(), V)
    live.observe(record())
    document = live.document()
    assert document["arms"]["speculative"]["primary"]["verdict"] == "inconclusive"
    assert document["arms"]["speculative"]["primary"]["low"] is None
    assert any("fewer than 10 requests on a side" in note for note in document["notes"])


def test_metrics_show_the_ratios_once_there_is_an_interval() -> None:
    live = LiveVerdict(config(), V)
    metrics = Metrics(lambda: (V, iter(())), live.snapshot)
    assert b"specproxy_verdict_ratio{" not in metrics.render()  # no interval yet
    for line in _records(200, random.Random(2), sessions=False):
        live.observe(line)
    samples = [
        line
        for line in metrics.render().decode().splitlines()
        if line.startswith("specproxy_verdict_ratio{")
    ]
    # value, low and high of decode, TTFT and latency; the error rate is not a ratio
    assert len(samples) == 9 and not any("error_rate" in line for line in samples)


# --- through the proxy -------------------------------------------------------------------


def paced_proxy(
    serve_proxy: Any, tmp_path: Path, base: FakeBackend, spec: FakeBackend, **overrides: Any
) -> RunningProxy:
    urls = {"baseline": base.url, "speculative": spec.url}
    proxy: RunningProxy = serve_proxy(make_config(tmp_path, urls, **overrides))
    return proxy


def stream(proxy: RunningProxy, headers: dict[str, str] | None = None) -> None:
    with httpx.stream("POST", proxy.url + CHAT, json=STREAM, headers=headers, timeout=10) as r:
        assert r.status_code == 200
        r.read()


def verdict(proxy: RunningProxy) -> dict[str, Any]:
    answer = httpx.get(proxy.url + "/verdict", timeout=5)
    assert answer.status_code == 200 and answer.headers["x-request-id"]
    document: dict[str, Any] = answer.json()
    return document


def fewest_units(document: dict[str, Any]) -> int:
    primary = document["arms"]["speculative"]["primary"]
    return min(primary["units"], primary["units_baseline"])


def test_identical_backends_get_no_verdict_either_way(
    fake: FakeBackend, fake2: FakeBackend, serve_proxy: Any, tmp_path: Path
) -> None:
    for backend in (fake, fake2):
        backend.extra_mode = "tokens=6; delay=0.004"
    proxy = paced_proxy(serve_proxy, tmp_path, fake, fake2)
    for _ in range(100):  # bounded: 20 a side is reached in about 45
        stream(proxy)
        if fewest_units(verdict(proxy)) >= 20:
            break
    document = verdict(proxy)
    assert fewest_units(document) >= 20
    arm = document["arms"]["speculative"]
    assert arm["primary"]["verdict"] in ("inconclusive", "not_worse"), arm["primary"]
    assert not arm["harm"], arm["guardrails"]


def test_a_backend_twice_as_slow_to_decode_is_found_worse(
    fake: FakeBackend, fake2: FakeBackend, serve_proxy: Any, tmp_path: Path
) -> None:
    fake.extra_mode = "tokens=8; delay=0.004"
    fake2.extra_mode = "tokens=8; delay=0.008"  # tokens paced twice as far apart
    proxy = paced_proxy(serve_proxy, tmp_path, fake, fake2)
    outcome = None
    for _ in range(150):  # bounded; about 25 requests suffice
        stream(proxy)
        primary = verdict(proxy)["arms"]["speculative"]["primary"]
        outcome = primary["verdict"]
        if outcome != "inconclusive":
            break
    assert outcome == "worse", primary
    # 7 tokens in 28 ms against 56 ms, plus each sleep's overshoot on a busy machine
    assert primary["high"] < 1 and 0.3 < primary["ratio"] < 0.8
    scraped = httpx.get(proxy.url + "/metrics").text
    high = 'specproxy_verdict_ratio{arm="speculative",bound="high",metric="decode_tps"}'
    [line] = [line for line in scraped.splitlines() if line.startswith(high)]
    assert float(line.split()[-1]) < 1


def test_moved_requests_count_as_their_arms_errors_and_forced_ones_not_at_all(
    fake: FakeBackend, dead_url: str, serve_proxy: Any, tmp_path: Path
) -> None:
    """The speculative backend refuses connections: what was drawn for it is moved to the
    baseline and counts for speculative, as errors; the baseline's forced requests are the
    client's choice."""
    proxy: RunningProxy = serve_proxy(
        make_config(tmp_path, {"baseline": fake.url, "speculative": dead_url})
    )
    for _ in range(20):
        stream(proxy)
    stream(proxy, {"X-Backend": "baseline"})
    lines = proxy.wait_for_log(21)
    by_reason = {reason: sum(line["reason"] == reason for line in lines) for reason in Reason}
    assert by_reason[Reason.FALLBACK] > 0 and by_reason[Reason.HEADER] == 1
    document = verdict(proxy)
    counts = document["counts"]
    assert counts["speculative"]["requests"] == by_reason[Reason.FALLBACK]
    assert counts["baseline"]["requests"] == by_reason[Reason.SPLIT]
    assert document["arms"]["speculative"]["error_rate"] == {"arm": 1.0, "baseline": 0.0}


def test_a_reload_changing_the_split_starts_again_and_one_keeping_it_does_not(
    fake: FakeBackend, fake2: FakeBackend, serve_proxy: Any, tmp_path: Path
) -> None:
    path = tmp_path / "routes.yaml"
    routes: dict[str, Any] = {
        "model": "test-model",
        "backends": {"baseline": {"url": fake.url}, "speculative": {"url": fake2.url}},
        "routing": {"split": {"baseline": 50, "speculative": 50}},
        "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
    }
    path.write_text(json.dumps(routes))
    proxy: RunningProxy = serve_proxy(load_config(path), config_path=path)

    def total() -> int:
        return sum(c["requests"] for c in verdict(proxy)["counts"].values())

    for _ in range(6):
        stream(proxy)
    assert wait_until(lambda: total() == 6, 5)
    first = verdict(proxy)

    routes["limits"] = {"write_timeout": 61}  # not the experiment
    path.write_text(json.dumps(routes))
    assert httpx.post(proxy.url + "/admin/reload").status_code == 200
    kept = verdict(proxy)
    assert kept["since"] == first["since"] and total() == 6
    assert kept["config_versions"] == sorted([first["config_version"], kept["config_version"]])
    stream(proxy)
    assert wait_until(lambda: total() == 7, 5)

    routes["routing"]["split"] = {"baseline": 70, "speculative": 30}
    path.write_text(json.dumps(routes))
    assert httpx.post(proxy.url + "/admin/reload").status_code == 200
    fresh = verdict(proxy)
    assert fresh["since"] > first["since"] and total() == 0
    assert fresh["config_versions"] == [fresh["config_version"]]
    assert fresh["sample_ratio"] == {}
    [reset] = proxy.events("verdict_reset")
    assert reset["config_version"] == fresh["config_version"]

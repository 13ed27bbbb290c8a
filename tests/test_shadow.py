"""The shadow check and the live /stats view."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.accesslog import RequestRecord
from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.livestats import LiveStats, Reservoir
from proxy.payload import ChatRequest
from proxy.routing import Reason
from proxy.shadow import common_prefix, compare, is_greedy, wants_shadow
from tests.conftest import RunningProxy, make_config, stream_lines
from tests.fakebackend import FakeBackend

CHAT = "/v1/chat/completions"
GREEDY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def shadow_config(sample: float = 1.0, max_in_flight: int = 1) -> Any:
    return parse_config(
        {
            "model": "m",
            "backends": {
                "baseline": {"url": "http://127.0.0.1:1"},
                "spec": {"url": "http://127.0.0.1:2"},
            },
            "routing": {"split": {"baseline": 50, "spec": 50}},
            "shadow": {
                "from": "baseline",
                "to": "spec",
                "sample": sample,
                "max_in_flight": max_in_flight,
            },
        }
    ).shadow


def request(**body: Any) -> ChatRequest:
    return ChatRequest({"messages": [], **body}, "m", False, False)


def test_greedy_means_temperature_zero_or_unset_and_one_choice() -> None:
    assert is_greedy({}) and is_greedy({"temperature": 0}) and is_greedy({"temperature": 0.0})
    assert not is_greedy({"temperature": 0.7})
    assert not is_greedy({"temperature": 0, "n": 2})


def test_only_greedy_requests_to_the_source_are_sampled() -> None:
    always, rng = shadow_config(sample=1.0), random.Random(0)
    assert wants_shadow(always, request(temperature=0), "baseline", rng)
    assert not wants_shadow(always, request(temperature=0), "spec", rng)
    assert not wants_shadow(always, request(temperature=1), "baseline", rng)
    assert not wants_shadow(None, request(), "baseline", rng)
    assert not any(wants_shadow(shadow_config(0.0), request(), "baseline", rng) for _ in range(100))


def test_sample_share_is_respected() -> None:
    rng, shadow = random.Random(3), shadow_config(sample=0.2)
    hits = sum(wants_shadow(shadow, request(), "baseline", rng) for _ in range(10_000))
    assert 1800 < hits < 2200


def test_compare_reports_where_texts_diverge() -> None:
    same = compare("The capital is Paris.", "The capital is Paris.")
    assert same["match"] and same["similarity"] == 1.0 and same["common_prefix_chars"] == 21
    differ = compare("The capital is Paris.", "The capital is Lyon.")
    assert not differ["match"] and differ["common_prefix_chars"] == 15
    assert 0.5 < differ["similarity"] < 1
    assert common_prefix("", "abc") == 0 and common_prefix("ab", "abc") == 2


@pytest.mark.parametrize(
    ("shadow", "message"),
    [
        ({"from": "baseline", "to": "nope"}, "shadow.to: unknown backend nope"),
        ({"from": "baseline", "to": "baseline"}, "must be different backends"),
        ({"from": "baseline", "to": "spec", "sample": 2}, "shadow.sample"),
        ({"from": "baseline", "to": "spec", "max_in_flight": 0}, "shadow.max_in_flight"),
    ],
)
def test_invalid_shadow_blocks(shadow: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(
            {
                "model": "m",
                "routing": {"split": {"baseline": 100}},
                "shadow": shadow,
                "backends": {
                    "baseline": {"url": "http://127.0.0.1:1"},
                    "spec": {"url": "http://127.0.0.1:2"},
                },
            }
        )


def events(
    proxy: RunningProxy, name: str, count: int, timeout: float = 5.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = proxy.events(name)
        if len(found) >= count:
            return found
        time.sleep(0.02)
    return proxy.events(name)


@pytest.fixture
def shadowed(tmp_path: Path, fake: FakeBackend, fake2: FakeBackend, serve_proxy: Any) -> Any:
    def start(sample: float = 1.0, max_in_flight: int = 1) -> RunningProxy:
        config = make_config(
            tmp_path,
            {"baseline": fake.url, "spec": fake2.url},
            shadow={
                "from": "baseline",
                "to": "spec",
                "sample": sample,
                "max_in_flight": max_in_flight,
            },
        )
        running: RunningProxy = serve_proxy(config)
        return running

    return start


def test_greedy_request_is_mirrored_after_the_answer(shadowed: Any, fake2: FakeBackend) -> None:
    proxy = shadowed()
    answer = httpx.post(
        proxy.url + CHAT,
        json=GREEDY,
        headers={"X-Backend": "baseline", "X-Request-Id": "r1"},
        timeout=10,
    )
    assert answer.status_code == 200
    [event] = events(proxy, "shadow", 1)
    assert event["request_id"] == "r1" and (event["from"], event["to"]) == ("baseline", "spec")
    assert event["match"] is True and event["similarity"] == 1.0 and event["error"] is None
    assert event["common_prefix_chars"] == event["from_chars"] == len("tok0 tok1 tok2 tok3 tok4 ")
    assert event["from_latency_ms"] > 0 and event["to_latency_ms"] > 0
    assert fake2.requests[-1].body["model"] == "default_model"  # a proper upstream request
    assert len(proxy.log()) == 1  # one request line: the shadow is not an A/B sample


def test_streamed_answers_are_compared_too(shadowed: Any, fake2: FakeBackend) -> None:
    fake2.extra_mode = "tokens=3"  # the target answers differently
    proxy = shadowed()
    stream_lines(proxy.url + CHAT, {**GREEDY, "stream": True}, {"X-Backend": "baseline"})
    [event] = events(proxy, "shadow", 1)
    assert event["match"] is False
    assert (event["from_chars"], event["to_chars"]) == (25, 15)
    assert event["common_prefix_chars"] == 15


def test_not_greedy_and_other_backends_are_not_mirrored(shadowed: Any, fake2: FakeBackend) -> None:
    proxy = shadowed()
    httpx.post(
        proxy.url + CHAT,
        json={**GREEDY, "temperature": 0.8},
        headers={"X-Backend": "baseline"},
        timeout=10,
    )
    httpx.post(proxy.url + CHAT, json=GREEDY, headers={"X-Backend": "spec"}, timeout=10)
    time.sleep(0.3)
    assert events(proxy, "shadow", 1, timeout=0.2) == []
    assert len(fake2.requests) == 1  # only the forced one


def test_a_slow_shadow_never_delays_the_client(shadowed: Any, fake2: FakeBackend) -> None:
    fake2.extra_mode = "prefill=1.5"
    proxy = shadowed()
    started = time.perf_counter()
    httpx.post(proxy.url + CHAT, json=GREEDY, headers={"X-Backend": "baseline"}, timeout=10)
    client_s = time.perf_counter() - started
    [event] = events(proxy, "shadow", 1, timeout=5)
    assert client_s < 1.0  # the client had its answer well before the shadow's 1.5 s
    assert event["to_latency_ms"] >= 1500


def test_shadows_are_dropped_when_the_target_is_busy(shadowed: Any, fake2: FakeBackend) -> None:
    fake2.extra_mode = "prefill=1"
    proxy = shadowed(max_in_flight=1)
    for _ in range(3):
        httpx.post(proxy.url + CHAT, json=GREEDY, headers={"X-Backend": "baseline"}, timeout=10)
    dropped = events(proxy, "shadow_dropped", 2)
    assert len(dropped) == 2 and dropped[0]["in_flight"] == 1
    assert len(events(proxy, "shadow", 1, timeout=3)) == 1
    assert len(fake2.requests) == 1


def test_stats_endpoint_summarises_since_start(shadowed: Any) -> None:
    proxy = shadowed()
    for _ in range(4):
        httpx.post(
            proxy.url + CHAT,
            json={**GREEDY, "stream": True},
            headers={"X-Backend": "baseline", "X-Fake": "delay=0.05"},
            timeout=10,
        )
    httpx.post(
        proxy.url + CHAT,
        json=GREEDY,
        headers={"X-Backend": "spec", "X-Fake": "status=500"},
        timeout=10,
    )
    events(proxy, "shadow", 1)
    time.sleep(0.2)
    stats = httpx.get(proxy.url + "/stats", timeout=5).json()["backends"]
    baseline = stats["baseline"]
    assert baseline["requests"] == 4 and baseline["errors"] == 0
    assert baseline["by_reason"] == {"header": 4}
    assert baseline["decode_tps"]["n"] == 4 and baseline["decode_tps"]["p50"] > 0
    assert baseline["ttft_ms"]["p50"] <= baseline["latency_ms"]["p50"]
    assert baseline["shadow"]["checks"] >= 1 and baseline["shadow"]["match_rate"] == 1.0
    assert stats["spec"]["errors"] == 1 and stats["spec"]["error_rate"] == 1.0


def test_reservoir_memory_is_bounded_and_its_percentiles_close() -> None:
    rng = random.Random(5)
    reservoir = Reservoir(size=1000)
    for value in range(100_000):
        reservoir.add(float(value), rng)
    assert len(reservoir.values) == 1000 and reservoir.seen == 100_000
    p50 = reservoir.percentiles()["p50"]
    assert p50 is not None and abs(p50 - 50_000) < 5_000


def test_live_stats_ignore_requests_rejected_before_routing() -> None:
    stats = LiveStats(random.Random(0))
    stats.observe(RequestRecord("r", status=400, error="bad_request"))
    assert stats.snapshot() == {}


def test_live_stats_count_ab_requests_by_the_reasons_own_predicate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`experiment_requests` counts what `Reason.is_experiment` calls A/B data, as the
    report selects it: split and sticky, not forced nor moved."""
    stats = LiveStats(random.Random(0))
    for reason in Reason:
        stats.observe(RequestRecord("r", backend="b", reason=reason, status=200))
    assert stats.snapshot()["b"]["experiment_requests"] == 2
    monkeypatch.setattr(Reason, "is_experiment", property(lambda r: r is Reason.HEADER))
    stats.observe(RequestRecord("r", backend="b", reason=Reason.HEADER, status=200))
    assert stats.snapshot()["b"]["experiment_requests"] == 3


def test_requests_sent_while_a_shadow_runs_are_marked(shadowed: Any, fake2: FakeBackend) -> None:
    """A real request may queue behind a shadow on a one-at-a-time server: the report
    must know, so the line says so."""
    fake2.extra_mode = "prefill=1"
    proxy = shadowed()
    httpx.post(proxy.url + CHAT, json=GREEDY, headers={"X-Backend": "baseline"}, timeout=10)
    time.sleep(0.2)  # the shadow now runs on spec
    httpx.post(
        proxy.url + CHAT,
        json={**GREEDY, "temperature": 0.5},
        headers={"X-Backend": "spec", "X-Request-Id": "behind"},
        timeout=10,
    )
    events(proxy, "shadow", 1)
    lines = {line["request_id"]: line for line in proxy.wait_for_log(2)}
    assert lines["behind"]["behind_shadow"] is True
    assert not any(line["behind_shadow"] for rid, line in lines.items() if rid != "behind")


def test_tool_requests_are_not_mirrored(shadowed: Any, fake2: FakeBackend) -> None:
    proxy = shadowed()
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    httpx.post(
        proxy.url + CHAT,
        json={**GREEDY, "tools": tools},
        headers={"X-Backend": "baseline"},
        timeout=10,
    )
    time.sleep(0.3)
    assert events(proxy, "shadow", 1, timeout=0.2) == [] and not fake2.requests


def test_a_shadow_stream_cut_short_is_an_error_not_a_mismatch(
    shadowed: Any, fake2: FakeBackend
) -> None:
    fake2.extra_mode = "die_after=2"
    proxy = shadowed()
    stream_lines(proxy.url + CHAT, {**GREEDY, "stream": True}, {"X-Backend": "baseline"})
    [event] = events(proxy, "shadow", 1)
    assert event["error"] is not None and "match" not in event

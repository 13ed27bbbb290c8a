"""A fleet per arm: replicas in the config, the choice of one per request, and on real
sockets, against fake mlx_lm.servers: balancing by load, a replica down, all down,
per-replica slots, a failed attempt moved to another replica before the fallback."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import Backend, Config, Health, load_config, parse_config
from proxy.errors import ConfigError
from proxy.health import BackendHealth
from proxy.limits import Limiter
from proxy.replicas import Replica, choose
from tests.conftest import Background, RunningProxy, make_config, stream_lines
from tests.fakebackend import FakeBackend, wait_until

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**BODY, "stream": True}
SLOW = {"X-Fake": "tokens=10; delay=0.1"}  # a 1 s stream
QUIET_PROBES = {"probe_interval": 60.0}  # no probe after the first, unless a test wants one


# 1. The config


def backends(spec: dict[str, Any]) -> dict[str, Backend]:
    return parse_config(
        {
            "model": "m",
            "backends": {"baseline": {"url": "http://127.0.0.1:1"}, "spec": spec},
            "routing": {"split": {"baseline": 100}},
        }
    ).backends


def test_url_alone_is_one_replica() -> None:
    assert backends({"url": "http://127.0.0.1:2/"})["spec"].urls == ("http://127.0.0.1:2",)


def test_replicas_are_listed_by_url() -> None:
    spec = {"replicas": [{"url": "http://10.0.0.5:8081"}, {"url": "http://10.0.0.6:8081/"}]}
    assert backends(spec)["spec"].urls == ("http://10.0.0.5:8081", "http://10.0.0.6:8081")


def test_launched_replicas_take_consecutive_ports() -> None:
    spec = {"url": "http://127.0.0.1:8081", "launch": {"model": "m", "replicas": 3}}
    assert backends(spec)["spec"].urls == tuple(f"http://127.0.0.1:{p}" for p in (8081, 8082, 8083))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "backends.spec: needs `url` (one server) or `replicas`"),
        (
            {"url": "http://a:1", "replicas": [{"url": "http://b:1"}]},
            "backends.spec: give either `url` or `replicas`, not both",
        ),
        ({"replicas": []}, "backends.spec.replicas: List should have at least 1 item"),
        ({"replicas": [{"url": "ftp://a:1"}]}, "backends.spec.replicas.0.url: must be an http://"),
        ({"replicas": [{"url": "http://a:1", "port": 2}]}, "replicas.0.port: unknown key"),
        (
            {"replicas": [{"url": "http://a:1"}, {"url": "http://a:1/"}]},
            "backends.spec: replicas: http://a:1 is listed twice",
        ),
        (
            {"replicas": [{"url": "http://a:1"}], "launch": {"model": "m"}},
            "backends.spec: a launched backend gives `url` and `launch.replicas`",
        ),
        (
            {"url": "http://a:65535", "launch": {"model": "m", "replicas": 2}},
            "backends.spec: launch.replicas: the last one's port would be 65536",
        ),
        (
            {"url": "http://a:1", "launch": {"model": "m", "replicas": 0}},
            "backends.spec.launch.replicas: Input should be greater than or equal to 1",
        ),
    ],
)
def test_a_bad_fleet_is_refused_naming_the_key(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        backends(spec)
    assert message in str(error.value)


# 2. The choice of a replica (pure)


def replica(url: str, in_flight: int = 0, healthy: bool = True) -> Replica:
    backend = Backend(url=url)
    health = BackendHealth(url, Health(), healthy=healthy)
    return Replica("spec", url, Limiter(backend), health, in_flight)


def test_ties_are_broken_at_random() -> None:
    replicas = [replica(f"http://a:{i}", load) for i, load in enumerate([1, 0, 0, 5, 0])]
    rng = random.Random(1)
    picks = Counter(choose(replicas, rng) for _ in range(3000))
    assert set(picks) == {replicas[1], replicas[2], replicas[4]}
    assert all(900 < count < 1100 for count in picks.values()), picks


def test_the_replica_with_fewest_requests_is_chosen() -> None:
    replicas = [replica("http://a:1", 2), replica("http://b:1", 1), replica("http://c:1", 3)]
    assert choose(replicas, random.Random(0)) is replicas[1]


def test_an_ejected_replica_is_passed_over_however_idle() -> None:
    replicas = [replica("http://a:1", 0, healthy=False), replica("http://b:1", 5)]
    assert choose(replicas, random.Random(0)) is replicas[1]


def test_with_every_replica_ejected_one_is_still_chosen() -> None:
    """The arm stays when it is forced or its fallback is down too: health may be stale."""
    replicas = [replica("http://a:1", 1, healthy=False), replica("http://b:1", 0, healthy=False)]
    assert choose(replicas, random.Random(0)) is replicas[1]


def test_a_retry_goes_to_a_healthy_replica_not_tried_or_nowhere() -> None:
    a, b, c = replica("http://a:1"), replica("http://b:1", 9), replica("http://c:1", healthy=False)
    assert choose([a, b, c], random.Random(0), tried=[a]) is b
    assert choose([a, b, c], random.Random(0), tried=[a, b]) is None  # c is ejected
    assert choose([a], random.Random(0), tried=[a]) is None


# 3. On real sockets


def fleet_config(tmp_path: Path, baseline: str, replicas: list[str], **spec: Any) -> Config:
    """All traffic to "speculative", a fleet of `replicas`; baseline its fallback."""
    spec.setdefault("health", QUIET_PROBES)
    return make_config(
        tmp_path,
        {"baseline": baseline, "speculative": replicas[0]},
        routing={"split": {"baseline": 0, "speculative": 100}},
        backends={
            "baseline": {"url": baseline, "health": QUIET_PROBES},
            "speculative": {"replicas": [{"url": url} for url in replicas], **spec},
        },
    )


def post(proxy: RunningProxy, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(proxy.url + CHAT, json=BODY, headers=headers or {}, timeout=10)


def slow_stream(proxy: RunningProxy) -> Background:
    return Background(lambda: stream_lines(proxy.url + CHAT, STREAM, SLOW))


def healthz(proxy: RunningProxy) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(proxy.url + "/healthz", timeout=5).json()
    return body


def test_requests_go_to_the_replica_with_fewest_in_flight(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    """Three replicas, three long streams one after the other: one on each; then a short
    request goes to the first that is free again."""
    baseline, fleet = fakes(), [fakes(), fakes(), fakes()]
    proxy = serve_proxy(fleet_config(tmp_path, baseline.url, [f.url for f in fleet]))
    streams = []
    for count in (1, 2, 3):
        streams.append(slow_stream(proxy))
        assert wait_until(lambda n=count: sum(len(f.requests) for f in fleet) == n, 3)
    assert [len(f.requests) for f in fleet] == [1, 1, 1]
    for stream in streams:
        stream.join()
    lines = proxy.wait_for_log(3)
    assert sorted(line["replica"] for line in lines) == sorted(f.url for f in fleet)
    assert {line["backend"] for line in lines} == {"speculative"}
    assert [line["in_flight"] for line in lines] == [0, 0, 0]  # per replica: each was alone


def test_one_replica_down_the_other_serves_and_the_arm_stays_healthy(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any, dead_url: str
) -> None:
    baseline, alive = fakes(), fakes()
    proxy = serve_proxy(fleet_config(tmp_path, baseline.url, [dead_url, alive.url]))
    answers = [post(proxy) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 6
    assert {a.headers["x-backend"] for a in answers} == {"speculative"}
    lines = proxy.wait_for_log(6)
    assert {(line["backend"], line["replica"], line["reason"]) for line in lines} == {
        ("speculative", alive.url, "split")
    }
    assert len(alive.requests) == 6 and not baseline.requests
    (ejected,) = proxy.events("backend_ejected")
    assert (ejected["backend"], ejected["replica"]) == ("speculative", dead_url)
    state = healthz(proxy)["backends"]["speculative"]
    assert state["healthy"] is True and state["reachable"] is True
    assert state["replicas"][dead_url]["healthy"] is False
    assert state["replicas"][alive.url]["healthy"] is True


def test_a_failed_attempt_moves_to_another_replica_before_the_fallback(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    """The busy replica is the good one, so the idle, broken one is chosen first: its 500
    is not the client's answer; the other replica's is, and no fallback is logged."""
    baseline, good, broken = fakes(), fakes(), fakes("status=500")
    config = fleet_config(tmp_path, baseline.url, [good.url, broken.url])
    proxy = serve_proxy(config)
    held = slow_stream(proxy)  # ends on the good one, whichever it drew first
    assert wait_until(lambda: len(good.requests) == 1, 3)
    tried = len(broken.requests)
    answer = post(proxy)
    assert answer.status_code == 200 and answer.headers["x-backend"] == "speculative"
    held.join()
    lines = proxy.wait_for_log(2)
    assert [(x["replica"], x["fallback_from"], x["error"]) for x in lines] == [
        (good.url, None, None)
    ] * 2
    assert len(broken.requests) == tried + 1 and not baseline.requests


def test_every_replica_down_sends_the_arm_to_its_fallback(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any, dead_url: str
) -> None:
    baseline, dying = fakes(), fakes()
    dying.stop()  # a second address where nothing listens
    proxy = serve_proxy(fleet_config(tmp_path, baseline.url, [dead_url, dying.url]))
    answers = [post(proxy) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert {a.headers["x-backend"] for a in answers} == {"baseline"}
    lines = proxy.wait_for_log(4)
    assert {line["fallback_from"] for line in lines} == {"speculative"}
    assert {line["replica"] for line in lines} == {baseline.url}
    assert wait_until(lambda: not healthz(proxy)["backends"]["speculative"]["healthy"], 3)
    # Once both are ejected, nothing is tried there: moved before any attempt.
    assert lines[-1]["fallback_cause"] == "unhealthy"


def test_max_in_flight_is_per_replica(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    """One slot per replica, no queue: two long streams fill the fleet, one on each; the
    third request overflows to the fallback, and a forced one gets a 429."""
    baseline, fleet = fakes(), [fakes(), fakes()]
    config = fleet_config(
        tmp_path, baseline.url, [f.url for f in fleet], max_in_flight=1, max_queue=0
    )
    proxy = serve_proxy(config)
    streams = [slow_stream(proxy)]
    assert wait_until(lambda: sum(len(f.requests) for f in fleet) == 1, 3)
    streams.append(slow_stream(proxy))
    assert wait_until(lambda: sum(len(f.requests) for f in fleet) == 2, 3)
    assert [len(f.requests) for f in fleet] == [1, 1]
    moved = post(proxy)
    assert moved.status_code == 200 and moved.headers["x-backend"] == "baseline"
    forced = post(proxy, {"X-Backend": "speculative"})
    assert forced.status_code == 429 and forced.json()["error"]["code"] == "backend_busy"
    state = healthz(proxy)["backends"]["speculative"]
    assert state["in_flight"] == 2 and state["max_in_flight"] == 1
    assert [r["in_flight"] for r in state["replicas"].values()] == [1, 1]
    for stream in streams:
        stream.join()
    lines = proxy.wait_for_log(4)
    full = next(line for line in lines if line["fallback_cause"] == "full")
    assert (full["backend"], full["fallback_from"]) == ("baseline", "speculative")


def test_healthz_stats_and_metrics_show_each_replica(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any, dead_url: str
) -> None:
    baseline, alive = fakes(), fakes()
    proxy = serve_proxy(fleet_config(tmp_path, baseline.url, [alive.url, dead_url]))
    for _ in range(3):
        assert post(proxy).status_code == 200
    proxy.wait_for_log(3)
    state = healthz(proxy)["backends"]["speculative"]
    assert list(state["replicas"]) == [alive.url, dead_url]
    assert state["replicas"][alive.url]["reachable"] is True
    assert state["replicas"][dead_url]["reachable"] is False
    assert state["detail"] == "1 of 2 replicas reachable" and state["url"] is None
    stats = httpx.get(proxy.url + "/stats", timeout=5).json()["backends"]["speculative"]
    assert stats["requests"] == 3
    assert {url: r["requests"] for url, r in stats["replicas"].items()} == {alive.url: 3}
    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    labels = f'backend="speculative",replica="{alive.url}"'
    assert f'specproxy_replica_requests_total{{{labels},status="200"}} 3.0' in text
    assert f"specproxy_replica_ttft_seconds_count{{{labels}}} 3.0" in text
    assert f'specproxy_replica_healthy{{backend="speculative",replica="{dead_url}"}} 0.0' in text
    assert f"specproxy_replica_healthy{{{labels}}} 1.0" in text
    assert 'specproxy_backend_healthy{backend="speculative"} 1.0' in text  # the arm: any


def test_a_reload_adds_and_removes_replicas_keeping_the_health_of_those_that_stay(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any, dead_url: str
) -> None:
    baseline, first, added = fakes(), fakes(), fakes()
    path = tmp_path / "routes.yaml"

    def write(replicas: list[str]) -> None:
        config = fleet_config(tmp_path, baseline.url, replicas)
        path.write_text(config.model_dump_json(by_alias=True, exclude_none=True))

    write([first.url, dead_url])
    proxy = serve_proxy(load_config(path), config_path=path)
    assert wait_until(lambda: proxy.events("backend_ejected"), 3)  # the dead one, probed
    write([dead_url, added.url])  # `first` goes, `added` comes, the dead one stays
    assert httpx.post(proxy.url + "/admin/reload", timeout=5).status_code == 200
    replicas = healthz(proxy)["backends"]["speculative"]["replicas"]
    assert list(replicas) == [dead_url, added.url]
    assert replicas[dead_url]["healthy"] is False  # still ejected: its health was kept
    served = len(first.requests)
    assert all(post(proxy).status_code == 200 for _ in range(3))
    assert len(added.requests) == 3 and len(first.requests) == served
    assert len(proxy.events("backend_ejected")) == 1  # the dead one was not tried again


def test_a_forced_request_moves_within_its_arm_never_out_of_it(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    """The client chose the arm, not the server: another replica of it may answer; when
    none can, the client gets the failure, not the baseline."""
    baseline, good, broken = fakes(), fakes(), fakes("status=500")
    proxy = serve_proxy(fleet_config(tmp_path, baseline.url, [good.url, broken.url]))
    held = slow_stream(proxy)  # ends on the good one: the broken one is now the idle one
    assert wait_until(lambda: len(good.requests) == 1, 3)
    tried = len(broken.requests)
    forced = {"X-Backend": "speculative", "X-Request-Id": "forced"}
    answer = post(proxy, forced)
    assert answer.status_code == 200 and answer.headers["x-backend"] == "speculative"
    held.join()
    (line,) = [x for x in proxy.wait_for_log(2) if x["request_id"] == "forced"]
    assert (line["replica"], line["reason"], line["error"]) == (good.url, "header", None)
    assert len(broken.requests) == tried + 1
    good.stop()
    failed = post(proxy, forced)
    # The last replica tried answers: the broken one's 500, or the stopped one's refusal.
    assert failed.status_code in (500, 502) and failed.headers["x-backend"] == "speculative"
    assert set(failed.json()["error"]) == {"message", "type", "param", "code"}
    assert not baseline.requests

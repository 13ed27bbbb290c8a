"""Faults on real sockets: failover, health ejection and readmission, limits, timeouts.

The proxy runs on its own server in front of two fake mlx_lm.servers, "baseline" and
"speculative"; the speculative one misbehaves (refuses, crashes, hangs, stalls, answers
5xx, is slow) and the split sends it all the traffic. Each test checks what the client
gets, the request log lines (exactly one per request), and that /healthz still answers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import Config
from tests.conftest import (
    Background,
    RunningProxy,
    free_port,
    make_config,
    stream_lines,
)
from tests.fakebackend import FakeBackend, wait_until

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**BODY, "stream": True}
BROKEN = {"stream_incomplete", "stream_interrupted"}  # a stream that ended without [DONE]
# No probe during the test unless it asks for one (the first runs when the proxy starts):
# a passing probe resets the count of consecutive failures.
QUIET_PROBES = {"probe_interval": 60.0}


def two_backends(
    tmp_path: Path, baseline: str, speculative: str, split: float = 100, **spec: Any
) -> Config:
    """Baseline and speculative, `split` percent to speculative, `spec` its options."""
    spec.setdefault("health", QUIET_PROBES)
    return make_config(
        tmp_path,
        {"baseline": baseline, "speculative": speculative},
        routing={"split": {"baseline": 100 - split, "speculative": split}},
        backends={
            "baseline": {"url": baseline, "health": QUIET_PROBES},
            "speculative": {"url": speculative, **spec},
        },
    )


def one_slot(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any, **queue: Any
) -> tuple[RunningProxy, FakeBackend, FakeBackend, Background]:
    """Speculative with one slot (and `queue` options), held by a 1 s stream sent first."""
    baseline, speculative = fakes(), fakes()
    config = two_backends(tmp_path, baseline.url, speculative.url, max_in_flight=1, **queue)
    proxy = serve_proxy(config)
    long = Background(
        lambda: stream_lines(proxy.url + CHAT, STREAM, {"X-Fake": "tokens=10; delay=0.1"})
    )
    assert speculative.wait_for(lambda: len(speculative.requests) == 1, timeout=3)
    return proxy, baseline, speculative, long


def exactly(proxy: RunningProxy, count: int) -> list[dict[str, Any]]:
    """The request lines, once `count` have landed and no more follow."""
    proxy.wait_for_log(count)
    time.sleep(0.1)
    lines = proxy.log()
    assert len(lines) == count, lines
    return lines


def healthz(proxy: RunningProxy) -> dict[str, Any]:
    response = httpx.get(proxy.url + "/healthz", timeout=5)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def data_events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def content_events(lines: list[str]) -> list[dict[str, Any]]:
    return [
        e
        for e in data_events(lines)
        if e.get("choices") and e["choices"][0]["delta"].get("content")
    ]


def routed(line: dict[str, Any]) -> tuple[Any, ...]:
    return (line["backend"], line["reason"], line["fallback_from"], line["fallback_cause"])


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    return error


# 1. Refused connections


def test_backend_refusing_from_the_start_is_ejected_and_costs_no_client_an_error(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any, dead_url: str
) -> None:
    baseline = fakes()
    proxy = serve_proxy(two_backends(tmp_path, baseline.url, dead_url))
    first = httpx.post(proxy.url + CHAT, json=BODY, timeout=10)
    assert first.status_code == 200 and first.headers["x-backend"] == "baseline"
    assert first.json()["choices"][0]["message"]["content"]
    # The probe at start-up or the first request found it refused: ejected at once.
    assert wait_until(lambda: proxy.events("backend_ejected"), 3)
    (ejected,) = proxy.events("backend_ejected")
    assert (ejected["backend"], ejected["last_error"]) == ("speculative", "refused")
    second = httpx.post(proxy.url + CHAT, json=STREAM, timeout=10)
    assert second.status_code == 200 and second.headers["x-backend"] == "baseline"
    one, two = exactly(proxy, 2)
    assert routed(one)[:3] == ("baseline", "fallback", "speculative")
    # The start-up probe usually finds the refusal before the first request does (then
    # "unhealthy"); the next test makes the request find it ("failed").
    assert one["fallback_cause"] in {"failed", "unhealthy"}
    assert (one["status"], one["error"]) == (200, None)
    assert routed(two) == ("baseline", "fallback", "speculative", "unhealthy")
    assert (two["status"], two["error"]) == (200, None)
    assert len(baseline.requests) == 2
    assert healthz(proxy)["backends"]["speculative"]["healthy"] is False


def test_refused_connection_fails_over_within_the_request_and_ejects_at_once(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    """The request that finds the backend gone is the one retried: cause "failed"."""
    baseline, speculative = fakes(), fakes()
    proxy = serve_proxy(two_backends(tmp_path, baseline.url, speculative.url))
    # The start-up probe has passed; the next is a minute away.
    assert speculative.wait_for(lambda: speculative.probes)
    speculative.stop()  # now nothing listens there
    assert not proxy.events("backend_ejected")
    first = httpx.post(proxy.url + CHAT, json=BODY, timeout=10)
    assert first.status_code == 200 and first.headers["x-backend"] == "baseline"
    assert first.json()["choices"][0]["message"]["content"]
    (ejected,) = proxy.events("backend_ejected")
    assert (ejected["backend"], ejected["last_error"]) == ("speculative", "refused")
    second = httpx.post(proxy.url + CHAT, json=BODY, timeout=10)
    assert second.status_code == 200 and second.headers["x-backend"] == "baseline"
    forced = httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Backend": "speculative"})
    assert_openai_error(forced, 503, "backend_unhealthy")
    assert forced.headers["x-request-id"] and forced.headers["x-backend"] == "speculative"
    one, two, three = exactly(proxy, 3)
    assert routed(one) == ("baseline", "fallback", "speculative", "failed")
    assert (one["status"], one["error"], one["queue_ms"]) == (200, None, 0.0)
    assert routed(two) == ("baseline", "fallback", "speculative", "unhealthy")
    assert (two["status"], two["error"]) == (200, None)
    assert routed(three) == ("speculative", "header", None, None)
    assert (three["status"], three["error"]) == (503, "backend_unhealthy")
    assert len(baseline.requests) == 2
    state = healthz(proxy)["backends"]["speculative"]
    assert (state["healthy"], state["last_error"], state["ejections"]) == (False, "refused", 1)


def test_forced_request_to_a_refusing_backend_is_502_not_retried(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    baseline, speculative = fakes(), fakes()
    proxy = serve_proxy(two_backends(tmp_path, baseline.url, speculative.url))
    assert speculative.wait_for(lambda: speculative.probes)  # the start-up probe passed
    speculative.stop()
    forced = httpx.post(
        proxy.url + CHAT, json=BODY, headers={"X-Backend": "speculative"}, timeout=10
    )
    assert_openai_error(forced, 502, "backend_unreachable")
    assert forced.headers["x-backend"] == "speculative"
    assert not baseline.requests  # the client chose the backend: no retry elsewhere
    again = httpx.post(
        proxy.url + CHAT, json=BODY, headers={"X-Backend": "speculative"}, timeout=10
    )
    assert_openai_error(again, 503, "backend_unhealthy")  # the refusal ejected it
    one, two = exactly(proxy, 2)
    assert routed(one) == ("speculative", "header", None, None)
    assert (one["status"], one["error"]) == (502, "backend_unreachable")
    assert (two["status"], two["error"]) == (503, "backend_unhealthy")
    assert healthz(proxy)["backends"]["speculative"]["healthy"] is False


# 2. A crash mid-stream


def test_crash_mid_stream_is_not_retried_and_ejects_after_eject_after(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    baseline = fakes()
    speculative = fakes("tokens=10; die_after=2")
    health = {**QUIET_PROBES, "eject_after": 2}
    proxy = serve_proxy(two_backends(tmp_path, baseline.url, speculative.url, health=health))
    for attempt in range(2):
        lines = stream_lines(proxy.url + CHAT, STREAM, {})
        assert len(content_events(lines)) == 2  # the client had bytes: no retry
        last = data_events(lines)[-1]
        assert last["error"]["code"] in BROKEN
        assert "data: [DONE]" not in lines
        # The failure is counted after the error event is sent, and before the log line.
        proxy.wait_for_log(attempt + 1)
        assert len(proxy.events("backend_ejected")) == attempt  # ejected after the second
    (ejected,) = proxy.events("backend_ejected")
    assert ejected["backend"] == "speculative"
    assert not baseline.requests
    after = httpx.post(proxy.url + CHAT, json=STREAM, timeout=10)
    assert after.status_code == 200 and "data: [DONE]" in after.text
    assert after.headers["x-backend"] == "baseline"
    *broken, moved = exactly(proxy, 3)
    for line in broken:
        assert routed(line) == ("speculative", "split", None, None)
        assert line["status"] == 200  # the stream had started when it broke
        assert line["error"] in BROKEN
    assert routed(moved) == ("baseline", "fallback", "speculative", "unhealthy")
    assert (moved["status"], moved["error"]) == (200, None)
    assert len(speculative.requests) == 2
    assert healthz(proxy)["backends"]["speculative"]["healthy"] is False


def test_crashes_further_apart_than_the_probe_interval_still_eject(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    baseline = fakes()
    speculative = fakes("tokens=10; die_after=2")
    health = {"eject_after": 2, "probe_interval": 0.2, "min_eject": 5}
    proxy = serve_proxy(two_backends(tmp_path, baseline.url, speculative.url, health=health))
    for _ in range(2):
        lines = stream_lines(proxy.url + CHAT, STREAM, {})
        assert data_events(lines)[-1]["error"]["code"] in BROKEN
        time.sleep(0.5)  # probes of /health pass meanwhile: they must not reset the count
    proxy.wait_for_log(2)  # the failure is counted after the error event, before the line
    assert proxy.events("backend_ejected"), healthz(proxy)["backends"]["speculative"]
    lines = stream_lines(proxy.url + CHAT, STREAM, {})
    assert lines[-2] == "data: [DONE]"
    broken, broken2, moved = exactly(proxy, 3)
    assert broken["error"] in BROKEN and broken2["error"] in BROKEN
    assert routed(moved) == ("baseline", "fallback", "speculative", "unhealthy")


# 3. Silence before the first token


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_backend_silent_before_answering_is_retried_on_baseline(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any, stream: bool
) -> None:
    """`hang`: not even a status line within first_token."""
    baseline, speculative = fakes(), fakes("hang=5")
    timeouts = {"first_token": 0.5, "idle": 0.5}
    proxy = serve_proxy(two_backends(tmp_path, baseline.url, speculative.url, timeouts=timeouts))
    started = time.perf_counter()
    response = httpx.post(proxy.url + CHAT, json=STREAM if stream else BODY, timeout=10)
    took = time.perf_counter() - started
    assert response.status_code == 200 and response.headers["x-backend"] == "baseline"
    assert 0.45 < took < 1.5
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        assert response.json()["choices"][0]["message"]["content"]
    assert len(speculative.requests) == 1 and len(baseline.requests) == 1
    # The proxy gave up its connection: a speculative server serves one request at a time.
    assert speculative.wait_for(lambda: speculative.requests[0].client_closed_at is not None, 2)
    (line,) = exactly(proxy, 1)
    assert routed(line) == ("baseline", "fallback", "speculative", "failed")
    assert (line["status"], line["error"]) == (200, None)
    state = healthz(proxy)["backends"]["speculative"]
    assert (state["last_error"], state["in_flight"]) == ("timeout", 0)


def test_stream_with_headers_but_no_event_before_first_token_is_retried_on_baseline(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    """`quiet`: a 200 and its headers, then nothing: still nothing reached the client."""
    baseline, speculative = fakes(), fakes("quiet=5")
    timeouts = {"first_token": 0.5, "idle": 0.5}
    proxy = serve_proxy(two_backends(tmp_path, baseline.url, speculative.url, timeouts=timeouts))
    started = time.perf_counter()
    lines = stream_lines(proxy.url + CHAT, STREAM, {})
    took = time.perf_counter() - started
    assert 0.45 < took < 1.5
    assert len(content_events(lines)) == 5
    assert lines[-2:] == ["data: [DONE]", ""]
    assert not any('"error"' in line for line in lines)
    assert len(speculative.requests) == 1 and len(baseline.requests) == 1
    (line,) = exactly(proxy, 1)
    assert routed(line) == ("baseline", "fallback", "speculative", "failed")
    assert speculative.wait_for(lambda: speculative.requests[0].client_closed_at is not None, 2)
    (line,) = exactly(proxy, 1)
    assert routed(line) == ("baseline", "fallback", "speculative", "failed")
    assert (line["status"], line["error"], line["completion_tokens"]) == (200, None, 5)
    assert healthz(proxy)["backends"]["speculative"]["last_error"] == "timeout"


# 4. Silence after the first token


def test_stall_mid_stream_ends_with_a_timeout_event_not_a_hang_and_no_retry(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    baseline, speculative = fakes(), fakes("tokens=3; stall=5")
    timeouts = {"first_token": 5.0, "idle": 0.5}
    proxy = serve_proxy(two_backends(tmp_path, baseline.url, speculative.url, timeouts=timeouts))
    started = time.perf_counter()
    lines = stream_lines(proxy.url + CHAT, STREAM, {})
    took = time.perf_counter() - started
    assert 0.45 < took < 1.5
    assert [e["choices"][0]["delta"]["content"] for e in content_events(lines)] == ["tok0 "]
    last = data_events(lines)[-1]
    assert last["error"]["code"] == "backend_timeout"
    assert "data: [DONE]" not in lines
    assert not baseline.requests
    assert speculative.wait_for(lambda: speculative.requests[0].client_closed_at is not None, 2)
    (line,) = exactly(proxy, 1)
    assert routed(line) == ("speculative", "split", None, None)
    assert (line["status"], line["error"]) == (200, "backend_timeout")
    assert healthz(proxy)["backends"]["speculative"]["last_error"] == "backend_timeout"


# 5. Error statuses


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_5xx_is_retried_on_baseline(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any, status: int, stream: bool
) -> None:
    baseline, speculative = fakes(), fakes(f"status={status}")
    proxy = serve_proxy(two_backends(tmp_path, baseline.url, speculative.url))
    response = httpx.post(proxy.url + CHAT, json=STREAM if stream else BODY, timeout=10)
    assert response.status_code == 200 and response.headers["x-backend"] == "baseline"
    assert len(speculative.requests) == 1 and len(baseline.requests) == 1
    (line,) = exactly(proxy, 1)
    assert routed(line) == ("baseline", "fallback", "speculative", "failed")
    assert (line["status"], line["error"]) == (200, None)
    state = healthz(proxy)["backends"]["speculative"]
    assert (state["consecutive_failures"], state["last_error"]) == (1, f"http_{status}")


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [("status=500", 500, "backend_error"), ("hang=5", 504, "backend_timeout")],
    ids=["5xx", "hang"],
)
def test_forced_requests_get_the_failure_itself_not_a_retry(
    tmp_path: Path,
    fakes: Callable[..., FakeBackend],
    serve_proxy: Any,
    fault: str,
    status: int,
    code: str,
) -> None:
    baseline, speculative = fakes(), fakes(fault)
    timeouts = {"first_token": 0.5, "idle": 0.5}
    proxy = serve_proxy(two_backends(tmp_path, baseline.url, speculative.url, timeouts=timeouts))
    response = httpx.post(
        proxy.url + CHAT, json=BODY, headers={"X-Backend": "speculative"}, timeout=10
    )
    assert_openai_error(response, status, code)
    assert not baseline.requests
    (line,) = exactly(proxy, 1)
    assert routed(line) == ("speculative", "header", None, None)
    assert (line["status"], line["error"]) == (status, code)
    assert healthz(proxy)["backends"]["speculative"]["consecutive_failures"] == 1


def test_4xx_is_relayed_not_retried_and_not_a_failure(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    baseline, speculative = fakes(), fakes("status=400")
    health = {**QUIET_PROBES, "eject_after": 2}
    proxy = serve_proxy(two_backends(tmp_path, baseline.url, speculative.url, health=health))
    for _ in range(3):  # more than eject_after
        response = httpx.post(proxy.url + CHAT, json=BODY, timeout=10)
        error = assert_openai_error(response, 400, "backend_error")
        assert error["message"] == "fake backend failure"
        assert response.headers["x-backend"] == "speculative"
    assert not baseline.requests
    assert not proxy.events("backend_ejected")
    lines = exactly(proxy, 3)
    for line in lines:
        assert routed(line) == ("speculative", "split", None, None)
        assert (line["status"], line["error"]) == (400, "backend_error")
    state = healthz(proxy)["backends"]["speculative"]
    assert (state["healthy"], state["consecutive_failures"]) == (True, 0)


# 6. Concurrency limits


def test_full_backend_overflows_split_traffic_and_429s_forced_requests(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    proxy, baseline, speculative, long = one_slot(tmp_path, fakes, serve_proxy, max_queue=0)
    split = httpx.post(proxy.url + CHAT, json=BODY, timeout=10)
    assert split.status_code == 200 and split.headers["x-backend"] == "baseline"
    forced = httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Backend": "speculative"})
    error = assert_openai_error(forced, 429, "backend_busy")
    assert error["type"] == "rate_limit_error" and forced.headers["x-backend"] == "speculative"
    assert int(forced.headers["retry-after"]) >= 1
    assert forced.headers["x-request-id"]
    assert long.join()[-2] == "data: [DONE]"
    assert len(speculative.requests) == 1 and len(baseline.requests) == 1
    lines = {line["request_id"]: line for line in exactly(proxy, 3)}
    by_status = sorted(lines.values(), key=lambda line: (line["status"], line["backend"]))
    moved, first, refused = by_status
    assert routed(first) == ("speculative", "split", None, None)
    assert (first["status"], first["error"], first["queue_ms"]) == (200, None, 0.0)
    assert routed(moved) == ("baseline", "fallback", "speculative", "full")
    assert (moved["status"], moved["error"]) == (200, None)
    assert routed(refused) == ("speculative", "header", None, None)
    assert (refused["status"], refused["error"]) == (429, "backend_busy")
    assert healthz(proxy)["backends"]["speculative"]["healthy"] is True


def test_queued_request_waits_for_the_slot_and_logs_its_wait(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    proxy, baseline, speculative, long = one_slot(
        tmp_path, fakes, serve_proxy, max_queue=1, queue_timeout=30
    )
    time.sleep(0.2)  # the first has about 0.7 s to go
    with httpx.Client(timeout=10) as client:  # made first: it takes 40-90 ms
        sent_at = time.perf_counter()
        second = client.post(proxy.url + CHAT, json=BODY)
    assert second.status_code == 200 and second.headers["x-backend"] == "speculative"
    long.join()
    expected_ms = (long.finished_at - sent_at) * 1000
    assert len(speculative.requests) == 2 and not baseline.requests
    first, waited = sorted(exactly(proxy, 2), key=lambda line: line["queue_ms"])
    assert first["queue_ms"] == 0.0 and first["stream"] is True
    assert routed(waited) == ("speculative", "split", None, None)
    assert (waited["status"], waited["error"]) == (200, None)
    assert waited["queue_ms"] > 0
    assert waited["queue_ms"] == pytest.approx(expected_ms, abs=200)
    assert speculative.requests[1].received_at >= speculative.requests[0].received_at + 0.8


def test_failed_attempts_give_their_slot_back(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    """After a 5xx, a timeout, a crash and a stall, the one slot is free again."""
    baseline, speculative = fakes(), fakes()
    proxy = serve_proxy(
        two_backends(
            tmp_path,
            baseline.url,
            speculative.url,
            max_in_flight=1,
            max_queue=0,
            timeouts={"first_token": 0.5, "idle": 0.5},
            health={**QUIET_PROBES, "eject_after": 10},
        )
    )
    forced = {"X-Backend": "speculative"}
    for fault, body in [
        ("status=500", BODY),
        ("hang=5", BODY),
        ("tokens=5; die_after=1", STREAM),
        ("tokens=3; stall=5", STREAM),
    ]:
        httpx.post(proxy.url + CHAT, json=body, headers={**forced, "X-Fake": fault}, timeout=10)
    ok = httpx.post(proxy.url + CHAT, json=BODY, headers=forced, timeout=10)
    assert ok.status_code == 200, ok.text
    lines = exactly(proxy, 5)
    assert [line["status"] for line in lines] == [500, 504, 200, 200, 200]
    assert [line["error"] for line in lines][:2] == ["backend_error", "backend_timeout"]
    assert lines[-1]["error"] is None
    state = healthz(proxy)["backends"]["speculative"]
    assert (state["in_flight"], state["queued"], state["consecutive_failures"]) == (0, 0, 0)


def test_client_leaving_the_queue_gives_up_its_place(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    baseline, speculative = fakes(), fakes()
    proxy = serve_proxy(
        two_backends(
            tmp_path, baseline.url, speculative.url, max_in_flight=1, max_queue=1, queue_timeout=30
        )
    )
    forced = {"X-Backend": "speculative"}
    long = Background(
        # 2 s: time for the next three requests to be sent while it holds the slot
        lambda: stream_lines(proxy.url + CHAT, STREAM, {**forced, "X-Fake": "tokens=20; delay=0.1"})
    )
    assert speculative.wait_for(lambda: len(speculative.requests) == 1, timeout=3)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proxy.url + CHAT, json=BODY, headers=forced, timeout=0.2)
    assert wait_until(lambda: len(proxy.log()) == 1, 3)  # logged when it left
    assert healthz(proxy)["backends"]["speculative"]["queued"] == 0
    # The queue has room again: this one waits instead of being refused.
    waited = httpx.post(proxy.url + CHAT, json=BODY, headers=forced, timeout=10)
    assert waited.status_code == 200
    assert long.join()[-2] == "data: [DONE]"
    assert len(speculative.requests) == 2  # the one that left never reached the backend
    left, first, second = exactly(proxy, 3)
    assert (left["status"], left["client_disconnected"]) == (499, True)
    assert routed(left) == ("speculative", "header", None, None)
    assert (first["status"], second["status"]) == (200, 200)
    assert second["queue_ms"] > 0
    assert healthz(proxy)["backends"]["speculative"]["in_flight"] == 0


def test_wait_that_times_out_in_the_queue_is_in_queue_ms(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    proxy, _, _, long = one_slot(tmp_path, fakes, serve_proxy, max_queue=1, queue_timeout=0.3)
    started = time.perf_counter()
    moved = httpx.post(proxy.url + CHAT, json=BODY, timeout=10)
    assert time.perf_counter() - started >= 0.3
    assert moved.status_code == 200 and moved.headers["x-backend"] == "baseline"
    long.join()
    line = next(line for line in exactly(proxy, 2) if line["backend"] == "baseline")
    assert routed(line) == ("baseline", "fallback", "speculative", "full")
    assert line["queue_ms"] == pytest.approx(300, abs=100)


# 7. Recovery


def test_ejected_backend_is_readmitted_by_probes_once_it_answers_again(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    baseline = fakes()
    port = free_port()
    health = {"eject_after": 2, "probe_interval": 0.2, "min_eject": 0.5}
    proxy = serve_proxy(
        two_backends(tmp_path, baseline.url, f"http://127.0.0.1:{port}", health=health)
    )
    down = httpx.post(proxy.url + CHAT, json=BODY, timeout=10)
    assert down.status_code == 200 and down.headers["x-backend"] == "baseline"
    assert wait_until(lambda: proxy.events("backend_ejected"), 3)
    assert healthz(proxy)["backends"]["speculative"]["healthy"] is False
    ejected_at = time.monotonic()
    speculative = fakes(port=port)
    assert wait_until(lambda: proxy.events("backend_healthy"), 5)
    readmitted_after = time.monotonic() - ejected_at
    (healthy,) = proxy.events("backend_healthy")
    assert healthy["backend"] == "speculative"
    assert readmitted_after < 3
    back = httpx.post(proxy.url + CHAT, json=BODY, timeout=10)
    assert back.status_code == 200 and back.headers["x-backend"] == "speculative"
    assert len(speculative.requests) == 1
    first, second = exactly(proxy, 2)
    assert routed(first)[:3] == ("baseline", "fallback", "speculative")
    assert (first["status"], first["error"]) == (200, None)
    assert routed(second) == ("speculative", "split", None, None)
    assert (second["status"], second["error"]) == (200, None)
    state = healthz(proxy)["backends"]["speculative"]
    assert (state["healthy"], state["ejections"]) == (True, 1)


def test_readmission_waits_for_min_eject_even_when_probes_pass(
    tmp_path: Path, fakes: Callable[..., FakeBackend], serve_proxy: Any
) -> None:
    """A backend that answers /health but failed requests stays out for min_eject."""
    baseline, speculative = fakes(), fakes("status=500")
    # One failure ejects: with probes passing every 0.2 s, consecutive failures would
    # race with the resets.
    health = {"eject_after": 1, "probe_interval": 0.2, "min_eject": 1.5}
    proxy = serve_proxy(two_backends(tmp_path, baseline.url, speculative.url, health=health))
    before_ejection = time.monotonic()  # the request ejects it
    response = httpx.post(proxy.url + CHAT, json=BODY, timeout=10)
    assert response.status_code == 200 and response.headers["x-backend"] == "baseline"
    assert proxy.events("backend_ejected")
    time.sleep(0.8)  # probes have passed meanwhile
    assert not proxy.events("backend_healthy")
    during = httpx.post(proxy.url + CHAT, json=BODY, timeout=10)
    assert during.headers["x-backend"] == "baseline"
    assert wait_until(lambda: proxy.events("backend_healthy"), 3)
    assert time.monotonic() - before_ejection >= 1.5  # min_eject
    assert len(speculative.requests) == 1
    failed, moved = exactly(proxy, 2)
    assert routed(failed) == ("baseline", "fallback", "speculative", "failed")
    assert routed(moved) == ("baseline", "fallback", "speculative", "unhealthy")
    assert healthz(proxy)["backends"]["speculative"]["healthy"] is True

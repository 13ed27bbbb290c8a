"""Real sockets: the proxy on its own server, a fake mlx_lm.server that takes its time.

What only real sockets show: tokens reach the client while the backend still generates, a
client that leaves closes the backend's connection, a backend that dies or stalls ends the
stream with an error event, and each of these leaves exactly one sane log line.
"""

from __future__ import annotations

import gc
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import relay
from tests.conftest import RunningProxy, make_config, stream_lines
from tests.fakebackend import FakeBackend

CHAT = "/v1/chat/completions"
STREAM = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture
def proxy(tmp_path: Path, fake: FakeBackend, serve_proxy: Any) -> RunningProxy:
    config = make_config(
        tmp_path,
        {"baseline": fake.url},
        backends={"baseline": {"url": fake.url, "timeouts": {"idle": 1.0}}},
    )
    running: RunningProxy = serve_proxy(config)
    return running


def content_events(lines: list[str]) -> list[dict[str, Any]]:
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    return [e for e in events if e.get("choices") and e["choices"][0]["delta"].get("content")]


def assert_one_sane_line(proxy: RunningProxy) -> dict[str, Any]:
    lines = proxy.wait_for_log(1)
    time.sleep(0.1)  # and no second line follows
    assert len(proxy.log()) == 1, proxy.log()
    line = lines[0]
    assert 0 < line["ttft_ms"] <= line["latency_ms"], line
    return line


def test_first_token_reaches_client_while_backend_still_generates(
    proxy: RunningProxy, fake: FakeBackend
) -> None:
    first_token_s, backend_done_then, rest, _ = stream_to_first_token(
        proxy, fake, {"X-Fake": "tokens=10; delay=0.2"}
    )
    assert first_token_s < 1.0  # the whole answer takes 1.8 s
    assert backend_done_then is False
    assert rest[-2] == "data: [DONE]"
    line = assert_one_sane_line(proxy)
    assert (line["status"], line["error"], line["completion_tokens"]) == (200, None, 10)
    assert line["latency_ms"] >= 1800
    # 9 tokens after the first, 0.2 s apart: 5 tokens/s
    assert line["decode_tps"] == pytest.approx(5.0, rel=0.3)


def stream_to_first_token(
    proxy: RunningProxy, fake: FakeBackend, headers: dict[str, str]
) -> tuple[float, bool, list[str], httpx.Response]:
    """Stream an answer: the seconds to its first token, whether the backend had finished
    then, the lines after it, and the response."""
    with httpx.Client(timeout=10) as client:  # made first: it takes 40-90 ms
        started = time.perf_counter()
        with client.stream("POST", proxy.url + CHAT, json=STREAM, headers=headers) as response:
            lines = response.iter_lines()
            for text in lines:
                if content_events([text]):
                    first_token_s = time.perf_counter() - started
                    backend_done_then = fake.requests[-1].finished
                    break
            rest = list(lines)
    return first_token_s, backend_done_then, rest, response


def test_keepalives_before_the_answer_are_not_first_tokens_and_not_forwarded(
    proxy: RunningProxy,
) -> None:
    # The answer starts with the backend's first event, so that a backend failing in
    # prefill can still be retried elsewhere: the keepalives before it are dropped.
    lines = stream_lines(proxy.url + CHAT, STREAM, {"X-Fake": "tokens=3; prefill=0.4"})
    assert not any(line.startswith(":") for line in lines)
    assert lines[0].startswith("data: ") and lines[-2:] == ["data: [DONE]", ""]
    line = assert_one_sane_line(proxy)
    assert line["ttft_ms"] >= 400


def test_a_role_only_delta_is_not_the_first_token(proxy: RunningProxy) -> None:
    lines = stream_lines(proxy.url + CHAT, STREAM, {"X-Fake": "tokens=3; role_gap=0.3"})
    assert len(content_events(lines)) == 3
    line = assert_one_sane_line(proxy)
    assert line["ttft_ms"] >= 300


def test_client_disconnect_closes_the_backend_connection(
    proxy: RunningProxy, fake: FakeBackend
) -> None:
    assert_leaving_mid_stream_frees_the_backend(proxy, fake)


def assert_leaving_mid_stream_frees_the_backend(proxy: RunningProxy, fake: FakeBackend) -> None:
    """A client that leaves after two tokens of a 10 s stream: the backend sees its
    connection closed within a second, and the one log line says the client left."""
    with httpx.stream(
        "POST",
        proxy.url + CHAT,
        json=STREAM,
        timeout=10,
        headers={"X-Fake": "tokens=100; delay=0.1"},
    ) as response:
        seen = 0
        for text in response.iter_lines():
            seen += len(content_events([text]))
            if seen == 2:
                break
        left_at = time.perf_counter()
    assert fake.wait_for(lambda: fake.requests[-1].client_closed_at is not None, timeout=3)
    closed_after = fake.requests[-1].client_closed_at - left_at  # type: ignore[operator]
    assert closed_after < 1.0
    assert not fake.requests[-1].finished
    line = assert_one_sane_line(proxy)
    assert line["client_disconnected"] is True
    assert line["latency_ms"] < 5000  # logged when the client left, not at the 10 s mark


def test_client_leaving_a_slow_non_stream_request_closes_the_backend_connection(
    proxy: RunningProxy, fake: FakeBackend
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            proxy.url + CHAT,
            json={"messages": []},
            timeout=0.3,
            headers={"X-Fake": "tokens=5; prefill=5"},
        )
    assert fake.wait_for(lambda: fake.requests[-1].client_closed_at is not None, timeout=3)
    line = proxy.wait_for_log(1)[0]
    assert (line["client_disconnected"], line["status"], line["ttft_ms"]) == (True, 499, None)


def test_backend_dying_mid_stream_gives_the_client_an_error_event(proxy: RunningProxy) -> None:
    lines = stream_lines(proxy.url + CHAT, STREAM, {"X-Fake": "tokens=10; delay=0.05; die_after=3"})
    assert len(content_events(lines)) == 3
    last = json.loads([line for line in lines if line.startswith("data: ")][-1][6:])
    assert last["error"]["code"] in {"stream_incomplete", "stream_interrupted"}
    assert "data: [DONE]" not in lines
    line = assert_one_sane_line(proxy)
    assert line["error"] in {"stream_incomplete", "stream_interrupted"}


def test_stalled_stream_ends_with_timeout_event(proxy: RunningProxy) -> None:
    started = time.perf_counter()
    lines = stream_lines(proxy.url + CHAT, STREAM, {"X-Fake": "tokens=3; stall=5"})
    assert time.perf_counter() - started < 3  # the read timeout is 1 s
    last = json.loads([line for line in lines if line.startswith("data: ")][-1][6:])
    assert last["error"]["code"] == "backend_timeout"
    assert assert_one_sane_line(proxy)["error"] == "backend_timeout"


def test_in_flight_counts_requests_already_at_the_backend(proxy: RunningProxy) -> None:
    def one() -> None:
        httpx.post(
            proxy.url + CHAT, json=STREAM, timeout=10, headers={"X-Fake": "tokens=5; delay=0.1"}
        )

    first = threading.Thread(target=one)
    first.start()
    time.sleep(0.2)  # the first one is now streaming
    one()
    first.join(10)
    lines = proxy.wait_for_log(2)
    assert sorted(line["in_flight"] for line in lines) == [0, 1]


def test_unreachable_backend_is_502_over_real_sockets(
    tmp_path: Path, serve_proxy: Any, dead_url: str
) -> None:
    proxy = serve_proxy(make_config(tmp_path, {"baseline": dead_url}))
    response = httpx.post(proxy.url + CHAT, json=STREAM, timeout=10)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "backend_unreachable"
    assert proxy.wait_for_log(1)[0]["error"] == "backend_unreachable"


def test_proxy_keeps_serving_after_failures(proxy: RunningProxy) -> None:
    for fault in ("status=500", "tokens=3; die_after=1", ""):
        httpx.post(proxy.url + CHAT, json=STREAM, timeout=10, headers={"X-Fake": fault})
    response = httpx.post(proxy.url + CHAT, json={"messages": []}, timeout=10)
    assert response.status_code == 200
    assert len(proxy.wait_for_log(4)) == 4


def test_the_answer_ends_at_done_not_when_the_backend_closes(proxy: RunningProxy) -> None:
    """A client that hangs up on [DONE] got everything: not a disconnect, and the
    backend's late close is not the client's latency."""
    with httpx.stream(
        "POST",
        proxy.url + CHAT,
        json=STREAM,
        timeout=10,
        headers={"X-Fake": "tokens=3; linger=0.8"},
    ) as response:
        for line in response.iter_lines():
            if line == "data: [DONE]":
                break
    line = assert_one_sane_line(proxy)
    assert line["client_disconnected"] is False and line["error"] is None
    assert line["latency_ms"] < 500


def test_a_backend_that_keeps_the_stream_open_after_done_does_not_hold_the_client(
    tmp_path: Path, fake: FakeBackend, serve_proxy: Any
) -> None:
    proxy = serve_proxy(make_config(tmp_path, {"baseline": fake.url}))  # idle: 60 s
    started = time.perf_counter()
    lines = stream_lines(proxy.url + CHAT, STREAM, {"X-Fake": "tokens=3; linger=10"})
    assert time.perf_counter() - started < 2  # the response ended: not after 10 s, nor 60
    assert lines[-2] == "data: [DONE]" and not any('"error"' in line for line in lines)
    line = assert_one_sane_line(proxy)
    assert (line["error"], line["client_disconnected"]) == (None, False)


def test_neither_the_client_nor_its_next_request_waits_for_the_backend_to_close(
    proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mlx_lm.server closes 10-25 ms after [DONE]; the response ends at [DONE] (the openai
    SDK reads to its end), and the next request on the same connection starts at once."""
    monkeypatch.setattr(relay, "AFTER_DONE_S", 5.0)  # the backend may take its time closing
    with httpx.Client(timeout=10) as client:
        for _ in range(2):
            started = time.perf_counter()
            with client.stream(
                "POST", proxy.url + CHAT, json=STREAM, headers={"X-Fake": "tokens=3; linger=3"}
            ) as response:
                lines = list(response.iter_lines())
            assert time.perf_counter() - started < 1.5  # not 3 s
            assert lines[-2] == "data: [DONE]"
    log = proxy.wait_for_log(2)
    assert [(line["error"], line["client_disconnected"]) for line in log] == [(None, False)] * 2
    assert all(line["latency_ms"] < 1500 for line in log)


def test_a_failure_after_done_is_not_an_error(proxy: RunningProxy) -> None:
    """The backend lingers past the read timeout after [DONE]: the answer was whole."""
    lines = stream_lines(proxy.url + CHAT, STREAM, {"X-Fake": "tokens=3; linger=2"})
    assert lines[-2] == "data: [DONE]" and not any('"error"' in line for line in lines)
    line = assert_one_sane_line(proxy)
    assert (line["error"], line["client_disconnected"]) == (None, False)
    assert line["latency_ms"] < 500


def stalled_client(proxy: RunningProxy) -> socket.socket:
    """A client that asks for an endless stream, reads its first bytes, then never again."""
    body = json.dumps(STREAM).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])))
    client.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Fake: tokens=200000\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\n\r\n" + body
    )  # fmt: skip
    client.recv(1024)  # the answer started
    return client


def test_a_client_that_stops_reading_is_dropped_and_frees_the_backend(
    tmp_path: Path, fake: FakeBackend, serve_proxy: Any
) -> None:
    config = make_config(tmp_path, {"baseline": fake.url}, limits={"write_timeout": 0.5})
    proxy = serve_proxy(config)
    with stalled_client(proxy):
        assert fake.wait_for(lambda: fake.requests and fake.requests[0].client_closed_at, 15)
        [line] = proxy.wait_for_log(1, timeout=5)
    assert (line["status"], line["client_disconnected"]) == (200, True)
    assert line["error"] == "client_write_timeout"
    assert httpx.get(proxy.url + "/healthz").json()["backends"]["baseline"]["in_flight"] == 0


def test_only_the_client_that_stopped_reading_is_dropped(
    tmp_path: Path, fake: FakeBackend, serve_proxy: Any
) -> None:
    """One sweep watches every request: next to a stalled client, one that takes each
    message of a slow stream, over several sweeps, is left alone."""
    config = make_config(tmp_path, {"baseline": fake.url}, limits={"write_timeout": 0.3})
    proxy = serve_proxy(config)
    with stalled_client(proxy):
        lines = stream_lines(proxy.url + CHAT, STREAM, {"X-Fake": "tokens=15; delay=0.1"})
        log = proxy.wait_for_log(2, timeout=10)
    assert len(content_events(lines)) == 15 and lines[-2] == "data: [DONE]"
    by_tokens = {line["completion_tokens"]: line for line in log}
    reader = by_tokens[15]
    assert (reader["error"], reader["client_disconnected"]) == (None, False)
    assert reader["latency_ms"] > 1000  # it did span several sweeps
    [dropped] = [line for line in log if line is not reader]
    assert (dropped["error"], dropped["client_disconnected"]) == ("client_write_timeout", True)


def test_requests_leave_no_cyclic_garbage(proxy: RunningProxy) -> None:
    """A request's objects go when it ends, not at the next collection: a cycle per request
    cost the proxy about a twentieth of its CPU in collections under load, and memory."""
    ours = {
        *("RequestRecord", "RequestState", "Attempt", "_Call", "Clock", "UpstreamRequest"),
        "_ClientExchange",  # the server's
    }
    with httpx.Client(timeout=10) as client:  # warm: pools and caches are not garbage
        client.post(proxy.url + CHAT, json=STREAM)
    gc.collect()
    gc.disable()
    try:
        with httpx.Client(timeout=10) as client:
            for body in (STREAM, {"messages": []}) * 5:
                assert client.post(proxy.url + CHAT, json=body).status_code == 200
            with client.stream("POST", proxy.url + CHAT, json=STREAM) as response:
                next(response.iter_lines())  # and leave mid-stream
        proxy.wait_for_log(12)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cyclic = [type(obj).__name__ for obj in gc.garbage if type(obj).__name__ in ours]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == []

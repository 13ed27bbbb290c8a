"""Malformed and hostile answers from a backend, through the real proxy on real sockets.

Each case: a first client gets the bad answer, and then a second client, with another
request id, asks on what is left of the same pooled connection. The first gets its own
answer or a clear 502 in the OpenAI shape; the second always gets its own answer, never the
first's nor a stray one, and the proxy keeps serving.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import parse_config
from tests.fakebackend import wait_until
from tests.rawbackend import CLOSE, Answer, RawBackend, Script, completion, completion_body

Packets = list[bytes]


def chat(url: str, request_id: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers={"x-request-id": request_id},
        timeout=10,
    )


def outcome(response: httpx.Response) -> str:
    """What the client got: the answer's text, or `error:<code>` for an OpenAI-shaped 502."""
    body = response.json()
    if response.status_code == 200:
        return str(body["choices"][0]["message"]["content"])
    assert response.status_code == 502, response.text
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return f"error:{body['error']['code']}"


@pytest.fixture
def raw_proxy(tmp_path: Path, serve_proxy: Any) -> Iterator[Any]:
    """Start a raw backend with a script, and the proxy in front of it (no fallback)."""
    backends: list[RawBackend] = []

    def start(script: Script, **limits: int) -> tuple[RawBackend, Any]:
        backend = RawBackend(script).start()
        backends.append(backend)
        config = parse_config(
            {
                "model": "test-model",
                "backends": {
                    "baseline": {
                        "url": backend.url,
                        "timeouts": {"first_token": 5, "idle": 5},
                        "health": {"probe_interval": 60},  # the test's requests only
                    }
                },
                "routing": {"split": {"baseline": 100}},
                "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
                "limits": limits,
            }
        )
        return backend, serve_proxy(config)

    yield start
    for backend in backends:
        backend.stop()


def first_then_normal(first: Any, after: Packets = ()) -> Script:  # type: ignore[assignment]
    """The first request gets `first(request_id)`; every later one its own completion."""

    def script(index: int, request_id: str) -> Answer:
        if index == 0:
            return Answer(first(request_id), list(after))
        return Answer([completion(request_id)])

    return script


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"


CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(lambda rid: [CONTINUE, completion(rid)], id="100-then-200"),
        pytest.param(lambda rid: [EARLY_HINTS, completion(rid)], id="103-then-200"),
        pytest.param(
            lambda rid: [CONTINUE, EARLY_HINTS, PROCESSING, EARLY_HINTS, completion(rid)],
            id="several-1xx-then-200",
        ),
        pytest.param(
            lambda rid: [CONTINUE + EARLY_HINTS + completion(rid)], id="1xx-and-200-one-packet"
        ),
        pytest.param(lambda rid: [completion(rid) + completion("STRAY")], id="content-length-long"),
    ],
)
def test_the_first_gets_its_answer_and_the_next_its_own(raw_proxy: Any, first: Any) -> None:
    backend, proxy = raw_proxy(first_then_normal(first))
    assert outcome(chat(proxy.url, "A")) == "answer for A"
    assert outcome(chat(proxy.url, "B")) == "answer for B"
    assert outcome(chat(proxy.url, "C")) == "answer for C"
    assert [r.request_id for r in backend.requests] == ["A", "B", "C"]  # each sent once


def test_1xx_answers_keep_the_connection(raw_proxy: Any) -> None:
    """Interim answers are part of the exchange: the connection goes on serving."""
    backend, proxy = raw_proxy(first_then_normal(lambda rid: [EARLY_HINTS, completion(rid)]))
    for request_id in "ABC":
        assert outcome(chat(proxy.url, request_id)) == f"answer for {request_id}"
    assert len({r.connection for r in backend.requests}) == 1


@pytest.mark.parametrize(
    ("first", "code", "reason"),
    [
        pytest.param(
            lambda rid: [
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n",
                completion(rid),
            ],
            "backend_unreachable",
            "101",
            id="101",
        ),
        pytest.param(
            lambda rid: [b"HTTP/1.1 200 OK\r\nX-Big: ", *[b"a" * 30_000] * 4, b"\r\n\r\n"],
            "backend_answer_too_large",
            "max_response_head_bytes",
            id="huge-head",
        ),
        pytest.param(
            lambda rid: [
                b"HTTP/1.1 200 OK\r\n"
                + b"".join(b"X-%d: y\r\n" % i for i in range(150))
                + b"Content-Length: 2\r\n\r\n{}"
            ],
            "backend_answer_too_large",
            "header fields",
            id="too-many-headers",
        ),
        pytest.param(
            lambda rid: [
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + completion_body(rid)[:50],
                CLOSE,
            ],
            "backend_unreachable",
            "mid-answer",
            id="content-length-short",
        ),
        pytest.param(
            lambda rid: [
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\n{}\r\n0\r\n\r\n"
            ],
            "backend_unreachable",
            "malformed",
            id="content-length-and-chunked",
        ),
        pytest.param(
            lambda rid: [CHUNKED, b"zz\r\n{}\r\n0\r\n\r\n"],
            "backend_unreachable",
            "malformed",
            id="garbage-chunk-size",
        ),
        pytest.param(
            lambda rid: [b"HTTP/1.1 200 OK\r\nContent-Ty", CLOSE],
            "backend_unreachable",
            "without answering",
            id="close-mid-head",
        ),
        pytest.param(
            lambda rid: [CHUNKED, b'5\r\n{"id"\r\n', CLOSE],
            "backend_unreachable",
            "mid-answer",
            id="close-mid-body",
        ),
    ],
)
def test_a_malformed_answer_is_a_502_and_the_next_gets_its_own(
    raw_proxy: Any, first: Any, code: str, reason: str
) -> None:
    backend, proxy = raw_proxy(first_then_normal(first))
    response = chat(proxy.url, "A")
    assert outcome(response) == f"error:{code}"
    assert reason in response.json()["error"]["message"]
    assert outcome(chat(proxy.url, "B")) == "answer for B"
    assert [r.request_id for r in backend.requests] == ["A", "B"]
    lines = proxy.wait_for_log(2)
    assert [(line["request_id"], line["error"]) for line in lines] == [("A", code), ("B", None)]


@pytest.mark.parametrize(
    "stray",
    [
        pytest.param([completion("STRAY")], id="a-whole-answer"),
        pytest.param([b"HTTP/1.1 200 OK\r\nContent-Le"], id="half-an-answer"),
        pytest.param([b"\r\n"], id="a-line-break"),
    ],
)
def test_bytes_on_an_idle_connection_never_reach_a_client(raw_proxy: Any, stray: Packets) -> None:
    """What a backend sends while its connection is idle closes the connection: the next
    request goes on a new one, once, and gets its own answer."""
    backend, proxy = raw_proxy(first_then_normal(lambda rid: [completion(rid)], after=stray))
    assert outcome(chat(proxy.url, "A")) == "answer for A"
    assert wait_until(lambda: backend.hung_up == 1, 5.0)  # the proxy closed it
    assert outcome(chat(proxy.url, "B")) == "answer for B"
    a, b = backend.requests  # each sent once, and B not on A's connection
    assert (a.request_id, b.request_id) == ("A", "B")
    assert a.connection != b.connection


def test_a_body_over_the_limit_is_a_502(raw_proxy: Any) -> None:
    """A non-stream body past `limits.max_response_body_bytes` is not read whole."""

    def big(request_id: str) -> Packets:
        body = completion_body(request_id).replace(b"answer for", b"x" * 10_000)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        return [head % len(body) + body]

    _, proxy = raw_proxy(first_then_normal(big), max_response_body_bytes=4096)
    response = chat(proxy.url, "A")
    assert outcome(response) == "error:backend_answer_too_large"
    assert "max_response_body_bytes" in response.json()["error"]["message"]
    assert outcome(chat(proxy.url, "B")) == "answer for B"
    lines = proxy.wait_for_log(2)
    assert lines[0]["error"] == "backend_answer_too_large"


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\n", id="connection-close"),
        pytest.param(b"HTTP/1.0 200 OK\r\n", id="http10"),
    ],
)
def test_bytes_after_a_whole_closing_answer_do_not_fail_it(
    tmp_path: Path, serve_proxy: Any, head: bytes
) -> None:
    """A whole answer that closes its connection, then stray bytes in the same packet (the
    parser refuses any byte after it): the client gets that answer, generated once; nothing
    is moved to the fallback, and nothing counts against the backend's health."""

    def primary_script(index: int, request_id: str) -> Answer:
        body = completion_body(request_id)
        framing = b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        return Answer([head + framing + body + b"JUNK"])

    def fallback_script(index: int, request_id: str) -> Answer:
        return Answer([completion("fallback " + request_id)])

    primary = RawBackend(primary_script).start()
    fallback = RawBackend(fallback_script).start()
    try:
        config = parse_config(
            {
                "model": "test-model",
                "backends": {
                    "primary": {
                        "url": primary.url,
                        "fallback": "fallback",
                        "health": {"probe_interval": 60},
                    },
                    "fallback": {"url": fallback.url, "health": {"probe_interval": 60}},
                },
                "routing": {"split": {"primary": 100}},
                "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
            }
        )
        proxy = serve_proxy(config)
        assert outcome(chat(proxy.url, "A")) == "answer for A"
        assert outcome(chat(proxy.url, "B")) == "answer for B"  # on a new connection
        assert [r.request_id for r in primary.requests] == ["A", "B"]  # each generated once
        assert primary.requests[0].connection != primary.requests[1].connection
        assert fallback.requests == []
        lines = proxy.wait_for_log(2)
        assert [(line["backend"], line["reason"], line["error"]) for line in lines] == [
            ("primary", "split", None),
            ("primary", "split", None),
        ]
        state = httpx.get(proxy.url + "/healthz", timeout=10).json()["backends"]["primary"]
        assert (state["healthy"], state["consecutive_failures"]) == (True, 0)
    finally:
        primary.stop()
        fallback.stop()

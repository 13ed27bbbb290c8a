"""Bad input, generated: the proxy never answers 5xx, never falls over, and every error it
sends is in the OpenAI shape, whatever bodies, headers, paths and bytes it is sent.

One proxy on its own server, in front of one healthy fake backend (as both backends), is
started for the whole module; the generated requests go to it over real sockets, through
one keep-alive `httpx.Client`, or raw when httpx would refuse to send them. A healthy
backend means a 502 or 504 is as wrong as a 500 here. The last test checks that the proxy
still serves and that its log holds no internal error.
"""

from __future__ import annotations

import json
import re
import socket
import string
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.app import create_app
from proxy.config import Config
from tests.conftest import REJECTED, ThreadedServer, make_config, read_log
from tests.fakebackend import FakeBackend

MODEL = "test-model"  # make_config's public model name
NAMES = ("baseline", "speculative")
CHAT = "/v1/chat/completions"
ERROR_KEYS = {"message", "type", "param", "code"}

# No example database: a run leaves no .hypothesis/ directory in the repository.
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Proxy:
    """The proxy on its own server on a loopback port, in a thread, with one keep-alive
    client. Not a dataclass: Hypothesis prints those field by field in a failure report,
    the fake's ever longer request list included."""

    def __init__(self, config: Config, fake: FakeBackend) -> None:
        assert config.logging.path is not None
        self.log_path, self.fake = config.logging.path, fake
        self.server = ThreadedServer(create_app(config))
        self.port = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"
        # Idle connections are let go before the server's 5 s keep-alive would close one
        # under a request about to reuse it.
        limits = httpx.Limits(keepalive_expiry=2.0)
        self.client = httpx.Client(base_url=self.url, timeout=10, limits=limits)

    def __repr__(self) -> str:
        return f"Proxy({self.url})"

    def stop(self) -> None:
        """Close the client, then let the server finish every request and exit."""
        self.client.close()
        self.server.stop()

    def post_chat(self, content: Any, headers: Any = None) -> httpx.Response:
        return self.client.post(CHAT, content=content, headers=headers)

    def assert_alive(self) -> None:
        assert self.server.thread.is_alive()
        assert self.client.get("/v1/models").status_code == 200


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """One proxy for the whole module, in front of one fake serving as both backends."""
    fake = FakeBackend().start()
    config = make_config(
        tmp_path_factory.mktemp("badinput"),
        dict.fromkeys(NAMES, fake.url),
        routing={"sticky_header": "X-Session-Id"},
    )
    try:
        running = Proxy(config, fake)
        try:
            yield running
        finally:
            running.stop()
    finally:
        fake.stop()


# --- what every answer must look like ------------------------------------------------------


def _describe(response: httpx.Response) -> str:
    request = response.request
    return (
        f"{request.method} {request.url} -> {response.status_code}"
        f" {response.headers.get('content-type')}: {response.content[:300]!r}"
    )


def assert_openai_error(response: httpx.Response) -> dict[str, Any]:
    """The body is `{"error": {"message": str, "type": str, "param": ..., "code": ...}}`."""
    assert response.headers.get("content-type", "").startswith("application/json"), _describe(
        response
    )
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, _describe(response)
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_KEYS, _describe(response)
    assert isinstance(error["message"], str) and error["message"], _describe(response)
    assert isinstance(error["type"], str) and error["type"], _describe(response)
    assert error["param"] is None or isinstance(error["param"], str), _describe(response)
    assert error["code"] is None or isinstance(error["code"], str | int), _describe(response)
    return error


def assert_sane(response: httpx.Response) -> None:
    """Never 5xx (the backend is healthy); errors OpenAI-shaped; a request id on answers and
    errors. (Not on Starlette's 307 from `/healthz/` to `/healthz`: that one has none.)"""
    if response.status_code >= 500:
        # Let the server print its traceback first: CPython 3.11's ast module is not
        # thread-safe, and pytest formatting this failure meanwhile can die with
        # "SystemError: AST constructor recursion depth mismatch", hiding the report.
        time.sleep(0.5)
    assert response.status_code < 500, _describe(response)
    if response.status_code >= 400:
        assert_openai_error(response)
    if not response.is_redirect:
        assert response.headers.get("x-request-id"), _describe(response)


def assert_bad_request(response: httpx.Response, params: set[str] | None = None) -> None:
    assert response.status_code == 400, _describe(response)
    error = assert_openai_error(response)
    assert error["code"] == "bad_request", _describe(response)
    if params is not None:
        assert error["param"] in params, _describe(response)


def assert_completion(
    response: httpx.Response, *, model: str | None = None, wants_usage: bool | None = None
) -> None:
    """A whole answer from the fake: JSON with its content, or a stream that ends in [DONE];
    the model name in it is the client's (when `model` is given)."""
    assert response.status_code == 200, _describe(response)
    assert response.headers.get("x-backend") in NAMES, _describe(response)
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in response.text.split("\n\n") if e.startswith("data: ")]
        assert events and events[-1] == "data: [DONE]", _describe(response)
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert all("error" not in chunk for chunk in chunks), _describe(response)
        content = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        assert content.startswith("tok0"), _describe(response)
        if model is not None:
            assert all(chunk["model"] == model for chunk in chunks), _describe(response)
        if wants_usage is not None:
            has_usage = any(not c["choices"] and c.get("usage") for c in chunks)
            assert has_usage == wants_usage, _describe(response)
    else:
        payload = response.json()
        assert payload["choices"][0]["message"]["content"].startswith("tok0"), _describe(response)
        if model is not None:
            assert payload["model"] == model, _describe(response)


# --- strategies ------------------------------------------------------------------------------

# JSON that any parser reads back as it was: finite numbers a double can hold, no surrogates.
safe_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**300), max_value=10**300),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
safe_json = st.recursive(
    safe_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Anything json.dumps writes: NaN, Infinity, integers beyond a double, lone surrogates.
wild_text = st.text(st.characters(exclude_categories=()), max_size=20) | st.sampled_from(
    ["\ud800", "a\udfffb", "\x00", "\u2028", "\U0010ffff"]
)
wild_scalars = st.one_of(
    safe_scalars, st.integers(), st.floats(), wild_text, st.sampled_from([10**400, -(10**400)])
)
wild_json = st.recursive(
    wild_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(wild_text, children, max_size=4)
    ),
    max_leaves=16,
)
EDGE_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 0.5, -0.0, 5e-324, 1e308, -1e308,
    2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**300,
    "", " ", "0", "true", "null", "\x00", "x" * 5000, [], {}, [[[]]], {"": {}}, [None], [{}],
    {"include_usage": True}, {"role": "user"},
]  # fmt: skip
junk = st.one_of(st.sampled_from(EDGE_VALUES), safe_json)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | junk,
        "content": st.text(max_size=50) | junk,
    }
)
PLAUSIBLE = {
    "messages": st.lists(message, max_size=3),
    "stream": st.sampled_from([True, False, None]),
    "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans() | junk, "extra": junk}
    ),
    "model": st.sampled_from([MODEL, "default_model", "", "gpt-4o", 'a"b\\c']) | st.text(),
    "max_tokens": st.integers(0, 4096),
    "temperature": st.floats(0, 2),
    "n": st.integers(1, 4),
    "tools": st.lists(
        st.fixed_dictionaries(
            {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.text()})}
        ),
        max_size=2,
    ),
    "draft_model": st.text(max_size=10) | junk,  # dropped by the proxy
    "num_draft_tokens": st.integers(0, 10) | junk,  # dropped by the proxy
}
chat_bodies = st.fixed_dictionaries(
    {}, optional={field: values | junk for field, values in PLAUSIBLE.items()}
)

# Header values HTTP can carry: printable latin-1, no CR/LF, no edge whitespace.
HEADER_CHARS = [chr(c) for c in range(0x20, 0x7F)] + [chr(c) for c in range(0xA0, 0x100)]
header_values = st.text(st.sampled_from(HEADER_CHARS), max_size=40).map(lambda s: s.strip(" "))
header_names = st.sampled_from(
    ["Authorization", "Accept", "Accept-Encoding", "Cookie", "Origin", "User-Agent", "Forwarded",
     "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-Ip", "Range"]
) | st.text(string.ascii_letters + string.digits + "-_.!#$%&'*+^`|~", min_size=1)  # fmt: skip
# Framing, routing and the fake's own control header: each is fuzzed on purpose, elsewhere.
_RESERVED = {
    "content-length", "transfer-encoding", "host", "connection", "expect", "upgrade", "te",
    "trailer", "keep-alive", "proxy-connection", "x-fake", "x-backend", "x-session-id",
    "x-request-id", "content-type",
}  # fmt: skip
extra_headers = st.lists(
    st.tuples(header_names.filter(lambda n: n.lower() not in _RESERVED), header_values),
    max_size=4,
)


def _encode(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    """The body sent with Transfer-Encoding: chunked, `size` bytes a chunk."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


# --- 1. bodies -------------------------------------------------------------------------------

json_like_bytes = st.text(
    st.sampled_from('{}[]":,0123456789.eE+-\\ truefalsnul' + "\u00e9\u20ac"), max_size=80
).map(str.encode)


@FUZZ
@given(
    body=st.binary(max_size=2000) | json_like_bytes,
    content_type=st.sampled_from([None, "application/json", "text/plain", "", "x/y; charset=z"]),
    chunk=st.none() | st.integers(1, 64),
)
@example(body=b"", content_type=None, chunk=None)
@example(body=b"{}", content_type=None, chunk=1)
@example(body=b"\xef\xbb\xbf{}", content_type=None, chunk=None)  # a UTF-8 byte order mark
@example(body=b"{}\x00", content_type=None, chunk=None)
@example(body=b"{} {}", content_type=None, chunk=None)
def test_any_bytes_as_body_get_an_answer_or_an_openai_error(
    proxy: Proxy, body: bytes, content_type: str | None, chunk: int | None
) -> None:
    """Arbitrary bytes: a completion when they happen to be a JSON object, else a 4xx."""
    headers = {"content-type": content_type} if content_type is not None else {}
    content = body if chunk is None else _chunks(body, chunk)
    response = proxy.post_chat(content, headers)
    assert_sane(response)
    if response.status_code == 200:
        assert_completion(response)


@FUZZ
@given(value=wild_json, ensure_ascii=st.booleans())
@example(value=float("nan"), ensure_ascii=True)
@example(value={"messages": float("inf")}, ensure_ascii=True)
@example(value={"model": "\ud800"}, ensure_ascii=False)
@example(value={"max_tokens": 10**400}, ensure_ascii=True)
def test_any_json_value_as_body_is_answered_or_refused_cleanly(
    proxy: Proxy, value: Any, ensure_ascii: bool
) -> None:
    """Any JSON document (NaN, huge integers, lone surrogates too); not an object: 400."""
    raw = json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    response = proxy.post_chat(raw)
    assert_sane(response)
    if not isinstance(value, dict):
        assert_bad_request(response)
    elif response.status_code == 200:
        assert_completion(response)


def _type_errors(body: dict[str, Any]) -> tuple[set[str], set[str]]:
    """The params a 400 must name (`must`) and may name (`may`), per the README: `stream`,
    `model` and `stream_options` of the wrong type are refused. A falsy non-boolean `stream`
    (0, "", []) is let through as "no stream" by the proxy, like the `null` the OpenAI API
    takes for false; the test accepts either."""
    must: set[str] = set()
    may: set[str] = set()
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        (must if stream else may).add("stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        must.add("stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        must.add("model")
    return must, must | may


@settings(FUZZ, max_examples=300)
@given(body=chat_bodies)
@example(body={"stream": 1})
@example(body={"stream": "true", "model": 5})
@example(body={"stream": True, "stream_options": []})
@example(body={"stream": True, "stream_options": {"include_usage": "yes"}})
@example(body={"stream": True, "stream_options": {"include_usage": True}, "model": ""})
@example(body={"model": None, "messages": None, "n": 2**64, "temperature": 1e308})
def test_chat_fields_of_any_type_are_relayed_or_refused_as_documented(
    proxy: Proxy, body: dict[str, Any]
) -> None:
    """messages, stream, stream_options, model, max_tokens, temperature, n, tools with wrong
    types, nulls, huge numbers and nested junk: a 400 naming the field exactly when the
    README says so, else a whole completion carrying the client's model name back."""
    response = proxy.post_chat(json.dumps(body).encode())
    assert_sane(response)
    must, may = _type_errors(body)
    if must:
        assert_bad_request(response, params=may)
        return
    if response.status_code == 400:
        assert_bad_request(response, params=may)
        return
    options = body.get("stream_options")
    stream = body.get("stream") is True
    assert response.headers["content-type"].startswith(
        "text/event-stream" if stream else "application/json"
    ), _describe(response)
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    assert_completion(
        response, model=body.get("model") or MODEL, wants_usage=wants_usage if stream else None
    )


@FUZZ
@given(body=chat_bodies, data=st.data())
def test_truncated_json_is_a_bad_request(
    proxy: Proxy, body: dict[str, Any], data: st.DataObject
) -> None:
    """Every proper prefix of a JSON object is invalid JSON: 400 bad_request."""
    raw = json.dumps(body).encode()
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    assert_bad_request(proxy.post_chat(raw[:cut]))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


INVALID_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\x80"]


@FUZZ
@given(
    bad=st.sampled_from(INVALID_UTF8)
    | st.binary(min_size=1, max_size=8).filter(lambda b: not _is_utf8(b)),
    before=st.text(max_size=10),
    in_key=st.booleans(),
)
def test_invalid_utf8_is_a_bad_request(proxy: Proxy, bad: bytes, before: str, in_key: bool) -> None:
    """JSON must be UTF-8: a body with an invalid sequence in a key or a string is a 400."""
    text = json.dumps(before)[1:-1].encode()
    if in_key:
        raw = b'{"' + text + bad + b'": 1, "messages": []}'
    else:
        raw = b'{"messages": [{"role": "user", "content": "' + text + bad + b'"}]}'
    assert_bad_request(proxy.post_chat(raw))


# --- 2. headers ------------------------------------------------------------------------------

backend_values = st.one_of(
    st.sampled_from(NAMES),
    st.sampled_from(["", "Baseline", "BASELINE", "baseline,speculative", "speculative\xa0",
                     "baseline speculative", "*", "..", "x" * 40]),
    header_values,
)  # fmt: skip


@settings(FUZZ, max_examples=250)
@given(
    backend=st.none() | backend_values,
    backend_header=st.sampled_from(["X-Backend", "x-backend", "X-BACKEND"]),
    session=st.none() | header_values,
    request_id=st.none() | header_values,
    content_type=st.none()
    | st.sampled_from(["application/json", "text/html", "*/*"])
    | header_values,
    extras=extra_headers,
    stream=st.booleans(),
)
def test_routing_session_id_and_other_headers_of_any_value(
    proxy: Proxy,
    backend: str | None,
    backend_header: str,
    session: str | None,
    request_id: str | None,
    content_type: str | None,
    extras: list[tuple[str, str]],
    stream: bool,
) -> None:
    """The routing header forces a backend or gets a 400 listing the valid names; a session id
    keeps its backend; the request id comes back and goes upstream; other headers are inert."""
    headers = list(extras)
    for name, value in [
        (backend_header, backend),
        ("X-Session-Id", session),
        ("X-Request-Id", request_id),
        ("Content-Type", content_type),
    ]:
        if value is not None:
            headers.append((name, value))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    response = proxy.post_chat(json.dumps(body).encode(), _encode(headers))
    assert_sane(response)

    echoed = dict(response.headers.raw)[b"x-request-id"]
    if request_id and request_id.isascii():  # kept: printable ASCII of at most 200 characters
        assert echoed == request_id.encode("latin-1"), _describe(response)
    else:  # none, or replaced by a generated one
        assert re.fullmatch(rb"[0-9a-f]{32}", echoed), _describe(response)

    if backend is not None and backend not in NAMES and response.status_code == 400:
        error = assert_openai_error(response)
        assert error["code"] == "unknown_backend", _describe(response)
        assert all(name in error["message"] for name in NAMES), _describe(response)
        return
    assert_completion(response, model=MODEL, wants_usage=False if stream else None)
    if request_id:
        assert proxy.fake.requests[-1].headers["x-request-id"] == echoed.decode("latin-1")
    chosen = response.headers["x-backend"]
    if backend is not None:  # forced: exactly that name, give or take the edge whitespace
        assert chosen == backend.strip(), _describe(response)
    elif session:  # sticky: the same id, the same backend
        again = proxy.post_chat(json.dumps(body).encode(), _encode(headers))
        assert again.status_code == 200, _describe(again)
        assert again.headers["x-backend"] == chosen, _describe(again)


# --- raw sockets: what httpx will not send ---------------------------------------------------


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]  # lower-case names; the last of repeated ones
    body: bytes

    def describe(self) -> str:
        return f"{self.status} {self.headers} {self.body[:300]!r}"


def raw_exchange(port: int, data: bytes, *, half_close: bool = True, timeout: float = 5) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it. With
    `half_close`, end the sending side first, so an incomplete request cannot leave the
    server waiting (the server then takes the client as gone)."""
    received = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused the head and closed before the rest went out
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"no answer and no close within {timeout} s") from None
            if not chunk:
                break
            received.append(chunk)
    return b"".join(received)


def parse_answer(raw: bytes) -> RawAnswer | None:
    """The first final (non-1xx) response in `raw`, or None if the server sent nothing."""
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status >= 200:
            length = int(headers.get("content-length", len(rest)))
            return RawAnswer(status, headers, rest[:length])
        raw = rest
    return None


def assert_sane_raw(answer: RawAnswer | None) -> None:
    """Never 5xx; every answer has an x-request-id and every error is OpenAI-shaped, the
    server's own answers to what is not HTTP (which the app never sees) included."""
    if answer is None:
        return  # closed without an answer: allowed for what is not a whole request
    assert answer.status < 500, answer.describe()
    assert answer.headers.get("x-request-id"), answer.describe()
    if answer.status >= 400:
        assert answer.headers["content-type"].startswith("application/json"), answer.describe()
        body = json.loads(answer.body)
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, answer.describe()
        assert isinstance(body["error"]["message"], str), answer.describe()


def _post_head(length: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
        b"Content-Length: " + length + b"\r\n" + extra + b"\r\n"
    )


CHAT_BODY = b'{"messages": [{"role": "user", "content": "hi"}]}'
CHUNKED_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"


@settings(FUZZ, max_examples=150)
@given(
    length=st.one_of(
        st.integers(-5, 2 * len(CHAT_BODY)).map(str),
        st.integers(0, 10**30).map(str),
        st.sampled_from(["", " ", "+5", "0x10", "1e3", "٣", "²", "5, 5", "00050", "-0"]),
        header_values,
    ),
)
@example(length=str(len(CHAT_BODY)))
def test_content_length_of_any_value(proxy: Proxy, length: str) -> None:
    """A wrong, non-numeric or huge Content-Length: an answer below 500 or a close, never
    a hang or a crash; the exact length still gets the completion. (The client ends its
    side after sending, or a length above the body's would leave the server waiting.)"""
    exact = length == str(len(CHAT_BODY))
    raw = raw_exchange(proxy.port, _post_head(length.encode()) + CHAT_BODY, half_close=not exact)
    answer = parse_answer(raw)
    assert_sane_raw(answer)
    if exact:
        assert answer is not None and answer.status == 200, answer


@pytest.mark.parametrize(
    ("length", "half_close", "status"),
    [
        (b"2", False, 400),  # the body is cut to `{"`: not JSON
        (b"0", False, 400),  # no body at all
        (b"100000000", False, 413),  # over limits.max_body_bytes: refused before reading
        (b"4000", True, None),  # more declared than sent, then the client leaves: no answer
    ],
)
def test_content_length_that_does_not_match_the_body(
    proxy: Proxy, length: bytes, half_close: bool, status: int | None
) -> None:
    """Shorter: the body is what was declared (400); too large: 413; longer than what comes:
    the proxy waits, then lets the request go when the client does."""
    answer = parse_answer(
        raw_exchange(proxy.port, _post_head(length) + CHAT_BODY, half_close=half_close)
    )
    assert_sane_raw(answer)
    if status is None:
        assert answer is None
    else:
        assert answer is not None and answer.status == status, answer
        assert "x-request-id" in answer.headers, answer.describe()
    proxy.assert_alive()


def test_non_numeric_content_length_is_refused_by_the_server_which_stays_up(proxy: Proxy) -> None:
    """The server's HTTP parser refuses `Content-Length: abc` itself, before the app runs:
    an OpenAI-shaped 400 with an x-request-id, a `rejected` log line with the same id, and
    the proxy stays up."""
    answer = parse_answer(raw_exchange(proxy.port, _post_head(b"abc") + b"{}", half_close=False))
    assert answer is not None and answer.status == 400, answer
    assert_sane_raw(answer)
    rejected = [line for line in read_log(proxy.log_path) if line["event"] == "rejected"]
    assert rejected and rejected[-1]["status"] == 400
    assert rejected[-1]["request_id"] == answer.headers["x-request-id"]
    assert set(rejected[-1]) == REJECTED  # the app's refusals have the same shape
    assert rejected[-1]["method"] is None and rejected[-1]["detail"]
    proxy.assert_alive()


# --- 3. paths and methods --------------------------------------------------------------------

segments = st.one_of(
    st.sampled_from(
        ["v1", "chat", "completions", "models", MODEL, "healthz", "stats", "metrics", "",
         ".", "..", "admin", "reload", "%00", "%ff", "%2F", "%zz", "%", ";", "~", "@", ":"]
    ),
    st.text(max_size=12).map(lambda s: urllib.parse.quote(s, safe="")),
)  # fmt: skip


@settings(FUZZ, max_examples=250)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    root=st.sampled_from(["/", "/v1/"]),
    parts=st.lists(segments, max_size=4),
    query=st.none() | st.text(max_size=12).map(urllib.parse.quote),
    body=st.sampled_from([b"", b"{}", CHAT_BODY, b"\xff"]),
)
@example(method="GET", root="/v1/", parts=["chat", "completions"], query=None, body=b"")
@example(method="DELETE", root="/v1/", parts=["models", MODEL], query=None, body=b"")
@example(method="GET", root="/v1/", parts=["models", "%ff"], query=None, body=b"")
@example(method="PATCH", root="/", parts=["chat", "completions"], query=None, body=CHAT_BODY)
@example(method="POST", root="/", parts=["", "v1", "chat", "completions"], query=None, body=b"{}")
@example(method="GET", root="/", parts=[":", "%zz", "%"], query="", body=b"")
@example(method="POST", root="/", parts=["admin", "reload"], query=None, body=b"")
def test_any_path_and_method(
    proxy: Proxy, method: str, root: str, parts: list[str], query: str | None, body: bytes
) -> None:
    """Random paths under / and /v1/ with any method: 404/405 (OpenAI-shaped) or an answer,
    never 5xx."""
    path = root + "/".join(parts)
    if query is not None:
        path += "?" + query
    # As raw_path, sent as it is: httpx would read "//x" as a host, or refuse ":x".
    url = httpx.URL(proxy.url).copy_with(raw_path=path.encode("ascii"))
    content = body if method in ("POST", "PUT", "PATCH") else None
    response = proxy.client.request(method, url, content=content)
    assert_sane(response)
    if response.status_code in (404, 405):
        error = assert_openai_error(response)
        assert error["code"] in ("not_found", "method_not_allowed", "model_not_found"), _describe(
            response
        )


# --- raw bytes that are not HTTP, or barely ----------------------------------------------------

GET = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
GARBAGE = {
    "binary": bytes(range(256)) * 4,
    "tls_client_hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(200)),
    "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "blank_lines": b"\r\n" * 5000,
    "line_without_end": b"GET /v1/models HTTP/1.1",
    "bare_newlines": b"GET /v1/models HTTP/1.1\nHost: x\n\n",
    "no_version": b"GET /v1/models\r\n\r\n",
    "bad_version": b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n",
    "space_in_path": b"GET /v1/mo dels HTTP/1.1\r\nHost: x\r\n\r\n",
    "nul_in_header": GET + b"X-A: a\x00b\r\n\r\n",
    "header_without_colon": GET + b"Host x\r\n\r\n",
    "bad_chunk_size": CHUNKED_HEAD + b"\r\nzz\r\n{}\r\n0\r\n\r\n",
    "chunked_and_length": CHUNKED_HEAD + b"Content-Length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "two_lengths": _post_head(b"2", b"Content-Length: 3\r\n") + b"{}",
    "websocket_upgrade": GET + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "h2c_upgrade": GET + b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    "huge_header": GET + b"X-Huge: " + b"a" * (4 << 20) + b"\r\n\r\n",
    "many_headers": GET + b"X-A: b\r\n" * 50000 + b"\r\n",
    "huge_request_line": b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "pipelined_junk": GET + b"\r\n" + bytes(range(256)),
}


@pytest.mark.parametrize("data", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_on_the_socket_leaves_the_server_up(proxy: Proxy, data: bytes) -> None:
    """What is not HTTP, or a head of megabytes: a 4xx or a close, and the proxy serves on."""
    assert_sane_raw(parse_answer(raw_exchange(proxy.port, data)))
    proxy.assert_alive()


@settings(FUZZ, max_examples=100)
@given(
    prefix=st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"POST /v1/chat/completions HTTP/1.1\r\n"]),
    data=st.binary(max_size=500),
)
def test_random_bytes_on_the_socket(proxy: Proxy, prefix: bytes, data: bytes) -> None:
    """Random bytes, alone or after a request line: never 5xx, never a hang."""
    assert_sane_raw(parse_answer(raw_exchange(proxy.port, prefix + data)))


# --- deep nesting: a known bug, kept apart (a 500 would break the shared connection) ----------


def _nested(depth: int) -> bytes:
    """A chat body whose `messages` makes `depth` nested JSON containers, the body included."""
    inner = depth - 1
    return b'{"messages": ' + b"[" * inner + b"]" * inner + b"}"


@pytest.mark.parametrize(
    ("depth", "status"),
    [
        (254, 200),  # orjson writes up to 254 levels
        (1100, 400),  # orjson reads up to 1024: refused as invalid JSON
        (255, 400),  # read, but orjson cannot write it again for the backend: refused
    ],
)
def test_deeply_nested_json_is_relayed_or_refused(
    fake: FakeBackend, tmp_path: Path, depth: int, status: int | None
) -> None:
    """Nesting deeper than a parser takes is a 400 (or relayed), never a 500."""
    running = Proxy(make_config(tmp_path, {"baseline": fake.url}), fake)
    try:
        response = running.post_chat(_nested(depth))
    finally:
        running.stop()  # and so its traceback is printed before this test's failure is
    assert_sane(response)
    if status is not None:
        assert response.status_code == status, _describe(response)


# --- 4. after all that ---------------------------------------------------------------------


def test_still_serves_completions_and_logged_no_internal_error(proxy: Proxy) -> None:
    """After every request above, a plain completion and a stream still work, and the log
    has no 500 and no internal_error, whatever ran before."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]}
    assert_completion(proxy.post_chat(json.dumps(body).encode()), model=MODEL)
    streamed = proxy.post_chat(json.dumps({**body, "stream": True}).encode())
    assert_completion(streamed, model=MODEL, wants_usage=False)
    proxy.assert_alive()
    # Split on "\n" only: a logged path may hold U+0085 or U+2028, and str.splitlines() (which
    # conftest.read_log uses) would cut the line there.
    text = proxy.log_path.read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.split("\n") if line]
    assert sum(line.get("event") == "request" for line in lines) >= 2
    bad = [
        line for line in lines if line.get("status") == 500 or line.get("error") == "internal_error"
    ]
    assert not bad, bad[:3]

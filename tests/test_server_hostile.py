"""The HTTP/1.1 server (proxy/server.py) against a hostile client, on real loopback sockets.

What an outside review found, each as the bytes that reproduced it: chunked trailers taken
for request headers (and an API key in a trailer accepted), trailer bytes read without a
cap, a pipelined request with a broken body hanging its connection, header values keeping
their trailing whitespace, a body that never comes holding its connection, an unbounded
`x-request-id`; and what the server writes never splitting a response (CR, LF or NUL in a
header), the request's arrival time in the scope. The server-level tests use the helpers
of `test_server.py`; those through the whole proxy use its own server in a thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from proxy.server import ON_DISCONNECT, RECEIVED_AT
from tests.conftest import RunningProxy, make_config
from tests.fakebackend import FakeBackend, wait_until
from tests.test_server import (
    GET,
    WAIT,
    assert_openai_error,
    connect,
    echo_app,
    read_body,
    read_response,
    respond,
    serving,
    until,
)

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
KEY = "sk-secret"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def chunked_post(path: bytes, body: bytes, trailers: bytes, extra: bytes = b"") -> bytes:
    """A chunked POST of `body` in one chunk, then the last chunk and `trailers`."""
    return (
        b"POST %b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n%b\r\n" % (path, extra)
        + b"%x\r\n%b\r\n0\r\n" % (len(body), body)
        + trailers
        + b"\r\n"
    )


# --- 1. trailers never become headers ------------------------------------------------------
async def test_trailers_never_reach_the_scope_headers() -> None:
    """Trailer fields are dropped: the scope's headers are the head's, also once the body
    (and the trailers after it) has been read."""
    seen: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = b"".join(await read_body(receive))
        seen.append(list(scope["headers"]))
        await respond(send, body)

    request = chunked_post(b"/", b"hello", b"X-Backend: baseline\r\nX-Request-Id: trailer-rid\r\n")
    async with serving(app) as running, connect(running.port) as client:
        await client.send(request + GET)  # and the next request is whole
        response = await client.response("POST")
        after = await client.response()
    assert (response.status, response.body, after.status) == (200, b"hello", 200)
    names = [name for name, _ in seen[0]]
    assert names == [b"host", b"transfer-encoding"]


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, value = line.split(":", 1)
        headers[name.lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        chunks, rest = [], body
        while True:
            size, _, rest = rest.partition(b"\r\n")
            if not int(size, 16):
                break
            chunks.append(rest[: int(size, 16)])
            rest = rest[int(size, 16) + 2 :]
        body = b"".join(chunks)
    return int(status_line.split()[1]), headers, body


@pytest.fixture
def guarded(tmp_path: Path, fake: FakeBackend, fake2: FakeBackend, serve_proxy: Any) -> Any:
    """The proxy with API keys, in front of `fake` (baseline) and `fake2` (speculative),
    the split sending everything to the speculative one."""
    config = make_config(
        tmp_path,
        {"baseline": fake.url, "speculative": fake2.url},
        routing={"split": {"baseline": 0, "speculative": 100}},
        auth={"api_keys": [KEY]},
    )
    return serve_proxy(config)


BODY = b'{"messages":[{"role":"user","content":"A"}],"max_tokens":1}'


def test_an_api_key_only_in_a_trailer_is_refused(guarded: RunningProxy) -> None:
    """The review's bytes: no key in the head, the key in a trailer -> 401, not 200."""
    port = int(guarded.url.rsplit(":", 1)[1])
    trailers = b"Authorization: Bearer sk-secret\r\nX-Backend: baseline\r\n"
    raw = raw_exchange(port, chunked_post(CHAT.encode(), BODY, trailers, b"Connection: close\r\n"))
    status, _, body = parse(raw)
    assert status == 401, raw
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


def test_routing_and_request_id_trailers_have_no_effect_and_are_not_forwarded(
    guarded: RunningProxy, fake: FakeBackend, fake2: FakeBackend
) -> None:
    """With the key in the head: a routing header and a request id in trailers change
    nothing, and no trailer field reaches the backend."""
    port = int(guarded.url.rsplit(":", 1)[1])
    head = b"Authorization: Bearer sk-secret\r\nConnection: close\r\n"
    trailers = b"X-Backend: baseline\r\nX-Request-Id: trailer-rid\r\nX-Smuggled: yes\r\n"
    raw = raw_exchange(port, chunked_post(CHAT.encode(), BODY, trailers, head))
    status, headers, _ = parse(raw)
    assert status == 200, raw
    assert headers["x-backend"] == "speculative"  # the split's choice, not the trailer's
    assert headers["x-request-id"] != "trailer-rid"
    [line] = guarded.wait_for_log(1)
    assert (line["backend"], line["reason"]) == ("speculative", "split")
    assert line["request_id"] == headers["x-request-id"]
    assert not fake.requests
    [seen] = fake2.requests
    assert "x-smuggled" not in seen.headers
    assert seen.headers["x-request-id"] == headers["x-request-id"]


# --- 2. trailers are capped ------------------------------------------------------------------
async def test_a_trailer_over_the_cap_is_refused_while_others_are_served() -> None:
    """A trailer that keeps growing past 64 KiB gets a 431 long before its end (the client
    still sending, up to 2 MiB), and another connection is served meanwhile."""
    async with serving(echo_app) as running, connect(running.port) as client:
        await client.send(chunked_post(b"/", b"x", b"")[:-2] + b"X-Big: ")
        refusal = asyncio.ensure_future(read_response(client.reader, "POST"))
        piece, sent, other_answered = b"a" * 16384, 0, False
        while sent < 2 * 1024 * 1024 and not refusal.done():
            if sent == 32768:  # half-way to the cap: is the loop serving others?
                async with connect(running.port) as other:
                    await other.send(GET)
                    other_answered = (await other.response()).status == 200
            client.writer.write(piece)
            try:
                await asyncio.wait_for(client.writer.drain(), WAIT)
            except ConnectionError:
                break
            sent += len(piece)
        response = await asyncio.wait_for(refusal, WAIT)
    assert other_answered
    assert sent < 512 * 1024  # the cap and a read or two, not the whole trailer
    error = assert_openai_error(response, 431)
    assert "trailer" in error["message"]
    assert response.header("connection") == "close"
    assert [reject["status"] for reject in running.rejects] == [431]


async def test_trailers_within_the_cap_are_accepted() -> None:
    """Many small trailer fields that add up to less than 64 KiB are read and dropped."""
    trailers = b"".join(b"X-T-%03d: %s\r\n" % (i, b"v" * 400) for i in range(100))
    async with serving(echo_app) as running, connect(running.port) as client:
        await client.send(chunked_post(b"/", b"body", trailers) + GET)
        first, second = await client.response("POST"), await client.response()
    assert (first.status, first.body, second.status) == (200, b"body", 200)
    assert not running.rejects


async def test_trailers_do_not_count_against_the_next_head() -> None:
    """Trailers and the next request's head are capped apart: 40 KB of each, arriving over
    several reads, are both fine."""

    async def paced(client: Any, data: bytes) -> None:
        for start in range(0, len(data), 10_000):  # pieces, each likely a read of its own
            await client.send(data[start : start + 10_000])
            await asyncio.sleep(0.02)

    trailer = b"X-T: " + b"t" * 40_000 + b"\r\n"
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-H: " + b"h" * 40_000 + b"\r\n\r\n"
    async with serving(echo_app) as running, connect(running.port) as client:
        await paced(client, chunked_post(b"/", b"body", trailer))
        first = await client.response("POST")
        await paced(client, head)
        second = await client.response()
    assert (first.status, first.body, second.status) == (200, b"body", 200)
    assert not running.rejects


# --- 3. a broken body behind a slow answer -----------------------------------------------------
async def test_a_pipelined_request_with_a_broken_body_gets_its_400_after_the_first() -> None:
    """A request answered after a while, then in the same write a chunked one whose chunk
    size is not hex: the first gets its answer, then the second its 400, then the close."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/slow":
            await asyncio.sleep(0.5)
        await respond(send, b"".join(await read_body(receive)) or b"slow")

    broken = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n"
    async with serving(app) as running, connect(running.port) as client:
        await client.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + broken)
        first = await client.response()
        second = await client.response("POST")
        assert await client.rest() == b""
    assert (first.status, first.body, first.header("connection")) == (200, b"slow", None)
    assert_openai_error(second, 400)
    assert second.header("connection") == "close"
    assert second.header("x-request-id") == "rejected-1"
    assert [reject["status"] for reject in running.rejects] == [400]


# --- 4. whitespace around header values ------------------------------------------------------
async def test_header_values_lose_leading_and_trailing_whitespace() -> None:
    """RFC 9110 5.5: spaces and tabs around a field value are not part of it."""
    seen: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(list(scope["headers"]))
        await respond(send, b"")

    request = (
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-Id:    spaced   \r\n"
        b"X-Session-Id: \tuser-1\t \r\nX-Inner: a  b\r\nX-Empty:   \r\n\r\n"
    )
    async with serving(app) as running, connect(running.port) as client:
        await client.send(request)
        await client.response()
    assert seen[0] == [
        (b"host", b"x"),
        (b"x-request-id", b"spaced"),
        (b"x-session-id", b"user-1"),
        (b"x-inner", b"a  b"),
        (b"x-empty", b""),
    ]


async def test_expect_100_continue_with_trailing_space_gets_its_100() -> None:
    """`Expect: 100-continue ` is 100-continue: the client waiting for it gets its 100."""
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue \r\n\r\n"
    async with serving(echo_app) as running, connect(running.port) as client:
        await client.send(head)
        interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), WAIT)
        await client.send(b"ok")
        response = await client.response("POST")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert (response.status, response.body) == (200, b"ok")


# --- 5. the body timeout ---------------------------------------------------------------------
async def test_a_body_that_never_comes_gets_408_and_the_close() -> None:
    """Content-Length announced, no body: after about `body_timeout` the app waiting in
    receive() hears http.disconnect, and the client gets an OpenAI-shaped 408 and a close."""
    heard: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        heard.append(await receive())
        await respond(send, b"too late")

    async with serving(app, body_timeout=0.4) as running, connect(running.port) as client:
        started = time.monotonic()
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        response = await asyncio.wait_for(read_response(client.reader, "POST"), 4.0)
        elapsed = time.monotonic() - started
        assert await client.rest() == b""
        await until(lambda: bool(heard))
    error = assert_openai_error(response, 408)
    assert error["code"] == "request_timeout"
    assert response.header("connection") == "close"
    # Not before the timeout; the upper bound, far from it (a loaded machine is slow), is
    # still below keep_alive (5 s), the other thing that would end the connection.
    assert 0.4 <= elapsed < 3.0, elapsed
    assert heard == [{"type": "http.disconnect"}]
    assert [reject["status"] for reject in running.rejects] == [408]


async def test_a_slow_but_steady_body_within_the_timeout_is_read() -> None:
    """A body that arrives in pieces, all within `body_timeout`, is a normal request."""
    async with serving(echo_app, body_timeout=1.0) as running, connect(running.port) as client:
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n")
        for piece in (b"ab", b"cd", b"ef", b"gh"):
            await asyncio.sleep(0.15)
            await client.send(piece)
        response = await client.response("POST")
    assert (response.status, response.body) == (200, b"abcdefgh")
    assert not running.rejects


async def test_a_pipelined_body_waiting_its_turn_is_not_timed_out() -> None:
    """The time a request waits behind another (its body unread, by the server's choice)
    does not count against its body timeout."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/slow":
            await asyncio.sleep(1.5)
        await respond(send, b"".join(await read_body(receive)) or b"slow")

    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n"
    # keep_alive only to sweep often (every 0.1 s): the connection is never idle here. The
    # client then waits over two sweeps, and three quarters of the timeout are to spare.
    async with (
        serving(app, body_timeout=1.0, keep_alive=0.2) as running,
        connect(running.port) as client,
    ):
        await client.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + head + b"ab")
        first = await asyncio.wait_for(read_response(client.reader, "GET"), 4.0)
        await asyncio.sleep(0.25)
        await client.send(b"cd")
        second = await client.response("POST")
    assert (first.body, second.status, second.body) == (b"slow", 200, b"abcd")
    assert not running.rejects


async def test_a_client_waiting_for_100_continue_is_not_timed_out() -> None:
    """`Expect: 100-continue`: the body clock starts with the 100, sent when the app first
    asks for the body, not when the head arrived."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(0.6)  # longer than body_timeout before it reads
        await respond(send, b"".join(await read_body(receive)))

    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    async with serving(app, body_timeout=0.3) as running, connect(running.port) as client:
        await client.send(head)
        interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), WAIT)
        await client.send(b"ok")
        response = await client.response("POST")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert (response.status, response.body) == (200, b"ok")
    assert not running.rejects


# --- 7. nothing written splits a response ----------------------------------------------------
@pytest.mark.parametrize(
    "header",
    [
        (b"x-evil", b"a\r\nset-cookie: pwned=1"),
        (b"x-evil", b"lone\rcr"),
        (b"x-evil", b"lone\nlf"),
        (b"x-evil", b"nul\x00byte"),
        (b"x-evil\r\nset-cookie: pwned", b"1"),
    ],
)
async def test_a_response_header_with_cr_lf_or_nul_is_a_500(header: tuple[bytes, bytes]) -> None:
    """An app (or a relayed backend header) with CR, LF or NUL in a header name or value:
    nothing of it is written, the client gets an OpenAI-shaped 500 (and the close, as after
    any app failure), and the server serves on."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/evil":
            await respond(send, b"body", headers=[header])
        else:
            await respond(send, b"fine")

    async with serving(app) as running:
        async with connect(running.port) as client:
            await client.send(b"GET /evil HTTP/1.1\r\nHost: x\r\n\r\n")
            evil = await client.response()
            assert await client.rest() == b""
        async with connect(running.port) as client:
            await client.send(GET)
            after = await client.response()
    assert_openai_error(evil, 500)
    assert all(name != "set-cookie" and "pwned" not in value for name, value in evil.headers)
    assert (after.status, after.body) == (200, b"fine")


# --- 8. the request's arrival time -----------------------------------------------------------
async def test_the_scope_says_when_the_head_was_parsed() -> None:
    """`scope["extensions"][RECEIVED_AT]` is perf_counter() at the end of the head: for a
    pipelined request, before the wait for the request ahead of it."""
    times: dict[str, tuple[float, float]] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        times[scope["path"]] = (scope["extensions"][RECEIVED_AT], time.perf_counter())
        if scope["path"] == "/slow":
            await asyncio.sleep(0.3)
        await respond(send, b"")

    async with serving(app) as running, connect(running.port) as client:
        sent = time.perf_counter()
        await client.send(
            b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        await client.response()
        await client.response()
    for received, started in times.values():
        assert sent <= received <= started
    received, started = times["/next"]
    assert started - received >= 0.3  # it waited its turn, and the clock counts that


# --- 6. the request id, through the proxy ----------------------------------------------------
@pytest.fixture
def proxy(tmp_path: Path, fake: FakeBackend, serve_proxy: Any) -> RunningProxy:
    config = make_config(tmp_path, {"baseline": fake.url})
    proxy: RunningProxy = serve_proxy(config)
    return proxy


def post_with_id(proxy: RunningProxy, request_id: bytes) -> tuple[int, dict[str, str]]:
    port = int(proxy.url.rsplit(":", 1)[1])
    head = (
        b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nX-Request-Id: %b\r\nConnection: close\r\n\r\n"
        % (CHAT.encode(), len(BODY), request_id)
    )
    status, headers, _ = parse(raw_exchange(port, head + BODY))
    return status, headers


@pytest.mark.parametrize(
    "given",
    [b"r" * 201, b"r" * 60_000, b"tab\there", b"caf\xc3\xa9"],
    ids=["201-chars", "60kB", "tab", "non-ascii"],
)
def test_a_request_id_too_long_or_not_printable_ascii_is_replaced(
    proxy: RunningProxy, fake: FakeBackend, given: bytes
) -> None:
    """Replaced by a generated id everywhere (answer, backend, log), and the log says so.
    (Other control characters never get this far: the parser refuses them with a 400.)"""
    status, headers = post_with_id(proxy, given)
    assert status == 200
    generated = headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    [line] = proxy.wait_for_log(1)
    assert (line["request_id"], line["request_id_replaced"]) == (generated, True)
    assert wait_until(lambda: fake.requests, WAIT)
    assert fake.requests[0].headers["x-request-id"] == generated


def test_a_request_id_within_the_limit_is_kept(proxy: RunningProxy, fake: FakeBackend) -> None:
    """200 printable ASCII characters, spaces and punctuation included, are the client's."""
    given = (b"id with spaces/~!" * 12)[:200]
    status, headers = post_with_id(proxy, given)
    assert status == 200
    assert headers["x-request-id"] == given.decode()
    [line] = proxy.wait_for_log(1)
    assert (line["request_id"], line["request_id_replaced"]) == (given.decode(), False)
    assert fake.requests[0].headers["x-request-id"] == given.decode()


def test_edge_whitespace_changes_neither_the_request_id_nor_the_sticky_backend(
    tmp_path: Path, fake: FakeBackend, fake2: FakeBackend, serve_proxy: Any
) -> None:
    """The review's bytes: `X-Request-Id:    spaced   ` is echoed and forwarded as
    `spaced`; a session id with a trailing space goes where the bare one goes."""
    config = make_config(
        tmp_path,
        {"baseline": fake.url, "speculative": fake2.url},
        routing={"sticky_header": "X-Session-Id"},
    )
    proxy: RunningProxy = serve_proxy(config)
    port = int(proxy.url.rsplit(":", 1)[1])

    def post(extra: bytes) -> dict[str, str]:
        head = b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n" % (
            CHAT.encode(),
            len(BODY),
        )
        status, headers, _ = parse(raw_exchange(port, head + extra + b"\r\n" + BODY))
        assert status == 200
        return headers

    post(b"X-Request-Id:    spaced   \r\n")
    [line] = proxy.wait_for_log(1)
    assert line["request_id"] == "spaced"  # exact, as logged, echoed and forwarded
    # Sessions whose bare and spaced forms differ in backend before stripping: one of the
    # first 16 ids, by the hash, lands elsewhere with a space; all must agree now.
    for n in range(16):
        bare = post(b"X-Session-Id: user-%d\r\n" % n)["x-backend"]
        assert post(b"X-Session-Id: user-%d \r\n" % n)["x-backend"] == bare


# --- 6. pipelining is capped -----------------------------------------------------------------
async def test_pipelined_requests_past_the_cap_are_refused_not_queued() -> None:
    """The review's flood, scaled down: 256 KiB of tiny pipelined GETs behind a slow first
    request. Pausing the reads did not stop the parser, so every request already read was
    queued (about 14,000 here, several hundred bytes each). Now 16 wait, the 17th gets a
    429 in its turn, and the connection closes after it."""
    gate = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await gate.wait()  # the first request is slow (a busy backend)
        await respond(send, scope["path"].encode())

    request = b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n"
    flood = b"".join(request % (n % 10) for n in range(256 * 1024 // len(request % 0)))
    async with serving(app) as running, connect(running.port) as client:
        client.writer.write(flood)  # the server stops reading: not all of it can be drained
        [conn] = await until_one(running)
        await until(lambda: conn.rejected)
        assert len(conn.queue) == 17  # 16 waiting, and the refused one, for its turn
        gate.set()
        answers = [await client.response() for _ in range(17)]
        refusal = await client.response()
        assert await client.rest() == b""
    assert [answer.status for answer in answers] == [200] * 17
    assert [answer.body for answer in answers] == [b"/%d" % (n % 10) for n in range(17)]
    error = assert_openai_error(refusal, 429)
    assert error["code"] == "too_many_pipelined_requests"
    assert refusal.header("connection") == "close"
    assert [reject["status"] for reject in running.rejects] == [429]


async def until_one(running: Any) -> list[Any]:
    await until(lambda: len(running.server.connections) == 1)
    return list(running.server.connections)


# --- 7. a client that does not read is dropped -----------------------------------------------
async def test_a_client_that_stops_reading_is_dropped_after_write_timeout() -> None:
    """The review's stalled reader: an answer the client never reads (a 1 KiB receive
    buffer) fills the buffers, so `send` waits. The connection is aborted once its writes
    have been paused for three times `write_timeout` (0.1 s here): the app's `send`
    returns, and it hears that the client left, whatever keep_alive and body_timeout are.
    Before, the connection stayed open for ever."""
    sent, left, ended = [0], asyncio.Event(), asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["extensions"][ON_DISCONNECT](left.set)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        piece = b"x" * 65536
        while sent[0] < 8 * 1024 * 1024 and not left.is_set():  # more than any buffer
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent[0] += len(piece)
        ended.set()

    async with serving(app, write_timeout=0.1, sndbuf=4096) as running:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", running.port)), WAIT)
            await asyncio.wait_for(loop.sock_sendall(sock, GET), WAIT)
            [conn] = await until_one(running)
            await until(lambda: conn.write_paused is not None and not conn.write_paused.done())
            await until(lambda: not running.server.connections, timeout=5 * WAIT)
            await asyncio.wait_for(ended.wait(), WAIT)
        finally:
            sock.close()
    assert left.is_set()
    assert sent[0] < 8 * 1024 * 1024  # ended by the drop, not by the app running out


# --- 8. an Upgrade with a body ------------------------------------------------------------------
async def test_an_upgrade_request_with_a_body_is_refused_not_emptied() -> None:
    """The review's bytes: with `Upgrade`, httptools ends the request at its head and hands
    the body over as the new protocol's bytes, so the app got an empty body. There is no
    protocol switch: such a request gets a 400 and never reaches the app; one without a
    body is answered (then the connection closes), and a pipelined one with a body is
    refused in its turn."""
    seen: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = b"".join(await read_body(receive))
        seen.append(body)
        await respond(send, body)

    upgrade = b"Connection: upgrade\r\nUpgrade: h2c\r\n"
    async with serving(app) as running:
        async with connect(running.port) as client:
            head = b"POST / HTTP/1.1\r\nHost: t\r\n%bContent-Length: 2\r\n\r\n" % upgrade
            await client.send(head + b"hi")
            refused = await client.response("POST")
            assert await client.rest() == b""
        async with connect(running.port) as client:  # behind a whole request: in its turn
            await client.send(
                b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
                b"POST / HTTP/1.1\r\nHost: t\r\n%bTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nhi\r\n0\r\n\r\n" % upgrade
            )
            first, second = await client.response("POST"), await client.response("POST")
            assert await client.rest() == b""
        async with connect(running.port) as client:
            await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n%b\r\n" % upgrade)
            plain = await client.response()
            assert await client.rest() == b""
    assert_openai_error(refused, 400)
    assert (first.status, first.body) == (200, b"abc")
    assert_openai_error(second, 400)
    assert plain.status == 200
    assert seen == [b"abc", b""]  # the bodiless GET; never an emptied POST
    assert [reject["status"] for reject in running.rejects] == [400, 400]

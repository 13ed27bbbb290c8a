"""The HTTP/1.1 server (proxy/server.py) on real loopback sockets, byte for byte.

Each test runs a `Server` with a small hand-written ASGI app in the test's own event loop and
talks to it with raw sockets, so the exact bytes on the wire are what is asserted: framing,
keep-alive, pipelining, request bodies, rejected requests, app errors, disconnects,
back-pressure and shutdown. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.server import Lifespan, Server

pytestmark = pytest.mark.anyio

WAIT = 2.0  # the bound on any wait for something that should happen at once
GET = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- the server under test ----------------------------------------------------------------
@contextlib.asynccontextmanager
async def no_state() -> AsyncIterator[dict[str, Any]]:
    yield {}


@dataclass
class Running:
    server: Server
    port: int
    task: asyncio.Task[None]
    rejects: list[dict[str, Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serving(
    app: ASGIApp,
    *,
    lifespan: Lifespan = no_state,
    keep_alive: float = 5.0,
    grace_seconds: float = 1.0,
    body_timeout: float = 30.0,
    write_timeout: float = 60.0,
    sndbuf: int | None = None,
) -> AsyncIterator[Running]:
    """Serve `app` on a free loopback port until the block ends."""
    rejects: list[dict[str, Any]] = []

    def on_reject(**fields: Any) -> str:
        rejects.append(fields)
        return f"rejected-{len(rejects)}"  # the answer's x-request-id

    server = Server(
        app,
        lifespan,
        keep_alive=keep_alive,
        grace_seconds=grace_seconds,
        body_timeout=body_timeout,
        write_timeout=write_timeout,
        on_reject=on_reject,
    )
    sock = socket.create_server(("127.0.0.1", 0))
    if sndbuf is not None:  # accepted connections inherit the listener's buffer sizes
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    port = sock.getsockname()[1]
    task = asyncio.create_task(server.serve([sock]))
    try:
        await until(lambda: server.started)
        yield Running(server, port, task, rejects)
    finally:
        server.shutdown()
        await asyncio.wait_for(task, 10)
        sock.close()


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


# --- a raw client ---------------------------------------------------------------------------
@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased
    body: bytes
    chunks: list[bytes] | None  # the body as framed, when it was chunked

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


async def read_head(reader: asyncio.StreamReader) -> tuple[int, list[tuple[str, str]]]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    version, status, _phrase = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers = []
    for line in lines:
        name, value = line.split(":", 1)
        headers.append((name.lower(), value.strip()))
    return int(status), headers


async def read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One chunk of a chunked body, its framing checked; b"" is the last."""
    size_line = await reader.readuntil(b"\r\n")
    data = await reader.readexactly(int(size_line[:-2], 16))
    assert await reader.readexactly(2) == b"\r\n"
    return data


async def read_response(reader: asyncio.StreamReader, method: str) -> Response:
    status, headers = await read_head(reader)
    response = Response(status, headers, b"", None)
    if method == "HEAD" or status in (204, 304):
        return response
    if response.header("transfer-encoding") == "chunked":
        response.chunks = []
        while chunk := await read_chunk(reader):
            response.chunks.append(chunk)
        response.body = b"".join(response.chunks)
    elif (length := response.header("content-length")) is not None:
        response.body = await reader.readexactly(int(length))
    else:
        response.body = await reader.read()  # delimited by the end of the connection
    return response


class Client:
    """One connection: exact bytes out, responses parsed strictly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), WAIT)

    async def response(self, method: str = "GET") -> Response:
        return await asyncio.wait_for(read_response(self.reader, method), WAIT)

    async def rest(self, timeout: float = WAIT) -> bytes:
        """Whatever the server sends until it closes the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    def sockname(self) -> tuple[str, int]:
        host, port = self.writer.get_extra_info("sockname")[:2]
        return host, port


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield Client(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# --- apps -------------------------------------------------------------------------------------
async def respond(
    send: Send, body: bytes, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A whole response, framed by Content-Length."""
    headers = [(b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> list[bytes]:
    """The request body, as the messages that carried it."""
    parts = []
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        parts.append(message["body"])
        if not message.get("more_body", False):
            return parts


async def hello_app(scope: Scope, receive: Receive, send: Send) -> None:
    await respond(send, b"hello", headers=[(b"x-app", b"yes")])


async def path_app(scope: Scope, receive: Receive, send: Send) -> None:
    await respond(send, scope["path"].encode())


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    await respond(send, b"".join(await read_body(receive)))


async def chunked_app(scope: Scope, receive: Receive, send: Send) -> None:
    """No Content-Length, three body messages (one of them empty)."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for part in (b"ab", b"", b"cd"):
        await send({"type": "http.response.body", "body": part, "more_body": True})
    await send({"type": "http.response.body", "body": b"ef"})


def assert_openai_error(response: Response, status: int) -> dict[str, Any]:
    assert response.status == status
    assert response.header("content-type") == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


# --- 1. responses ---------------------------------------------------------------------------
async def test_get_gets_status_app_headers_date_and_body() -> None:
    """A GET is answered with the app's status, headers and body, plus a current Date."""
    async with serving(hello_app) as running, connect(running.port) as client:
        await client.send(GET)
        response = await client.response()
    assert response.status == 200
    assert response.header("x-app") == "yes"
    assert response.header("content-length") == "5"
    assert response.header("transfer-encoding") is None
    assert response.body == b"hello"
    date = response.header("date")
    assert date is not None
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 5


async def test_response_without_content_length_is_chunked() -> None:
    """Without Content-Length the body is chunked, one chunk per non-empty body message."""
    async with serving(chunked_app) as running:
        async with connect(running.port) as client:
            await client.send(GET)
            response = await client.response()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}") as http:
            decoded = await asyncio.wait_for(http.get("/"), WAIT)
    assert response.header("transfer-encoding") == "chunked"
    assert response.header("content-length") is None
    assert response.chunks == [b"ab", b"cd", b"ef"]
    assert decoded.status_code == 200
    assert decoded.content == b"abcdef"


# --- 2. streaming ---------------------------------------------------------------------------
async def test_streamed_body_reaches_the_client_chunk_by_chunk() -> None:
    """Each body message is on the wire before the app sends the next one."""
    parts = [b"one", b"two", b"three"]
    client_has = [asyncio.Event() for _ in parts]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part, received in zip(parts, client_has, strict=True):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.wait_for(received.wait(), WAIT)  # the next only once this arrived
        await send({"type": "http.response.body", "body": b""})

    async with serving(app) as running, connect(running.port) as client:
        await client.send(GET)
        status, _ = await asyncio.wait_for(read_head(client.reader), WAIT)
        assert status == 200
        for part, received in zip(parts, client_has, strict=True):
            assert await asyncio.wait_for(read_chunk(client.reader), WAIT) == part
            received.set()
        assert await asyncio.wait_for(read_chunk(client.reader), WAIT) == b""


# --- 3. keep-alive ----------------------------------------------------------------------------
async def test_keep_alive_answers_two_requests_on_one_connection() -> None:
    """An HTTP/1.1 connection stays open: a second request on it is answered too."""
    async with serving(path_app) as running, connect(running.port) as client:
        await client.send(b"GET /one HTTP/1.1\r\nHost: test\r\n\r\n")
        first = await client.response()
        await client.send(b"GET /two HTTP/1.1\r\nHost: test\r\n\r\n")
        second = await client.response()
    assert (first.status, first.body, first.header("connection")) == (200, b"/one", None)
    assert (second.status, second.body, second.header("connection")) == (200, b"/two", None)


async def test_http10_request_gets_connection_close_and_is_closed() -> None:
    """An HTTP/1.0 request is answered with `connection: close`, then the server closes."""
    async with serving(hello_app) as running, connect(running.port) as client:
        await client.send(b"GET / HTTP/1.0\r\n\r\n")
        response = await client.response()
        assert await client.rest() == b""
    assert response.header("connection") == "close"
    assert response.body == b"hello"


async def test_connection_close_request_header_closes_after_the_answer() -> None:
    """`Connection: close` from the client: the answer says so, then the server closes."""
    async with serving(hello_app) as running, connect(running.port) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        response = await client.response()
        assert await client.rest() == b""
    assert response.header("connection") == "close"
    assert response.body == b"hello"


# --- 4. pipelining ----------------------------------------------------------------------------
async def test_pipelined_requests_are_answered_in_order() -> None:
    """Requests sent in one write are all answered, in order, even if the first is slowest."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = b"".join(await read_body(receive))
        if scope["path"] == "/first":
            await asyncio.sleep(0.05)
        await respond(send, scope["path"].encode() + b":" + body)

    requests = (
        b"GET /first HTTP/1.1\r\nHost: test\r\n\r\n"
        b"POST /second HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\n\r\nxyz"
        b"GET /third HTTP/1.1\r\nHost: test\r\n\r\n"
    )
    async with serving(app) as running, connect(running.port) as client:
        await client.send(requests)
        bodies = [(await client.response()).body for _ in range(3)]
    assert bodies == [b"/first:", b"/second:xyz", b"/third:"]


# --- 5. request bodies ------------------------------------------------------------------------
async def test_content_length_body_reaches_the_app_whole() -> None:
    """A Content-Length request body reaches the app whole."""
    async with serving(echo_app) as running, connect(running.port) as client:
        await client.send(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 11\r\n\r\nhello world")
        response = await client.response()
    assert response.body == b"hello world"


async def test_chunked_request_body_reaches_the_app_whole() -> None:
    """A chunked request body reaches the app de-chunked and whole."""
    request = (
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    async with serving(echo_app) as running, connect(running.port) as client:
        await client.send(request)
        response = await client.response()
    assert response.body == b"hello world"


async def test_large_body_sent_in_pieces_arrives_complete() -> None:
    """A 1 MiB body written in 16 KiB pieces to an app slow to read arrives complete."""
    body = bytes(range(256)) * 4096

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(0.1)  # let more than the 64 KiB read-ahead pile up
        parts = await read_body(receive)
        joined = b"".join(parts)
        digest = hashlib.sha256(joined).hexdigest()
        await respond(send, json.dumps([len(joined), digest, len(parts)]).encode())

    async with serving(app) as running, connect(running.port) as client:
        await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
        for start in range(0, len(body), 16384):
            await client.send(body[start : start + 16384])
        length, digest, messages = (await client.response()).json()
    assert (length, digest) == (len(body), hashlib.sha256(body).hexdigest())
    assert messages > 1  # it was read as it came, not buffered whole


async def test_expect_100_continue_is_answered_before_the_body() -> None:
    """`Expect: 100-continue` gets `100 Continue` before the client sends its body."""
    async with serving(echo_app) as running, connect(running.port) as client:
        await client.send(
            b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await client.send(b"hello")
        response = await client.response()
    assert (response.status, response.body) == (200, b"hello")


async def test_expect_100_continue_unanswered_when_the_app_skips_the_body() -> None:
    """An app that answers without reading the body sends no 100; the connection then closes."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, b"too large", status=413)

    async with serving(app) as running, connect(running.port) as client:
        await client.send(
            b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        response = await client.response()
        assert await client.rest() == b""
    assert (response.status, response.body) == (413, b"too large")


async def test_answer_before_the_body_arrived_says_the_connection_closes() -> None:
    """An app that answers before the request body is all in (a 404 that never reads it)
    gets `connection: close` on its answer, and the connection closes: a keep-alive client
    is told not to send its next request there."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, b"not found", status=404)

    async with serving(app) as running, connect(running.port) as client:
        await client.send(b"PATCH /x HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\n")
        response = await client.response()
        assert response.header("connection") == "close"
        with contextlib.suppress(ConnectionError):
            await client.send(b"12345")
        assert await client.rest() == b""
    assert response.status == 404


# --- 6. rejected requests ---------------------------------------------------------------------
async def test_malformed_request_gets_openai_400_and_is_closed() -> None:
    """A request the parser refuses gets an OpenAI-shaped 400, a close, and one on_reject."""
    called: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(scope)
        await respond(send, b"")

    async with serving(app) as running, connect(running.port) as client:
        await client.send(b"GARBAGE\r\n\r\n")
        response = await client.response()
        assert await client.rest() == b""
        host, port = client.sockname()
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert response.header("connection") == "close"
    assert response.header("x-request-id") == "rejected-1"
    assert [reject["status"] for reject in running.rejects] == [400]
    assert running.rejects[0]["client"] == f"{host}:{port}"
    assert not called


def oversized_head() -> bytes:
    """A request whose headers add up to a little over 64 KiB, the last one crossing it."""
    filler = b"".join(b"X-Filler-%02d: %s\r\n" % (i, b"a" * 1000) for i in range(64))
    return b"GET / HTTP/1.1\r\nHost: test\r\n" + filler + b"X-Last: " + b"b" * 2000 + b"\r\n\r\n"


async def test_oversized_head_gets_431_and_on_reject() -> None:
    """A request head over 64 KiB never reaches the app: an OpenAI-shaped 431, a close, and
    an on_reject."""
    called: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(scope)
        await respond(send, b"")

    async with serving(app) as running, connect(running.port) as client:
        await client.send(oversized_head())
        response = await client.response()
        assert await client.rest() == b""
    assert_openai_error(response, 431)
    assert response.header("x-request-id") == "rejected-1"
    assert [reject["status"] for reject in running.rejects] == [431]
    assert not called


async def test_head_that_never_ends_is_refused_past_the_limit() -> None:
    """A header line that keeps growing past 64 KiB is refused without waiting for its end."""
    async with serving(hello_app) as running, connect(running.port) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: test\r\nX-Endless: " + b"a" * 200_000)
        response = await asyncio.wait_for(read_response(client.reader, "GET"), 0.5)
    assert_openai_error(response, 431)


async def test_a_large_body_in_one_read_is_not_taken_for_a_large_head() -> None:
    """A 200 KB body that arrives with its head is body: a 200, and the connection kept."""
    body = b"x" * 200_000
    head = b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % len(body)
    async with serving(echo_app) as running, connect(running.port) as client:
        await client.send(head + body + GET)
        first = await client.response("POST")
        second = await client.response()
    assert first.status == 200 and first.header("connection") is None
    assert second.status == 200
    assert not running.rejects


async def test_a_malformed_chunked_body_gets_a_400_and_ends_the_request() -> None:
    """A chunk size that is not hex: the app reading the body is told the client is gone,
    the client gets an OpenAI-shaped 400, and the connection closes."""
    seen: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (message := await receive())["type"] == "http.request":
            seen.append(message)
        seen.append(message)

    async with serving(app) as running, connect(running.port) as client:
        await client.send(b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
        await until(lambda: bool(running.server.connections))
        await client.send(b"zz\r\n{}\r\n0\r\n\r\n")
        response = await client.response("POST")
        assert await client.rest() == b""
        await until(lambda: bool(seen) and seen[-1]["type"] == "http.disconnect")
    assert_openai_error(response, 400)
    assert [reject["status"] for reject in running.rejects] == [400]


async def test_pipelined_requests_before_garbage_are_answered() -> None:
    """Whole requests sent ahead of unparseable bytes get their answers before the close."""
    async with serving(path_app) as running, connect(running.port) as client:
        one, two = b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n", b"GET /two HTTP/1.1\r\nHost: t\r\n\r\n"
        await client.send(one + two + b"GARBAGE\r\n\r\n")
        first, second = await client.response(), await client.response()
        assert await client.rest() == b""
    assert (first.body, second.body) == (b"/one", b"/two")
    # The 400 was never sent (the answers were under way): no status is logged for it.
    assert [reject["status"] for reject in running.rejects] == [None]
    assert "not answered" in running.rejects[0]["detail"]


async def test_shutdown_now_cuts_requests_without_waiting_for_the_grace() -> None:
    """A second Ctrl-C (`shutdown(now=True)`) cancels what is in flight at once."""
    entered = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.set()
        await asyncio.sleep(5)

    async with serving(app, grace_seconds=30) as running, connect(running.port) as client:
        await client.send(GET)
        await asyncio.wait_for(entered.wait(), WAIT)
        started = time.monotonic()
        running.server.shutdown(now=True)
        await asyncio.wait_for(running.task, 2.0)
    assert time.monotonic() - started < 1.0


async def test_garbage_after_a_request_in_flight_is_rejected_once() -> None:
    """Garbage behind a request still being answered calls on_reject once, not once a read."""
    release = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.wait_for(release.wait(), WAIT)
        await respond(send, b"done")

    async with serving(app) as running, connect(running.port) as client:
        await client.send(GET)
        await client.send(b"GARBAGE\r\n\r\n")
        await until(lambda: bool(running.rejects))
        await client.send(b"MORE GARBAGE\r\n\r\n")
        await client.send(b"AND MORE\r\n\r\n")
        await asyncio.sleep(0.1)
        release.set()
        response = await client.response()
        assert await client.rest() == b""
        assert (response.body, response.header("connection")) == (b"done", "close")
    assert len(running.rejects) == 1, running.rejects


# --- 7. disconnects ---------------------------------------------------------------------------
async def test_receive_returns_disconnect_promptly_when_the_client_leaves() -> None:
    """An app waiting in receive() mid-response hears http.disconnect within 1 s of a close."""
    heard: list[tuple[Message, float]] = []
    done = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        message = await receive()
        heard.append((message, time.monotonic()))
        done.set()

    async with serving(app) as running:
        async with connect(running.port) as client:
            await client.send(GET)
            await asyncio.wait_for(read_head(client.reader), WAIT)
            assert await asyncio.wait_for(read_chunk(client.reader), WAIT) == b"first"
            await asyncio.sleep(0.05)
            assert not done.is_set()  # the answer is not over: receive() waits
        closed_at = time.monotonic()
        await asyncio.wait_for(done.wait(), 1.0)
    [(message, heard_at)] = heard
    assert message == {"type": "http.disconnect"}
    assert heard_at - closed_at < 1.0


# --- 8. app errors ----------------------------------------------------------------------------
async def test_app_raising_before_answering_gets_openai_500() -> None:
    """An app that raises before sending anything: an OpenAI-shaped 500, then a close."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    async with serving(app) as running, connect(running.port) as client:
        await client.send(GET)
        response = await client.response()
        assert await client.rest() == b""
    error = assert_openai_error(response, 500)
    assert "boom" not in error["message"]  # no internals to the client
    assert response.header("connection") == "close"


async def test_app_raising_mid_body_leaves_the_response_incomplete() -> None:
    """An app that raises mid-stream: the connection closes with no terminating chunk."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("boom")

    async with serving(app) as running:
        async with connect(running.port) as client:
            await client.send(GET)
            raw = await client.rest()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}") as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await asyncio.wait_for(http.get("/"), WAIT)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding: chunked" in head
    assert body == b"7\r\npartial\r\n"  # and no 0\r\n\r\n


async def test_app_returning_without_answering_gets_500() -> None:
    """An app that returns without sending anything: an OpenAI-shaped 500, then a close."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        return

    async with serving(app) as running, connect(running.port) as client:
        await client.send(GET)
        response = await client.response()
        assert await client.rest() == b""
    assert_openai_error(response, 500)


# --- 9. idle timeout --------------------------------------------------------------------------
async def test_idle_new_connection_is_closed_after_keep_alive() -> None:
    """A connection that sends nothing is closed after `keep_alive` seconds."""
    async with serving(hello_app, keep_alive=0.3) as running, connect(running.port) as client:
        started = time.monotonic()
        assert await client.rest(timeout=1.0) == b""
        waited = time.monotonic() - started
    assert 0.2 < waited < 1.0


async def test_idle_connection_after_a_response_is_closed_after_keep_alive() -> None:
    """A kept-alive connection idle after its answer is closed after `keep_alive` seconds."""
    async with serving(hello_app, keep_alive=0.3) as running, connect(running.port) as client:
        await asyncio.sleep(0.2)  # the first idle timer must not be the one that fires
        await client.send(GET)
        assert (await client.response()).body == b"hello"
        answered = time.monotonic()
        assert await client.rest(timeout=1.0) == b""
        waited = time.monotonic() - answered
    assert 0.2 < waited < 1.0


async def test_connection_stalled_mid_head_is_closed() -> None:
    """A client that sends part of a request head and then nothing is closed in time."""
    async with serving(hello_app, keep_alive=0.3) as running, connect(running.port) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: te")
        assert await client.rest(timeout=0.8) == b""


# --- 10. shutdown -----------------------------------------------------------------------------
async def test_shutdown_finishes_the_request_in_flight_and_refuses_new_ones() -> None:
    """After shutdown() no connection is accepted, but the request in flight is answered."""
    entered = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.set()
        await asyncio.sleep(0.3)
        await respond(send, b"done")

    async with serving(app) as running:
        async with connect(running.port) as client:
            await client.send(GET)
            await asyncio.wait_for(entered.wait(), WAIT)
            running.server.shutdown()
            await asyncio.sleep(0.05)
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", running.port)
            response = await client.response()
            assert await client.rest() == b""
        await asyncio.wait_for(running.task, WAIT)
    assert (response.status, response.body) == (200, b"done")
    assert response.header("connection") == "close"


async def test_shutdown_waits_for_a_request_whose_client_has_gone() -> None:
    """The app may still be finishing (its log line) after the last byte, when the client
    has already closed the connection: shutdown waits for it too, within the grace."""
    finished = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, b"done")
        await asyncio.sleep(0.3)  # after the answer: the client is gone by now
        finished.set()

    async with serving(app) as running:
        async with connect(running.port) as client:
            await client.send(GET)
            assert (await client.response()).body == b"done"
        await until(lambda: not running.server.connections)
        running.server.shutdown()
        await asyncio.wait_for(running.task, WAIT)
        assert finished.is_set()


async def test_shutdown_closes_idle_keep_alive_connections() -> None:
    """shutdown() closes a kept-alive connection with no request in flight at once."""
    async with serving(hello_app) as running, connect(running.port) as client:
        await client.send(GET)
        assert (await client.response()).body == b"hello"
        running.server.shutdown()
        assert await client.rest(timeout=0.5) == b""
        await asyncio.wait_for(running.task, WAIT)


async def test_shutdown_cancels_requests_past_the_grace_period() -> None:
    """A request still running after grace_seconds is cancelled and serve() returns."""
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        await respond(send, b"too late")

    async with serving(app, grace_seconds=0.2) as running, connect(running.port) as client:
        await client.send(GET)
        await asyncio.wait_for(entered.wait(), WAIT)
        started = time.monotonic()
        running.server.shutdown()
        await asyncio.wait_for(running.task, 1.0)
        stopped = time.monotonic() - started
        assert cancelled.is_set()
        response = await client.response()
        assert await client.rest() == b""
    assert 0.15 < stopped < 1.0
    assert_openai_error(response, 503)


# --- 11. back-pressure ------------------------------------------------------------------------
async def test_send_waits_while_the_client_does_not_read() -> None:
    """`send` stalls while the client reads nothing and resumes once it reads."""
    chunk, count = b"x" * 65536, 128  # 8 MiB, far more than the socket buffers hold
    sent = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal sent
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(count):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += 1
        await send({"type": "http.response.body", "body": b""})

    loop = asyncio.get_running_loop()
    async with serving(app, sndbuf=65536) as running:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", running.port)), WAIT)
            await loop.sock_sendall(sock, GET)
            stalled_at = await stall(lambda: sent)
            assert 0 < stalled_at < count
            received = b""
            while not received.endswith(b"\r\n0\r\n\r\n"):
                data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), WAIT)
                assert data, "closed before the end"
                received += data
    assert sent == count
    assert received.count(chunk) == count


async def stall(progress: Callable[[], int]) -> int:
    """Wait until `progress()` stops growing for 0.2 s; return where it stopped."""
    deadline = time.monotonic() + WAIT
    last, since = progress(), time.monotonic()
    while time.monotonic() - since < 0.2:
        assert time.monotonic() < deadline, "never stalled"
        await asyncio.sleep(0.01)
        if progress() != last:
            last, since = progress(), time.monotonic()
    return last


# --- 12. HEAD ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("app", "get_body"),
    [(hello_app, b"hello"), (chunked_app, b"abcdef")],
    ids=["content-length", "chunked"],
)
async def test_head_response_has_no_body(app: ASGIApp, get_body: bytes) -> None:
    """A HEAD answer is the head alone: the next response on the connection follows it."""
    async with serving(app) as running, connect(running.port) as client:
        await client.send(b"HEAD / HTTP/1.1\r\nHost: test\r\n\r\n")
        head = await client.response("HEAD")
        await client.send(GET)
        after = await client.response()  # a leaked HEAD body would garble its status line
    assert head.status == 200
    assert (after.status, after.body) == (200, get_body)
    if app is hello_app:
        assert head.header("content-length") == "5"


# --- 13. the scope ----------------------------------------------------------------------------
async def test_scope_describes_the_request() -> None:
    """The scope has the method, decoded path, raw path, query, headers and addresses."""
    scopes: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scopes.append(scope)
        await respond(send, b"")

    request = (
        b"POST /caf%C3%A9/a%2Fb%20c?q=a%20b&x=1 HTTP/1.1\r\n"
        b"Host: test\r\nX-Mixed-Case: Some Value\r\nContent-Length: 0\r\n\r\n"
    )
    async with serving(app) as running, connect(running.port) as client:
        await client.send(request)
        await client.response()
        client_address = client.sockname()
    [scope] = scopes
    assert scope["type"] == "http"
    assert scope["scheme"] == "http"
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "POST"
    assert scope["path"] == "/café/a/b c"
    assert scope["raw_path"] == b"/caf%C3%A9/a%2Fb%20c"
    assert scope["query_string"] == b"q=a%20b&x=1"
    assert scope["root_path"] == ""
    assert (b"x-mixed-case", b"Some Value") in scope["headers"]
    assert all(name == name.lower() for name, _ in scope["headers"])
    assert scope["client"] == client_address
    assert scope["server"] == ("127.0.0.1", running.port)


async def test_scope_http_version_of_an_http10_request() -> None:
    """An HTTP/1.0 request has http_version "1.0" and an empty query string."""
    scopes: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scopes.append(scope)
        await respond(send, b"")

    async with serving(app) as running, connect(running.port) as client:
        await client.send(b"GET /plain HTTP/1.0\r\n\r\n")
        await client.response()
    [scope] = scopes
    assert (scope["http_version"], scope["path"], scope["query_string"]) == ("1.0", "/plain", b"")


async def test_scope_state_is_a_copy_of_the_lifespan_state() -> None:
    """Each request gets its own copy of the lifespan's state: mutations do not carry over."""
    seen: list[dict[str, Any]] = []

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[dict[str, Any]]:
        yield {"model": "m"}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["state"]
        seen.append(dict(state))
        state["added"] = True
        del state["model"]
        await respond(send, b"")

    async with serving(app, lifespan=lifespan) as running, connect(running.port) as client:
        for _ in range(2):
            await client.send(GET)
            await client.response()
        assert running.server.state == {"model": "m"}
    assert seen == [{"model": "m"}, {"model": "m"}]


# --- HTTP/1.0 framing -------------------------------------------------------------------------
async def test_http10_response_without_content_length_is_not_chunked() -> None:
    """An HTTP/1.0 client gets a body without Content-Length delimited by the close."""
    async with serving(chunked_app) as running, connect(running.port) as client:
        await client.send(b"GET / HTTP/1.0\r\n\r\n")
        status, headers = await asyncio.wait_for(read_head(client.reader), WAIT)
        body = await client.rest()
    assert status == 200
    assert ("transfer-encoding", "chunked") not in headers
    assert body == b"abcdef"

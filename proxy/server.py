"""The HTTP/1.1 server the proxy runs on: asyncio and httptools, ASGI for one app.

Why not uvicorn: every completion passes through the server twice (in and out), and under
load uvicorn was a quarter of the proxy's CPU (`scripts/bench_overhead.py`, py-spy). Most of
that was its generality: a task, an event and a message-validation pass per request, and a
socket write for the response head on its own, before the body. Here the head goes out
with the first body message, in one write, and each connection (not each request) has
one task.

What it does: HTTP/1.1 and 1.0 over TCP, keep-alive (closed after `keep_alive` idle seconds),
pipelined requests answered in order (reading pauses while one waits its turn, but the
requests already read are parsed: past 16 waiting, the next gets a 429 in its turn and the
connection closes), Content-Length and chunked request bodies read as the app asks for them
(reading pauses when 64 KiB are waiting), `Expect: 100-continue`, write back-pressure (`send`
waits while the client is not reading; a connection whose writes stay paused for longer than
three times `write_timeout` is dropped), ASGI lifespan through a context manager, and a
graceful shutdown.
What it does not: TLS, HTTP/2, WebSockets, Unix sockets (`proxy/uvicorn_server.py` runs the
app under uvicorn for TLS).
Requests the parser rejects get an OpenAI-shaped 400 (431 for a head, or trailers, over
64 KiB; 408 for a body not in within `body_timeout`), unless an answer is already under
way, and the connection closes; a request with `Upgrade` and a body gets a 400 (there is no
protocol switch, and its body would be lost). Trailers are read and dropped; header values
lose their edge whitespace; a response header holding CR, LF or NUL is the app's error (a 500).

ASGI as uvicorn speaks it (spec 2.3): `send` after the client left is a no-op, and
`receive` then returns `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools
import orjson
from starlette.types import ASGIApp, Message

from proxy.errors import InternalError, ProxyError, ShuttingDownError, openai_error

Lifespan = Callable[[], contextlib.AbstractAsyncContextManager[Mapping[str, Any] | None]]

_READ_PAUSE_ABOVE = 64 * 1024  # request body bytes buffered before reading stops
_MAX_HEAD = 64 * 1024  # request line and headers, and a chunked body's trailers: more is a 431
# Pipelined requests parsed and waiting their turn, per connection. Pausing the reads does not
# stop the parser, which builds an exchange for every request already read (up to 256 KiB a
# read): without a cap a flood of tiny requests cost hundreds of bytes of memory per byte sent.
# The proxy's clients do not pipeline; a few waiting is generous.
_MAX_PIPELINED = 16
# A connection whose writes stay paused this many times `write_timeout` is dropped. The
# completion relays drop a client that stopped reading after between one and two times it,
# and log why (`client_write_timeout`): the server's drop is the net under every other
# answer (a 404, /metrics), and must not come first.
_WRITE_GRACE = 3
_LINGER_S = 2.0  # a refused client's remaining bytes are read and dropped for this long
_ASGI = {"version": "3.0", "spec_version": "2.3"}
# A scope extension: `scope["extensions"][ON_DISCONNECT](callback)` has `callback()` called
# when the client goes away before the answer is complete. The proxy needs to know at once
# (to stop the backend); ASGI's way, a task blocked in `receive()`, costs a task a request.
ON_DISCONNECT = "specproxy.on_disconnect"
# A scope extension: `scope["extensions"][RECEIVED_AT]` is `time.perf_counter()` when the
# request's head was parsed, so the app's clock includes any wait before it runs (a
# pipelined request's turn, a busy event loop).
RECEIVED_AT = "specproxy.received_at"
_log = logging.getLogger("proxy.server")


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


_STATUS_LINES = {status.value: _status_line(status.value) for status in HTTPStatus}


class _Date:
    """The Date header, formatted once a second rather than once a response."""

    def __init__(self) -> None:
        self._second = 0
        self._header = b""

    def header(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._header = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._header


class Server:
    """Serve `app` on listening sockets until `shutdown()` is called."""

    def __init__(
        self,
        app: ASGIApp,
        lifespan: Lifespan,
        *,
        keep_alive: float = 5.0,
        grace_seconds: float = 30.0,
        body_timeout: float = 30.0,
        write_timeout: float | Callable[[], float] = 60.0,
        on_reject: Callable[..., str | None] | None = None,
    ) -> None:
        """`on_reject(status=, error=, client=, detail=)` hears of requests the server
        refused (bytes the parser could not take, a body that did not come within
        `body_timeout` seconds): the proxy puts them in its log; `status` is None when no
        refusal could be sent (an answer was already under way). What it returns, if
        anything, is the answer's `x-request-id`. A connection whose writes have been paused
        (the client not reading) for longer than three times `write_timeout` seconds is
        dropped; given as a function, it is read at each sweep (a reload's value applies)."""
        self.app = app
        self.on_reject = on_reject
        self._lifespan = lifespan
        self.keep_alive = keep_alive
        self.grace_seconds = grace_seconds
        self.body_timeout = body_timeout
        self._write_timeout = write_timeout if callable(write_timeout) else lambda: write_timeout
        self.state: dict[str, Any] = {}
        self.connections: set[_ClientConnection] = set()
        # The connections' tasks, until done: one may outlive its connection (a client
        # that hung up on the last byte), and it is still finishing its request.
        self.tasks: set[asyncio.Task[None]] = set()
        self.date = _Date()
        self.started = False
        self._stopping = asyncio.Event()
        self._force = False

    async def serve(self, sockets: list[socket.socket]) -> None:
        """Run the lifespan, serve until `shutdown()`, then drain and end the lifespan."""
        loop = asyncio.get_running_loop()
        async with self._lifespan() as state:
            self.state = dict(state or {})
            servers = [
                await loop.create_server(lambda: _ClientConnection(self), sock=sock, backlog=2048)
                for sock in sockets
            ]
            self.started = True
            sweeper = asyncio.ensure_future(self._sweep())
            try:
                await self._stopping.wait()
            finally:
                sweeper.cancel()
                for server in servers:
                    server.close()
                await self._drain()

    def shutdown(self, *, now: bool = False) -> None:
        """Stop accepting; requests in flight get `grace_seconds` to finish, or none with
        `now` (a second Ctrl-C)."""
        if now:
            self._force = True
        self._stopping.set()

    async def _sweep(self) -> None:
        """Close connections idle for longer than `keep_alive`, a head half sent counting as
        idle, refuse requests whose body has not come within `body_timeout`, and drop
        connections whose writes have been paused for longer than `_WRITE_GRACE` times
        `write_timeout` (a client that does not read: `send` waits for it, and a close would
        wait for the data it has not taken, so only an abort ends it). One sweep
        for all connections rather than a timer per request, which was a measurable cost;
        each timeout is kept to within half of itself."""
        loop = asyncio.get_running_loop()
        while True:
            write_timeout = self._write_timeout()
            await asyncio.sleep(min(self.keep_alive, self.body_timeout, write_timeout) / 2)
            now, clock = loop.time(), time.perf_counter()
            for conn in list(self.connections):
                paused = conn.write_paused_since
                if paused is not None and now - paused > _WRITE_GRACE * write_timeout:
                    waited = now - paused
                    _log.info("dropped %s: not reading for %.1f s", conn.client, waited)
                    conn.abort()
                elif conn.idle_since is not None and now - conn.idle_since > self.keep_alive:
                    conn.transport.close()
                elif conn.body_waited(clock) > self.body_timeout:
                    conn.body_timed_out()

    async def _drain(self) -> None:
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = time.monotonic() + self.grace_seconds
        while (self.connections or self.tasks) and time.monotonic() < deadline and not self._force:
            await asyncio.sleep(0.05)
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()  # past the grace period: the app logs them as cancelled
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for conn in list(self.connections):
            conn.abort()
        # An abort (and a close) ends the socket in a callback on the loop's next turn: the
        # lifespan, and the loop, must not end before it, or the socket is left unclosed.
        for _ in range(3):
            if not self.connections:
                break
            await asyncio.sleep(0)


class _ClientConnection(asyncio.Protocol):
    """One client connection: requests parsed as they arrive, answered one at a time."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.task: asyncio.Task[None] | None = None  # answers the requests, in turn
        self.active: _ClientExchange | None = None  # the request being answered
        self._next: asyncio.Future[_ClientExchange | None] | None = None  # the task waits on it
        self.parsing: _ClientExchange | None = None  # the request whose bytes are arriving
        self.queue: deque[_ClientExchange] = deque()  # pipelined requests, in order
        self.closing = False
        self.write_paused: asyncio.Future[None] | None = None
        self.write_paused_since: float | None = None  # loop.time(), while writes are paused
        self.read_paused = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._expect = b""  # the Expect header's value, if any
        self._has_body = False  # the head announced a body (Content-Length, Transfer-Encoding)
        # A request refused while the parser was in a callback: what to answer it with.
        self._refusing: tuple[int, str, str] | None = None
        # The head (or the trailers) being read, two ways (see data_received): bytes
        # received while in it, and the size of the pieces the parser reported.
        self._head_received = 0
        self._head_parsed = 0
        self._breaks = 0  # heads completed, or body bytes parsed, in the read being parsed
        # Between messages or inside a head; or past a chunk's size line, before its data
        # (past the last chunk's: its trailers). Not in the body.
        self._in_head = True
        self.rejected = False
        # A pipelined request whose bytes broke while another was being answered: the
        # server's answer to it, written in its turn.
        self._refused: tuple[_ClientExchange, bytes] | None = None
        self.idle_since: float | None = self.loop.time()  # no request being answered
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.client = _address(transport.get_extra_info("peername"))
        self.local = _address(transport.get_extra_info("sockname"))

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return  # refused, or an unread body: the rest is dropped (see `_linger`)
        self._breaks = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.closing = True  # no protocol switch: the request is answered, then closed
        except httptools.HttpParserError as exc:
            if self._refusing is not None:  # raised by `on_headers_complete`
                self._reject(*self._refusing)
            elif self._head_parsed > _MAX_HEAD:  # raised by `_grow` inside a callback
                self._reject_large_head()
            else:
                self._reject(400, "bad_request", f"malformed HTTP request: {exc}")
            return
        if self._in_head and not self._breaks:
            # httptools gathers a header line until it ends, and reports none of it before.
            # No head ended and no body came in this read, so all of `data` is head (or
            # trailers): a field that never ends is refused too. (A read that ended a head
            # also held body or a next head; one with body bytes, the rest of a chunk.)
            self._head_received += len(data)
            if self._head_received > _MAX_HEAD:
                self._reject_large_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._next is not None and not self._next.done():
            self._next.set_result(None)  # the task, waiting for a request: none will come
        for exchange in (self.active, self.parsing, *self.queue):
            if exchange is not None:
                exchange.gone()
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close our side too: no half-open connections

    def pause_writing(self) -> None:
        if self.write_paused is None or self.write_paused.done():
            self.write_paused = self.loop.create_future()
            self.write_paused_since = self.loop.time()

    def resume_writing(self) -> None:
        self.write_paused_since = None
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)

    # --- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._expect = b""
        self._has_body = False
        self._head_parsed = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value))
        if self.parsing is not None:
            # A trailer (a field after a chunked body): dropped, as RFC 9110 6.5.1 allows.
            # The app has the head's fields already, and a trailer must not add to them
            # (a key, a routing header) behind the checks that read them.
            return
        name = name.lower()
        value = value.strip(b" \t")  # httptools keeps trailing whitespace (RFC 9110 5.5)
        self._headers.append((name, value))
        if name == b"expect":
            self._expect = value
        elif name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0")):
            self._has_body = True

    def on_headers_complete(self) -> None:
        received_at = time.perf_counter()
        self._in_head, self._head_received, self._head_parsed = False, 0, 0
        self._breaks += 1
        parser = self.parser
        url = httptools.parse_url(self._url)
        raw_path = url.path or b"/"
        version = parser.get_http_version()
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": version,
            "server": self.local,
            "client": self.client,
            "scheme": "http",
            "method": parser.get_method().decode("ascii"),
            "root_path": "",
            "path": unquote(raw_path.decode("ascii", "replace")),
            "raw_path": raw_path,
            "query_string": url.query or b"",
            "headers": self._headers,
            "state": self.server.state.copy(),
        }
        exchange = _ClientExchange(
            self, scope, keep_alive=parser.should_keep_alive(), received_at=received_at
        )
        scope["extensions"] = {ON_DISCONNECT: exchange.call_on_disconnect, RECEIVED_AT: received_at}
        exchange.expect_continue = version == "1.1" and self._expect.lower() == b"100-continue"
        self.parsing = exchange
        if len(self.queue) >= _MAX_PIPELINED:
            message = f"more than {_MAX_PIPELINED} pipelined requests waiting"
            self._refusing = (429, "too_many_pipelined_requests", message)
        elif self._has_body and parser.should_upgrade():
            # httptools would end the message at the head and hand the body over as the
            # new protocol's bytes: the app would see an empty body. No switch, so refused.
            message = "a request with Upgrade cannot have a body here (no protocol switch)"
            self._refusing = (400, "bad_request", message)
        if self._refusing is not None:
            # Refused in its turn (see `_reject`), never run. Raising stops the parser, so
            # no more of this read becomes requests.
            if self.active is None:
                exchange.scope = None  # its scope's cycle goes now
            else:
                self.queue.append(exchange)
            raise _Refused
        if self.active is None:
            self._start(exchange)
        else:
            self.queue.append(exchange)
            # Reads pause while a request waits its turn; those already read are parsed,
            # up to `_MAX_PIPELINED` of them.
            self._pause_reading()

    def on_chunk_header(self) -> None:
        # Until this chunk's data comes, what arrives may be trailers (if it was the last
        # chunk), and is counted like a head.
        self._in_head, self._head_received = True, 0

    def on_body(self, body: bytes) -> None:
        self._in_head = False
        self._breaks += 1
        exchange = self.parsing
        if exchange is None or exchange.complete:  # answered already: the rest is dropped
            return
        exchange.body.append(body)
        exchange.buffered += len(body)
        if exchange.buffered > _READ_PAUSE_ABOVE:
            self._pause_reading()
        exchange.wake()

    def on_message_complete(self) -> None:
        self._in_head, self._head_received = True, 0
        exchange = self.parsing
        if exchange is not None:
            exchange.more_body = False
            exchange.wake()
        self.parsing = None

    # --- the exchanges ------------------------------------------------------------------
    def _start(self, exchange: _ClientExchange) -> None:
        self.active, self.idle_since = exchange, None
        if self._next is not None:
            self._next.set_result(exchange)
        else:
            self.task = task = self.loop.create_task(self._answer(exchange))
            self.server.tasks.add(task)
            task.add_done_callback(self.server.tasks.discard)

    async def _answer(self, exchange: _ClientExchange | None) -> None:
        """The connection's task: its requests, one after the other. One task for all of
        them, as creating a task per request was a measurable share of the CPU."""
        try:
            while exchange is not None:
                await exchange.run()
                exchange = await self._following(exchange)
        finally:
            self.task = self.active = None
            if exchange is not None:  # cancelled (shutdown) or failed mid-way
                self.transport.close()

    async def _following(self, done: _ClientExchange) -> _ClientExchange | None:
        """The next request once `done` is answered: a pipelined one, or the next to
        arrive; None when the connection closes instead."""
        self.active = None
        # A body the app did not read to the end (a 413) may still be arriving: drop it, close.
        if done.more_body:
            self._linger()
            return None
        if not done.keep_alive or self.transport.is_closing():
            self.transport.close()
            return None
        if self.queue:  # pipelined requests whole before a close are answered first
            following = self.queue.popleft()
            if self._refused is not None and self._refused[0] is following:
                following.scope = None  # never run: its scope's cycle goes now
                self.transport.write(self._refused[1])  # its bytes broke: the refusal
                self._linger()
                return None
            self.active = following
            if not self.queue:
                self._resume_reading()
            return following
        if self.closing:
            self._linger() if self.rejected else self.transport.close()
            return None
        self._resume_reading()
        self.idle_since = self.loop.time()
        self._next = self.loop.create_future()
        try:
            return await self._next
        finally:
            self._next = None

    def resume_body(self) -> None:
        """The app read the buffered body: read on, unless pipelined requests wait."""
        if not self.queue:
            self._resume_reading()

    def close_when_idle(self) -> None:
        """Shutdown: close now if nothing is being answered, else after the answer."""
        self.closing = True
        if self.active is None:
            self.transport.close()

    def abort(self) -> None:
        self.transport.abort()

    def body_waited(self, clock: float) -> float:
        """Seconds the request being answered has waited for the rest of its body, while
        the server was reading (0 when it waits for nothing, or the server paused)."""
        exchange = self.parsing
        if exchange is None or exchange is not self.active or self.read_paused or self.rejected:
            return 0.0
        if exchange.expect_continue:  # the client waits for our 100 Continue
            return 0.0
        return clock - exchange.body_since

    def body_timed_out(self) -> None:
        message = f"the request body did not arrive within {self.server.body_timeout:g} s"
        self._reject(408, "request_timeout", message)

    def _reject_large_head(self) -> None:
        what = "request line and headers" if self.parsing is None else "trailer fields"
        message = f"{what} are larger than {_MAX_HEAD} bytes"
        self._reject(431, "request_header_fields_too_large", message)

    def _reject(self, status: int, code: str, message: str) -> None:
        """A request refused (bytes the parser could not take, a body that did not come):
        answered with `status` unless an answer is under way, then the connection is
        closed. A request whose body broke is ended for the app as if its client had left;
        one answered before the bad bytes keeps its answer, and a pipelined one behind it
        gets this refusal in its turn."""
        self.closing = self.rejected = True
        active, broken = self.active, self.parsing
        # Whether the refusal goes out: not after bytes of another answer, and not when the
        # bad bytes follow a whole request (nobody is waiting for an answer to them).
        if active is None or active is broken:
            sent = active is None or not active.written
        else:
            sent = broken is not None
        if not sent:
            message += "; not answered (another answer was under way), the connection closed"
        request_id = None
        if self.server.on_reject is not None:
            client = f"{self.client[0]}:{self.client[1]}" if self.client else None
            request_id = self.server.on_reject(
                status=status if sent else None, error=code, client=client, detail=message
            )
        refusal = _refusal(status, code, message, request_id)
        if active is not None and active is not broken:
            # Bad bytes after a whole request: it is answered, then the close. If they were
            # a pipelined request's body, that request is waiting its turn: it gets this.
            if broken is not None:
                self._refused = (broken, refusal)
            return
        if active is None or not active.written:
            self.transport.write(refusal)
        if active is not None:
            active.gone()
        self._linger()

    def _linger(self) -> None:
        """Close, but first read (and drop) what the client still sends, for up to
        `_LINGER_S`: a socket closed with unread data makes the kernel reset the connection,
        and the reset can destroy the answer before the client has read it."""
        self.rejected = True  # `data_received` drops everything from now on
        self._resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer is whole: the client sees it end
            self.loop.call_later(_LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _grow(self, size: int) -> None:
        """Count a complete piece of the head (one that arrived in a single read)."""
        self._head_parsed += size
        if self._head_parsed > _MAX_HEAD:
            raise _HeadTooLarge  # httptools turns it into an HttpParserError

    def _pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
            if self.parsing is not None:  # the pause was the server's: not the client's time
                self.parsing.body_since = time.perf_counter()


class _HeadTooLarge(Exception):
    pass


class _Refused(Exception):
    """Raised in `on_headers_complete` to stop the parser; `_refusing` says why."""


def _refusal(status: int, code: str, message: str, request_id: str | None) -> bytes:
    """The server's own answer to a request it refused, in the OpenAI shape, and a close."""
    body = orjson.dumps(openai_error(message, "invalid_request_error", code=code))
    return (
        _STATUS_LINES.get(status, _status_line(status))
        + b"content-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + (b"\r\nx-request-id: " + request_id.encode() if request_id else b"")
        + b"\r\nconnection: close\r\n\r\n"
        + body
    )


class _ClientExchange:
    """One request and its response: ASGI's `receive` and `send`."""

    __slots__ = (
        "body",
        "body_since",
        "buffered",
        "chunked",
        "complete",
        "conn",
        "disconnected",
        "ended",
        "expect_continue",
        "head",
        "head_only",
        "http11",
        "keep_alive",
        "more_body",
        "on_disconnect",
        "scope",
        "started",
        "waiter",
    )

    def __init__(
        self,
        conn: _ClientConnection,
        scope: dict[str, Any],
        *,
        keep_alive: bool,
        received_at: float,
    ) -> None:
        self.conn = conn
        # Handed to the app, then let go: the scope's extension refers to this exchange,
        # and a cycle would leave every request's objects to the garbage collector.
        self.scope: dict[str, Any] | None = scope
        self.head_only = scope["method"] == "HEAD"
        self.http11 = scope["http_version"] == "1.1"
        self.keep_alive = keep_alive
        self.expect_continue = False
        self.body: list[bytes] = []
        self.buffered = 0
        # Since when the body has been awaited (perf_counter): from the end of the head, or
        # from when the server read on for it (after its turn, a 100 Continue, a pause).
        self.body_since = received_at
        self.more_body = True
        self.ended = False  # the last of the body was handed to the app
        self.disconnected = False
        self.on_disconnect: Callable[[], None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.head = b""  # the response head, held until the first body message
        self.chunked = False
        self.started = False
        self.complete = False

    def call_on_disconnect(self, callback: Callable[[], None]) -> None:
        self.on_disconnect = callback

    @property
    def written(self) -> bool:
        """Whether any byte of the answer went out (the head waits for the first body)."""
        return self.started and not self.head

    def gone(self) -> None:
        """The client is gone (or its request broke): `receive` says so, `send` drops."""
        self.disconnected = True
        self.wake()
        if self.on_disconnect is not None and not self.complete:
            self.on_disconnect()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self.waiter = self.conn.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def run(self) -> None:
        try:
            scope, self.scope = self.scope, None
            assert scope is not None
            await self.conn.server.app(scope, self.receive, self.send)
        except asyncio.CancelledError:  # the shutdown's grace period is over
            await self._failed(ShuttingDownError())
            raise
        except Exception as exc:
            _log.error("exception in the app", exc_info=exc)
            await self._failed(InternalError())
        else:
            if not self.complete and not self.disconnected:  # else nothing is left to do
                if not self.started:
                    _log.error("the app returned without answering")
                await self._failed(InternalError())
        finally:
            # The app's callback holds its request's objects, and they hold the scope,
            # whose extension refers back to this exchange: a cycle per request otherwise.
            self.on_disconnect = None

    async def _failed(self, error: ProxyError) -> None:
        """End an answer the app did not finish: an error if nothing of it was written yet
        (the head waits for the first body message), else a closed connection, so that
        a half-sent answer cannot look complete."""
        if self.complete or self.disconnected:
            return
        if self.written:
            self.conn.transport.close()
            return
        conn = self.conn
        if conn.write_paused is not None and not conn.write_paused.done():
            conn.abort()  # a client that does not read would not take an error either
            return
        self.started, self.head, self.keep_alive, self.chunked = False, b"", False, False
        body = orjson.dumps(error.body())
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await self.send({"type": "http.response.start", "status": error.status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def receive(self) -> Message:
        if self.expect_continue and not self.started and not self.disconnected:
            self.expect_continue = False  # the client waits for this before sending its body
            self.conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.body_since = time.perf_counter()
        while not self.disconnected and not self.complete:
            if not self.ended and (self.body or not self.more_body):
                body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
                self.body.clear()
                self.buffered = 0
                self.ended = not self.more_body
                self.conn.resume_body()
                return {"type": "http.request", "body": body, "more_body": self.more_body}
            await self._wait()  # for more body, or (body read) for the client to leave
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.disconnected:
            return
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.head = self._head(message["status"], message.get("headers", ()))
            self.started = True
            return
        if kind != "http.response.body" or not self.started or self.complete:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        conn = self.conn
        if conn.write_paused is not None and not conn.write_paused.done():
            await conn.write_paused  # the client is slow: wait until it reads
            if self.disconnected:
                return
        body: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if self.head_only:
            body = b""
        elif self.chunked:
            framed = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            body = framed if more else framed + b"0\r\n\r\n"
        if self.head:
            body, self.head = self.head + body, b""
        if body:
            conn.transport.write(body)
        if not more:
            self.complete = True
            self.wake()  # a `receive` waiting for the client to leave: the answer is over

    def _head(self, status: int, headers: Any) -> bytes:
        parts = [_STATUS_LINES.get(status) or _status_line(status), self.conn.server.date.header()]
        framed = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length" or lower == b"transfer-encoding":
                framed = True
            elif lower == b"connection" and b"close" in value.lower():
                self.keep_alive = False
            parts.append(b"%b: %b\r\n" % (name, value))
        if not framed and status >= 200 and status not in (204, 304):
            if self.http11:
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:  # HTTP/1.0 knows no chunks: the body ends when the connection closes
                self.keep_alive = False
        # A request body not all in yet (a 413, a 404 that never read it) is not read on:
        # the connection closes after this answer, and the client is told so.
        closing = self.conn.closing and not self.conn.queue  # pipelined ones come first
        if not self.keep_alive or closing or self.more_body:
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        # Each part is one line, ending in the CRLF put there above: any other CR or LF
        # came from a header (an app's bug, a backend's header relayed) and would split the
        # response; a NUL, clients refuse. One pass over the whole head deletes all three
        # (faster than searching each name and value, or counting each character).
        if len(head) - len(head.translate(None, b"\r\n\0")) != 2 * len(parts):
            raise _unsafe_header(headers)
        return head


def _unsafe_header(headers: Any) -> RuntimeError:
    for name, value in headers:
        if any(char in name or char in value for char in (b"\r", b"\n", b"\0")):
            return RuntimeError(f"response header {name[:100]!r} holds CR, LF or NUL")
    return RuntimeError("response head holds CR, LF or NUL")  # the status: not an int?


def _address(info: Any) -> tuple[str, int] | None:
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return None

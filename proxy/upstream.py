"""The connection pool to the backends: asyncio and httptools, with request and response
types of its own.

httpx's own transport (httpcore) spent most of the proxy's CPU under load: profiled with
py-spy at 16 concurrent requests, 62% of the time was inside `AsyncClient.send`, a quarter in
the pool's bookkeeping alone, and the proxy kept under 5% of direct throughput. Later,
httpx's `Request` and `Response` objects alone (header normalisation, URL parsing, a
`typing.AsyncIterable` isinstance check in `aread`) were a quarter of the app's own CPU per
request, so the proxy's path uses the plain `UpstreamRequest` and `UpstreamResponse` below.
Backends need little: HTTP/1.1 and 1.0 over plain TCP, keep-alive, Content-Length, chunked
and close-delimited bodies (mlx_lm.server ends a stream by closing the connection), and
connect/read timeouts. This does only that, with the C parser the proxy's server uses too.

Any httpx transport (the tests' `MockTransport`) can stand in, through `HttpxTransport`.

What a connection may be trusted with (a proxy must never hand one client's answer to
another):
- Interim answers (1xx: 100 Continue, 103 Early Hints) are skipped, however many come
  before the final one; 101 Switching Protocols was never asked for and is an error.
- An answer's head is limited (`max_response_head_bytes`, interim heads included, and
  `MAX_HEADER_FIELDS`), and so is a body read whole (`max_response_body_bytes`, in
  `UpstreamResponse.read_all`): over a limit, `AnswerTooLargeError`.
- Any byte that arrives while no answer is due (after an answer's end, or on an idle
  connection) makes the connection unusable: it is closed. The answer already framed
  stands; the bytes never become the next request's answer.
- A request is sent once. A pooled connection that fails raises that failure; dead idle
  connections are weeded out before reuse instead (EOF or stray bytes close them at once,
  and one idle for `IDLE_FOR_S` is not reused). The completion path retries elsewhere.
- At most `max_connections_per_backend` connections to a backend: a request waits for one,
  first come first served, within its connect timeout (then `ConnectTimeout`).
- CR, LF or NUL in the request target or a header are refused (`UnsafeRequestError`),
  never written: no request built anywhere in the proxy can split into two.

Timeouts come with the request (`UpstreamTimeouts`). Failures are raised as httpx's
exceptions: `ConnectError`, `ConnectTimeout`, `ReadTimeout`, `ReadError` (connection reset)
and `RemoteProtocolError` (malformed or cut-short answer; `AnswerTooLargeError` is one).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import httptools
import httpx

_PAUSE_ABOVE = 1 << 20  # stop reading a backend that answers faster than the client reads
_SLACK = 0.005  # seconds a read timeout may fire late, to keep one timer per connection
# An idle connection older than this is closed rather than reused: servers close idle
# keep-alive connections after a few seconds (gunicorn 2, uvicorn and llama.cpp 5), and one
# closing just as a request goes out would fail that request.
IDLE_FOR_S = 2.0
MAX_HEADER_FIELDS = 100  # in one answer's head, as aiohttp and h11 allow
MAX_CONNECTIONS_PER_BACKEND = 1024
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
MAX_RESPONSE_BODY_BYTES = 64 * 1024 * 1024


class AnswerTooLargeError(httpx.RemoteProtocolError):
    """The backend's answer is over one of the pool's limits: its head, or a body read whole."""


class UnsafeRequestError(ValueError):
    """A request for a backend holds CR, LF or NUL in its target or a header: it would not
    be one request on the wire. A bug wherever it was built: it is never sent."""


class _StrayError(Exception):
    """Bytes after the end of the answer: raised from the parser's callback to stop it."""


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    """Seconds a request to a backend may wait.

    - connect:    for a connection (a free one from a full pool, or a new one).
    - first_byte: from sending the request to the answer's head. The relay holds the first
                  token to the same deadline: it is the config's `first_token`.
    - idle:       for each later read of the body (the relay changes it as a stream goes).
    """

    connect: float
    first_byte: float
    idle: float

    @classmethod
    def each(cls, seconds: float) -> UpstreamTimeouts:
        return cls(seconds, seconds, seconds)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A backend URL, parsed once: where to connect, and the request target."""

    url: str
    scheme: str
    host: str
    port: int
    netloc: bytes  # the Host header
    target: bytes  # path and query

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        host = parts.hostname or ""
        default = 443 if parts.scheme == "https" else 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(
            url=url,
            scheme=parts.scheme,
            host=host,
            port=parts.port or default,
            netloc=parts.netloc.rpartition("@")[2].encode("idna"),
            target=target.encode("ascii"),
        )


@dataclass(slots=True)
class UpstreamRequest:
    """A request for a backend, as it goes on the wire (Host, Content-Length and all)."""

    method: bytes
    endpoint: Endpoint
    headers: list[tuple[bytes, bytes]]
    body: bytes
    timeouts: UpstreamTimeouts

    @classmethod
    def get(cls, url: str, timeouts: UpstreamTimeouts) -> UpstreamRequest:
        endpoint = Endpoint.parse(url)
        return cls(b"GET", endpoint, [(b"host", endpoint.netloc)], b"", timeouts)


class Body(Protocol):
    """An answer's body, read as it arrives. `timeout` is the longest wait for the next
    read (the relay changes it as a stream goes); `limit` the most `read_all` takes (None:
    no limit); `aclose()` ends the answer: the connection goes back to the pool if it was
    read to the end, else it is closed, or, with `linger`, first left to read (and drop)
    the rest for up to that many seconds; `abort()` closes it, whatever came."""

    timeout: float | None
    limit: int | None

    async def read(self) -> bytes:
        """What has arrived since the last read (waiting for some), or b"" at the end."""
        ...

    async def aclose(self, linger: float = 0.0) -> None: ...

    def abort(self) -> None: ...


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: Body

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower case)."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def read_all(self) -> bytes:
        """The rest of the body, whole (for answers that are one JSON object), up to the
        body's `limit`: past it, the connection is closed and `AnswerTooLargeError` raised."""
        limit = self.body.limit
        if limit is not None:
            declared = self.header(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                self.body.abort()
                raise _body_too_large(limit, f"announces {int(declared)} bytes")
        chunks, size = [], 0
        while chunk := await self.body.read():
            size += len(chunk)
            if limit is not None and size > limit:
                self.body.abort()
                raise _body_too_large(limit, "goes on")
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self, linger: float = 0.0) -> None:
        """End the answer: see `Body.aclose`."""
        await self.body.aclose(linger)


def _body_too_large(limit: int, what: str) -> AnswerTooLargeError:
    return AnswerTooLargeError(
        f"answer body {what} past the limit of {limit} bytes (limits.max_response_body_bytes)"
    )


class Transport(Protocol):
    async def send(self, request: UpstreamRequest) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


class _BackendConnection(asyncio.Protocol):
    """One TCP connection to a backend; one request at a time.

    Between answers it is parked: any byte that arrives then closes it (see `park`).
    """

    # Slots: with more than 30 attributes, instances stop sharing their dict's keys, and
    # every attribute read on the per-read path got slower (by a quarter, measured).
    __slots__ = (
        "_buffered",
        "_chunks",
        "_deadline",
        "_dropping",
        "_error",
        "_fd",
        "_feed",
        "_field_bytes",
        "_fields",
        "_framed",
        "_head",
        "_head_bytes",
        "_in_head",
        "_interim",
        "_keep_alive",
        "_linger",
        "_loop",
        "_lost",
        "_max_head",
        "_on_end",
        "_parser",
        "_paused",
        "_timeout",
        "_timer",
        "_timer_at",
        "_transport",
        "_waiter",
        "_waiting",
        "closed",
        "complete",
        "headers",
        "idle_since",
        "on_body",
        "parked",
        "status",
    )
    on_body: Callable[[bytes], None]  # httptools' callback for each piece of the body

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_head: int,
        lost: Callable[[_BackendConnection], None],
    ) -> None:
        self._loop = loop
        self._max_head = max_head
        self._lost = lost  # tells the pool it is gone: see `UpstreamTransport._lost`
        self._transport: asyncio.Transport | None = None
        self._fd = -1  # the socket's, to look at it while idle: see `stirred`
        # A chunked answer has a piece per chunk, a stream a chunk per event: each goes
        # straight to the buffer, and `data_received` does the rest once per read.
        self._chunks: deque[bytes] = deque()
        self.on_body = self._chunks.append
        self._parser = httptools.HttpResponseParser(self)
        self._feed: Callable[[bytes], None] = self._unexpected  # parked until `send`
        self.closed = False
        self.parked = False  # in the pool's idle list
        self.idle_since = 0.0  # loop time it was parked
        # The wait in progress, its deadline (loop time), and the one timer: see `_within`.
        self._waiting: asyncio.Future[None] | None = None
        self._deadline = self._timer_at = 0.0
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self.reset()

    def reset(self) -> None:
        self._on_end: Callable[[], None] | None = None  # see `linger`
        self._dropping = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._framed = False  # Content-Length or chunked: EOF before the end is an error
        self._head: asyncio.Future[None] = self._loop.create_future()
        self._in_head = True  # until the final answer's head is complete
        self._interim = False  # parsing a 1xx answer, to be skipped
        self._head_bytes = 0  # of reads that ended inside the head
        self._field_bytes = self._fields = 0
        self._chunks.clear()
        self._buffered = 0  # bytes read since the buffer was emptied: body and framing
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False
        self._keep_alive = False
        self._error: Exception | None = None

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()

    def data_received(self, data: bytes) -> None:
        try:
            self._feed(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._malformed(exc)
        if self._chunks:  # some body came (see `on_body`)
            if self._dropping:
                self._chunks.clear()
                return
            self._buffered += len(data)
            if self._buffered > _PAUSE_ABOVE and self._transport is not None and not self._paused:
                self._paused = True
                self._transport.pause_reading()
            self._wake()
        elif self._in_head:  # reads with body bytes never pass here: they ended the head
            # httptools gathers a header's value across reads: count them as they come.
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                self._fail(self._head_too_large())
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:  # it would keep this connection alive until it fires
            self._timer.cancel()
            self._timer = None
        if not self._head.done():
            if exc is not None:
                self._fail(httpx.ReadError(f"connection lost: {exc}"))
            else:
                self._fail(
                    httpx.RemoteProtocolError("backend closed the connection without answering")
                )
        elif not self.complete:
            if exc is not None:
                self._fail(httpx.ReadError(f"connection lost mid-answer: {exc}"))
            elif self._framed:
                self._fail(httpx.RemoteProtocolError("backend closed the connection mid-answer"))
            else:  # a close-delimited body (HTTP/1.0 style) ends here
                self.complete = True
                self._wake()
        self._ended()
        self._lost(self)

    # --- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:  # the answer has ended: what comes is nobody's
            raise _StrayError

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        self._field_bytes += len(name) + len(value) + 4
        if self._field_bytes > self._max_head:
            raise self._head_too_large()  # the parser stops: see `_malformed`
        if self._fields > MAX_HEADER_FIELDS:
            raise AnswerTooLargeError(
                f"answer has more than {MAX_HEADER_FIELDS} header fields in its head"
            )
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = status = self._parser.get_status_code()
        if status < 200:  # an interim answer: the final one follows (RFC 9110 15.2)
            if status == 101:
                raise httpx.RemoteProtocolError(
                    "backend switched protocols (101), which the proxy never asks for"
                )
            self._interim = True
            self.headers.clear()
            return
        self._in_head = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length" or (
                lower == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                self._framed = True
        if not self._head.done():  # else the request was cancelled or timed out meanwhile
            self._head.set_result(None)

    def on_message_complete(self) -> None:
        if self._interim:  # the parser starts over for the next message
            self._interim = False
            return
        # Asked here: once the callback returns, the parser is reset for the next message.
        self._keep_alive = self._parser.should_keep_alive()
        self.complete = True
        self._wake()
        if self._on_end is not None:
            self._ended()

    # --- used by the pool ---------------------------------------------------------------
    def reusable(self) -> bool:
        # A paused connection (a big answer nobody read) would stall the next request.
        return self.complete and not self.closed and self._keep_alive and not self._paused

    def park(self, now: float) -> None:
        """Between answers: any byte that comes now closes the connection (`send` ends it)."""
        self._feed = self._unexpected
        self.idle_since = now

    def _unexpected(self, data: bytes) -> None:
        self.close()  # a stray answer, or the start of one: no request of ours can trust it

    def stirred(self) -> bool:
        """Whether bytes or an EOF wait unread on the idle socket (the loop has not called
        `data_received` yet): then it is as good as closed. One poll, half a microsecond,
        per reuse: without it, a stray answer that arrived just before a request went out
        would be read as that request's answer."""
        if self._fd < 0:
            return False
        poll = select.poll()
        poll.register(self._fd, select.POLLIN)
        return bool(poll.poll(0))

    def lingerable(self) -> bool:
        """Whether the answer may still end well: it is under way, and nothing failed."""
        return not self.complete and not self.closed and self._error is None

    def linger(self, seconds: float, end: Callable[[], None]) -> None:
        """Read the rest of an answer nobody needs, dropping it: `end()` is called when it
        has all come (the pool may take the connection back), and the connection closes
        if that takes longer than `seconds`."""
        self._chunks.clear()
        self._buffered = 0
        self._dropping = True
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        self._on_end = end
        self._linger = self._loop.call_later(seconds, self.close)

    def _ended(self) -> None:
        end, self._on_end = self._on_end, None
        if end is not None:
            if self._linger is not None:
                self._linger.cancel()
            end()

    def send(self, data: bytes) -> None:
        assert self._transport is not None
        self._feed = self._parser.feed_data
        self._transport.write(data)

    def head(self, timeout: float | None) -> Coroutine[Any, Any, None]:
        """Wait for the answer's head (a plain function: one coroutine fewer per request)."""
        return self._within(self._head, timeout)

    async def read(self, timeout: float | None) -> bytes:
        """All the body that has arrived, or b"" at the end of the body.

        Everything buffered at once: when the backend is ahead of the proxy, its chunks go
        out in one write to the client instead of one each, at no cost in latency.
        """
        while True:
            if self._chunks:
                chunk = self._chunks.popleft() if len(self._chunks) == 1 else self._drain()
                self._buffered = 0  # all of it
                if self._paused:
                    self._paused = False
                    assert self._transport is not None
                    self._transport.resume_reading()
                return chunk
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._waiter = self._loop.create_future()
            await self._within(self._waiter, timeout)

    def _drain(self) -> bytes:
        chunk = b"".join(self._chunks)
        self._chunks.clear()
        return chunk

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()

    async def _within(self, future: asyncio.Future[None], timeout: float | None) -> None:
        """Await `future`, failing it after `timeout` seconds.

        One timer per connection, moved lazily, rather than one per wait: a stream waits
        once per read. The timer is re-armed only for a deadline earlier than its own (by
        more than `_SLACK`); when it fires early, it re-arms for the current deadline.
        """
        if timeout is None or future.done():
            await future
            return
        loop = self._loop
        deadline = loop.time() + timeout
        self._waiting, self._deadline, self._timeout = future, deadline, timeout
        if self._timer is None or deadline < self._timer_at - _SLACK:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = loop.call_at(deadline, self._check_deadline)
        try:
            await future
        finally:
            self._waiting = None

    def _check_deadline(self) -> None:
        self._timer = None
        future = self._waiting
        if future is None or future.done():
            return  # no wait in progress: the next one arms a timer
        if self._loop.time() >= self._deadline:
            future.set_exception(httpx.ReadTimeout(f"no data for {self._timeout:g} s"))
        else:
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._check_deadline)

    def _head_too_large(self) -> AnswerTooLargeError:
        return AnswerTooLargeError(
            f"answer head is over the limit of {self._max_head} bytes"
            " (limits.max_response_head_bytes)"
        )

    def _malformed(self, exc: Exception) -> None:
        """The parser stopped: on a malformed answer, or on a callback's error."""
        cause = exc.__context__
        if not isinstance(cause, _StrayError):  # else the answer was whole: it stands
            self._fail(
                cause
                if isinstance(cause, httpx.HTTPError)
                else httpx.RemoteProtocolError(f"malformed answer: {exc}")
            )
        self.close()

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: the error is raised from `_error` too
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._waiter = None


class _Body:
    """A body read from a pooled connection (see `Body`)."""

    __slots__ = ("_conn", "_origin", "_pool", "_released", "limit", "timeout")

    def __init__(
        self,
        pool: UpstreamTransport,
        origin: _Origin,
        conn: _BackendConnection,
        read_timeout: float | None,
        limit: int,
    ) -> None:
        self._pool, self._origin, self._conn = pool, origin, conn
        self.timeout = read_timeout
        self.limit: int | None = limit
        self._released = False

    async def read(self) -> bytes:
        chunk = await self._conn.read(self.timeout)
        if not chunk:
            self._release()
        return chunk

    async def aclose(self, linger: float = 0.0) -> None:
        if linger and not self._released and self._conn.lingerable():
            self._released = True
            self._pool.linger(self._origin, self._conn, linger)
        self._release()

    def abort(self) -> None:
        self._released = True
        self._conn.close()  # the pool learns it from `connection_lost`

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self._origin, self._conn)


class _Origin:
    """The connections to one backend (host and port): the idle ones, how many are open,
    and the requests waiting for one while the pool is full."""

    __slots__ = ("address", "idle", "loop", "open", "waiters")

    def __init__(self, host: str, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.address = (host, port)
        self.loop = loop
        self.idle: list[_BackendConnection] = []  # most recently used last
        self.open = 0  # connected or connecting, idle ones included
        # Each gets a connection handed over, or None: a slot, to connect with.
        self.waiters: deque[asyncio.Future[_BackendConnection | None]] = deque()

    def describe(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"


class UpstreamTransport:
    """Keep-alive connections per backend origin, at most `max_connections_per_backend`
    open to each (idle, busy and connecting), and `max_idle_per_origin` of them idle."""

    def __init__(
        self,
        *,
        max_connections_per_backend: int = MAX_CONNECTIONS_PER_BACKEND,
        max_response_head_bytes: int = MAX_RESPONSE_HEAD_BYTES,
        max_response_body_bytes: int = MAX_RESPONSE_BODY_BYTES,
        max_idle_per_origin: int = 64,
    ) -> None:
        self._origins: dict[tuple[str, int], _Origin] = {}
        self._max_open = max_connections_per_backend
        self._max_head = max_response_head_bytes
        self._max_body = max_response_body_bytes
        self._max_idle = max_idle_per_origin
        self._lingering: set[_BackendConnection] = set()  # reading the end of an answer

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        endpoint, timeouts = request.endpoint, request.timeouts
        if endpoint.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"only http:// backends are supported, not {endpoint.url}"
            )
        payload = _serialise(request)
        origin = self._origins.get((endpoint.host, endpoint.port))
        if origin is None:
            loop = asyncio.get_running_loop()
            origin = _Origin(endpoint.host, endpoint.port, loop)
            self._origins[endpoint.host, endpoint.port] = origin
        conn = self._pooled(origin) or await self._acquire(origin, timeouts.connect)
        # Sent once, whatever happens next: a backend that got it may be generating, and a
        # second copy would generate again. A failure here is the caller's to handle.
        try:
            conn.send(payload)
            await conn.head(timeouts.first_byte)
        except BaseException:  # failed, or cancelled because the client left: close, so
            conn.close()  # the backend stops working for nobody
            raise
        body = _Body(self, origin, conn, timeouts.idle, self._max_body)
        return UpstreamResponse(conn.status, conn.headers, body)

    async def aclose(self) -> None:
        for origin in self._origins.values():
            for conn in origin.idle:
                self._unpark(conn).close()
            origin.idle.clear()
        for conn in list(self._lingering):
            conn.close()

    def _pooled(self, origin: _Origin) -> _BackendConnection | None:
        """An idle connection to `origin`, ready for a request, if there is a fresh one.
        Those idle too long are closed: the backend may be closing them as we speak."""
        idle = origin.idle
        if not idle:
            return None
        stale = origin.loop.time() - IDLE_FOR_S
        while idle and idle[0].idle_since < stale:  # the oldest first
            self._unpark(idle.pop(0)).close()
        while idle:
            conn = self._unpark(idle.pop())
            if conn.closed:
                continue
            if conn.stirred():
                conn.close()
                continue
            conn.reset()
            return conn
        return None

    @staticmethod
    def _unpark(conn: _BackendConnection) -> _BackendConnection:
        conn.parked = False
        return conn

    async def _acquire(self, origin: _Origin, timeout: float | None) -> _BackendConnection:
        """A connection to `origin`: a new one, or, when the pool is full, the first one
        that is free (or a new one in place of one that closed), in arrival order."""
        loop = origin.loop
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if origin.open < self._max_open and not origin.waiters:
                origin.open += 1
                return await self._connect(origin, timeout)
            handed = await self._wait(origin, timeout)
            if deadline is not None:
                timeout = max(deadline - loop.time(), 0.001)
            if handed is None:  # a slot: counted for us already
                return await self._connect(origin, timeout)
            if handed.stirred():
                handed.close()
            if not handed.closed:  # else it closed on its way to us: wait again
                handed.reset()
                return handed

    async def _wait(self, origin: _Origin, timeout: float | None) -> _BackendConnection | None:
        """Wait in line for a connection (or a slot) to `origin`, within `timeout`."""
        loop = origin.loop
        waiter: asyncio.Future[_BackendConnection | None] = loop.create_future()
        origin.waiters.append(waiter)
        timer = None
        if timeout is not None:
            error = httpx.ConnectTimeout(
                f"no free connection to {origin.describe()} within {timeout:g} s: the pool is"
                f" full ({self._max_open} open, limits.max_connections_per_backend)"
            )
            timer = loop.call_later(timeout, _expire, waiter, error)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                _leave_line(origin, waiter)
            else:  # handed over (and so out of line) just as we were cancelled: pass it on
                self._give_back(origin, waiter.result())
            raise
        except httpx.ConnectTimeout:
            _leave_line(origin, waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _give_back(self, origin: _Origin, handed: _BackendConnection | None) -> None:
        if handed is None:
            self._slot_freed(origin)
        else:
            self.release(origin, handed)

    async def _connect(self, origin: _Origin, timeout: float | None) -> _BackendConnection:
        """A new connection, in a slot already counted in `origin.open`."""
        loop = origin.loop
        host, port = origin.address
        max_head = self._max_head

        def lost(conn: _BackendConnection) -> None:
            self._lost(origin, conn)

        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _BackendConnection(loop, max_head, lost), host, port
                ),
                timeout,
            )
        except TimeoutError:
            self._slot_freed(origin)
            raise httpx.ConnectTimeout(
                f"no connection to {origin.describe()} within {timeout:g} s"
            ) from None
        except OSError as exc:
            self._slot_freed(origin)
            raise httpx.ConnectError(f"{exc.strerror or exc} ({origin.describe()})") from None
        except BaseException:  # cancelled
            self._slot_freed(origin)
            raise
        return conn

    def _lost(self, origin: _Origin, conn: _BackendConnection) -> None:
        """`conn` is closed: its slot goes to the first in line, or is free."""
        if conn.parked:
            conn.parked = False
            origin.idle.remove(conn)
        self._lingering.discard(conn)
        self._slot_freed(origin)

    def _slot_freed(self, origin: _Origin) -> None:
        while origin.waiters:
            waiter = origin.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        origin.open -= 1

    def linger(self, origin: _Origin, conn: _BackendConnection, seconds: float) -> None:
        """Let `conn` read the rest of its answer by itself, for up to `seconds`: kept if
        the answer ends in time, closed otherwise. Nothing waits for it."""
        self._lingering.add(conn)

        def end() -> None:
            self._lingering.discard(conn)
            self.release(origin, conn)

        conn.linger(seconds, end)

    def release(self, origin: _Origin, conn: _BackendConnection) -> None:
        if conn.reusable():
            conn.park(origin.loop.time())
            while origin.waiters:  # the first in line takes it
                waiter = origin.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            if len(origin.idle) < self._max_idle:
                conn.parked = True
                origin.idle.append(conn)
                return
        conn.close()  # an unfinished answer: closing tells the backend to stop


def _leave_line(origin: _Origin, waiter: asyncio.Future[Any]) -> None:
    """Take a waiter that gave up out of the line, unless a hand-over skipped it already."""
    with contextlib.suppress(ValueError):
        origin.waiters.remove(waiter)


def _expire(waiter: asyncio.Future[Any], error: Exception) -> None:
    if not waiter.done():
        waiter.set_exception(error)


def _serialise(request: UpstreamRequest) -> bytes:
    """The request's bytes. CR, LF and NUL are counted in the whole head at once (a few
    hundred nanoseconds): each may only be where the head's own line breaks are."""
    lines = [request.method + b" " + request.endpoint.target + b" HTTP/1.1"]
    lines.extend([name + b": " + value for name, value in request.headers])
    lines += (b"", b"")
    head = b"\r\n".join(lines)
    breaks = len(lines) - 1
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks or b"\0" in head:
        raise UnsafeRequestError(_unsafe(request))
    return head + request.body


def _unsafe(request: UpstreamRequest) -> str:
    """Which part of `request` holds CR, LF or NUL (the slow path of `_serialise`)."""

    def bad(value: bytes) -> bool:
        return any(c in value for c in (b"\r", b"\n", b"\0"))

    if bad(request.method) or bad(request.endpoint.target):
        return "the request line to the backend holds CR, LF or NUL: not sent"
    names = [name.decode("latin-1") for name, value in request.headers if bad(name + value)]
    return f"header {names[0]!r} of the request to the backend holds CR, LF or NUL: not sent"


class HttpxTransport:
    """Any httpx transport behind the pool's interface: the tests' `MockTransport`."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self._transport = transport

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        url = request.endpoint.url
        timeouts = request.timeouts
        response = await self._transport.handle_async_request(
            httpx.Request(
                request.method.decode(),
                url,
                headers=request.headers,
                content=request.body,
                extensions={
                    "timeout": {
                        "connect": timeouts.connect,
                        "read": timeouts.first_byte,
                        "write": None,
                        "pool": None,
                    }
                },
            )
        )
        return UpstreamResponse(response.status_code, response.headers.raw, _HttpxBody(response))

    async def aclose(self) -> None:
        await self._transport.aclose()


class _HttpxBody:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        # The stream as the transport gave it: `aiter_raw()` refuses a body already read,
        # as MockTransport's are.
        self._chunks: AsyncIterator[bytes] = response.stream.__aiter__()  # type: ignore[union-attr]
        self.timeout: float | None = None  # httpx transports take theirs per request
        self.limit: int | None = None  # the tests' transports: whatever they give

    async def read(self) -> bytes:
        async for chunk in self._chunks:
            if chunk:
                return chunk
        return b""

    async def aclose(self, linger: float = 0.0) -> None:
        await self._response.aclose()  # httpx reads no further: `linger` does not apply

    def abort(self) -> None:
        pass  # the tests' transports hold no connection


def as_transport(transport: Transport | httpx.AsyncBaseTransport) -> Transport:
    if isinstance(transport, httpx.AsyncBaseTransport):
        return HttpxTransport(transport)
    return transport

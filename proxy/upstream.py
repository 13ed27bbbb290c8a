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
Each connection is a `BackendConnection` (backend_connection.py): the parsing is there,
the pool's bookkeeping here.

What a connection may be trusted with (a proxy must never hand one client's answer to
another):
- Interim answers (1xx: 100 Continue, 103 Early Hints) are skipped, however many come
  before the final one; 101 Switching Protocols was never asked for and is an error.
- An answer's head is limited (`max_response_head_bytes`, interim heads included, and
  `MAX_HEADER_FIELDS`), and so is a body read whole (`max_response_body_bytes`, in
  `UpstreamResponse.read_all`): over a limit, `AnswerTooLargeError`.
- Any byte that arrives while no answer is due (after an answer's end, or on an idle
  connection) makes the connection unusable: it is closed. An answer that was whole before
  them stands, even in the same read, and even when the parser refuses them itself (any
  byte after a `Connection: close` or HTTP/1.0 answer); the bytes never become the next
  request's answer.
- A body, once released (read to its end, or closed), no longer touches its connection,
  which may be serving another request: a late `abort` does nothing, and a late `read`
  gets b"" again after the end, or `httpx.StreamClosed` if the body was closed before it.
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
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from proxy.backend_connection import AnswerTooLargeError as AnswerTooLargeError
from proxy.backend_connection import BackendConnection

# An idle connection older than this is closed rather than reused: servers close idle
# keep-alive connections after a few seconds (gunicorn 2, uvicorn and llama.cpp 5), and one
# closing just as a request goes out would fail that request.
IDLE_FOR_S = 2.0
MAX_CONNECTIONS_PER_BACKEND = 1024
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
MAX_RESPONSE_BODY_BYTES = 64 * 1024 * 1024


class UnsafeRequestError(ValueError):
    """A request for a backend holds CR, LF or NUL in its target or a header: it would not
    be one request on the wire. A bug wherever it was built: it is never sent."""


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


class _Spent:
    """What a released body reads from instead of its connection, which is the pool's then
    and may be serving another request: b"" again after the end, or `StreamClosed` when the
    body was closed before its end (b"" would pass for a whole answer). A stand-in rather
    than a flag, so the per-read path checks nothing more."""

    __slots__ = ("_whole",)

    def __init__(self, whole: bool) -> None:
        self._whole = whole

    async def read(self, timeout: float | None) -> bytes:
        if self._whole:
            return b""
        raise httpx.StreamClosed()


_ENDED, _CUT = _Spent(True), _Spent(False)


class _Body:
    """A body read from a pooled connection (see `Body`). Once released, a late `read` or
    `abort` (a caller's bug) never touches the connection: see `_Spent`."""

    __slots__ = ("_conn", "_origin", "_pool", "_released", "_source", "limit", "timeout")

    def __init__(
        self,
        pool: UpstreamTransport,
        origin: _Origin,
        conn: BackendConnection,
        read_timeout: float | None,
        limit: int,
    ) -> None:
        self._pool, self._origin, self._conn = pool, origin, conn
        self._source: BackendConnection | _Spent = conn  # what `read` reads from
        self.timeout = read_timeout
        self.limit: int | None = limit
        self._released = False

    async def read(self) -> bytes:
        chunk = await self._source.read(self.timeout)
        if not chunk:
            self._release(_ENDED)
        return chunk

    async def aclose(self, linger: float = 0.0) -> None:
        if linger and not self._released and self._conn.lingerable():
            self._released, self._source = True, _CUT
            self._pool.linger(self._origin, self._conn, linger)
        self._release(_CUT)

    def abort(self) -> None:
        if not self._released:
            self._released, self._source = True, _CUT
            self._conn.close()  # the pool learns it from `connection_lost`

    def _release(self, spent: _Spent) -> None:
        if not self._released:
            self._released, self._source = True, spent
            self._pool.release(self._origin, self._conn)


class _Origin:
    """The connections to one backend (host and port): the idle ones, how many are open,
    and the requests waiting for one while the pool is full."""

    __slots__ = ("address", "idle", "loop", "open", "waiters")

    def __init__(self, host: str, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.address = (host, port)
        self.loop = loop
        self.idle: list[BackendConnection] = []  # most recently used last
        self.open = 0  # connected or connecting, idle ones included
        # Each gets a connection handed over, or None: a slot, to connect with.
        self.waiters: deque[asyncio.Future[BackendConnection | None]] = deque()

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
        self._lingering: set[BackendConnection] = set()  # reading the end of an answer

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

    def _pooled(self, origin: _Origin) -> BackendConnection | None:
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
    def _unpark(conn: BackendConnection) -> BackendConnection:
        conn.parked = False
        return conn

    async def _acquire(self, origin: _Origin, timeout: float | None) -> BackendConnection:
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

    async def _wait(self, origin: _Origin, timeout: float | None) -> BackendConnection | None:
        """Wait in line for a connection (or a slot) to `origin`, within `timeout`."""
        loop = origin.loop
        waiter: asyncio.Future[BackendConnection | None] = loop.create_future()
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

    def _give_back(self, origin: _Origin, handed: BackendConnection | None) -> None:
        if handed is None:
            self._slot_freed(origin)
        else:
            self.release(origin, handed)

    async def _connect(self, origin: _Origin, timeout: float | None) -> BackendConnection:
        """A new connection, in a slot already counted in `origin.open`."""
        loop = origin.loop
        host, port = origin.address
        max_head = self._max_head

        def lost(conn: BackendConnection) -> None:
            self._lost(origin, conn)

        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: BackendConnection(loop, max_head, lost), host, port),
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

    def _lost(self, origin: _Origin, conn: BackendConnection) -> None:
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

    def linger(self, origin: _Origin, conn: BackendConnection, seconds: float) -> None:
        """Let `conn` read the rest of its answer by itself, for up to `seconds`: kept if
        the answer ends in time, closed otherwise. Nothing waits for it."""
        self._lingering.add(conn)

        def end() -> None:
            self._lingering.discard(conn)
            self.release(origin, conn)

        conn.linger(seconds, end)

    def release(self, origin: _Origin, conn: BackendConnection) -> None:
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

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

Timeouts come with the request: `connect`, `read` for the answer's head, and `idle`
(default: `read`) for each later read of its body.

Failures are raised as httpx's exceptions: `ConnectError`, `ConnectTimeout`, `ReadTimeout`,
`ReadError` (connection reset) and `RemoteProtocolError` (malformed or cut-short answer).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httptools
import httpx

_PAUSE_ABOVE = 1 << 20  # stop reading a backend that answers faster than the client reads
Timeouts = dict[str, float]  # "connect", "read" (to the head), "idle" (between body reads)
_SLACK = 0.005  # seconds a read timeout may fire late, to keep one timer per connection


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
    body: bytes = b""
    timeouts: Timeouts = field(default_factory=dict)

    @classmethod
    def get(cls, url: str, timeouts: Timeouts) -> UpstreamRequest:
        endpoint = Endpoint.parse(url)
        return cls(b"GET", endpoint, [(b"host", endpoint.netloc)], b"", timeouts)


class Body(Protocol):
    """An answer's body, read as it arrives. `timeout` is the longest wait for the next
    read (the relay changes it as a stream goes); `aclose()` ends the answer: the
    connection goes back to the pool if it was read to the end, else it is closed, or,
    with `linger`, first left to read (and drop) the rest for up to that many seconds."""

    timeout: float | None

    async def read(self) -> bytes:
        """What has arrived since the last read (waiting for some), or b"" at the end."""
        ...

    async def aclose(self, linger: float = 0.0) -> None: ...


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
        """The rest of the body, whole (for answers that are one JSON object)."""
        chunks = []
        while chunk := await self.body.read():
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self, linger: float = 0.0) -> None:
        """End the answer: see `Body.aclose`."""
        await self.body.aclose(linger)


class Transport(Protocol):
    async def send(self, request: UpstreamRequest) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


class _Connection(asyncio.Protocol):
    """One TCP connection to a backend; one request at a time."""

    on_body: Callable[[bytes], None]  # httptools' callback for each piece of the body

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        # A chunked answer has a piece per chunk, a stream a chunk per event: each goes
        # straight to the buffer, and `data_received` does the rest once per read.
        self._chunks: deque[bytes] = deque()
        self.on_body = self._chunks.append
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.used = False
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

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed answer: {exc}"))
            self.close()
        if self._chunks:  # some body came (see `on_body`)
            if self._dropping:
                self._chunks.clear()
                return
            self._buffered += len(data)
            if self._buffered > _PAUSE_ABOVE and self._transport is not None and not self._paused:
                self._paused = True
                self._transport.pause_reading()
            self._wake()

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

    # --- httptools callbacks ----------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length" or (
                lower == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                self._framed = True
        if not self._head.done():  # else the request was cancelled or timed out meanwhile
            self._head.set_result(None)

    def on_message_complete(self) -> None:
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

    __slots__ = ("_conn", "_key", "_pool", "_released", "timeout")

    def __init__(
        self,
        pool: UpstreamTransport,
        key: tuple[str, int],
        conn: _Connection,
        read_timeout: float | None,
    ) -> None:
        self._pool, self._key, self._conn = pool, key, conn
        self.timeout = read_timeout
        self._released = False

    async def read(self) -> bytes:
        chunk = await self._conn.read(self.timeout)
        if not chunk:
            self._release()
        return chunk

    async def aclose(self, linger: float = 0.0) -> None:
        if linger and not self._released and self._conn.lingerable():
            self._released = True
            self._pool.linger(self._key, self._conn, linger)
        self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self._key, self._conn)


class UpstreamTransport:
    """Keep-alive connections per backend origin; no cap on how many are open."""

    def __init__(self, max_idle_per_origin: int = 64) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._max_idle = max_idle_per_origin
        self._lingering: set[_Connection] = set()  # reading the end of an answer: `linger`

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        endpoint, timeouts = request.endpoint, request.timeouts
        if endpoint.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"only http:// backends are supported, not {endpoint.url}"
            )
        key = (endpoint.host, endpoint.port)
        payload = _serialise(request)
        conn = self._pooled(key) or await self._connect(key, timeouts.get("connect"))
        try:
            await self._send_head(conn, payload, timeouts)
        except (httpx.RemoteProtocolError, httpx.ReadError):
            if not conn.used:
                raise
            # A pooled keep-alive connection failed before any byte of an answer: most likely
            # the backend had closed it while idle, so the request goes again, once, on a new
            # connection. (A backend that read the request and then died would see it twice.)
            conn = await self._connect(key, timeouts.get("connect"))
            await self._send_head(conn, payload, timeouts)
        conn.used = True
        body = _Body(self, key, conn, timeouts.get("idle", timeouts.get("read")))
        return UpstreamResponse(conn.status, conn.headers, body)

    @staticmethod
    async def _send_head(conn: _Connection, payload: bytes, timeouts: dict[str, Any]) -> None:
        """Send the request and wait for the answer's head."""
        try:
            conn.send(payload)
            await conn.head(timeouts.get("read"))
        except BaseException:  # failed, or cancelled because the client left: close, so
            conn.close()  # the backend stops working for nobody
            raise

    async def aclose(self) -> None:
        for conn in [*self._lingering, *(c for idle in self._idle.values() for c in idle)]:
            conn.close()
        self._idle.clear()

    def _pooled(self, key: tuple[str, int]) -> _Connection | None:
        """An idle connection to `key`, ready for a request, if there is one."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reset()
                return conn
        return None

    async def _connect(self, key: tuple[str, int], timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), *key), timeout
            )
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"no connection to {key[0]}:{key[1]} within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise httpx.ConnectError(f"{exc.strerror or exc} ({key[0]}:{key[1]})") from None
        return conn

    def linger(self, key: tuple[str, int], conn: _Connection, seconds: float) -> None:
        """Let `conn` read the rest of its answer by itself, for up to `seconds`: kept if
        the answer ends in time, closed otherwise. Nothing waits for it."""
        self._lingering.add(conn)

        def end() -> None:
            self._lingering.discard(conn)
            self.release(key, conn)

        conn.linger(seconds, end)

    def release(self, key: tuple[str, int], conn: _Connection) -> None:
        if conn.reusable():
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()  # an unfinished answer: closing tells the backend to stop


def _serialise(request: UpstreamRequest) -> bytes:
    lines = [request.method + b" " + request.endpoint.target + b" HTTP/1.1"]
    lines.extend([name + b": " + value for name, value in request.headers])
    return b"\r\n".join(lines) + b"\r\n\r\n" + request.body


class HttpxTransport:
    """Any httpx transport behind the pool's interface: the tests' `MockTransport`."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self._transport = transport

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        url = request.endpoint.url
        response = await self._transport.handle_async_request(
            httpx.Request(
                request.method.decode(),
                url,
                headers=request.headers,
                content=request.body,
                extensions={"timeout": request.timeouts},
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

    async def read(self) -> bytes:
        async for chunk in self._chunks:
            if chunk:
                return chunk
        return b""

    async def aclose(self, linger: float = 0.0) -> None:
        await self._response.aclose()  # httpx reads no further: `linger` does not apply


def as_transport(transport: Transport | httpx.AsyncBaseTransport) -> Transport:
    if isinstance(transport, httpx.AsyncBaseTransport):
        return HttpxTransport(transport)
    return transport

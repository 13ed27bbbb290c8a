"""The connection pool to the backends: an httpx transport on asyncio and httptools.

httpx's own transport (httpcore) spent most of the proxy's CPU under load: profiled with
py-spy at 16 concurrent requests, 62% of the time was inside `AsyncClient.send`, a quarter in
the pool's bookkeeping alone, and the proxy kept under 5% of direct throughput. Backends
need little: HTTP/1.1 and 1.0 over plain TCP, keep-alive, Content-Length, chunked and
close-delimited bodies (mlx_lm.server ends a stream by closing the connection), and
connect/read timeouts. This does only that, with the C parser uvicorn uses too, behind
httpx's `Request`/`Response` so the code above it (and tests' `MockTransport`) is unchanged.

Timeouts come in the request's "timeout" extension: `connect`, `read` for the answer's head,
and `idle` (default: `read`) for each later read of its body.

Failures are raised as httpx's exceptions: `ConnectError`, `ConnectTimeout`, `ReadTimeout`,
`ReadError` (connection reset) and `RemoteProtocolError` (malformed or cut-short answer).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx

_PAUSE_ABOVE = 1 << 20  # stop reading a backend that answers faster than the client reads


class _Connection(asyncio.Protocol):
    """One TCP connection to a backend; one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.used = False
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._framed = False  # Content-Length or chunked: EOF before the end is an error
        self._head: asyncio.Future[None] = self._loop.create_future()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
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

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
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

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_ABOVE and self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        # Asked here: once the callback returns, the parser is reset for the next message.
        self._keep_alive = self._parser.should_keep_alive()
        self.complete = True
        self._wake()

    # --- used by the pool ---------------------------------------------------------------
    def reusable(self) -> bool:
        # A paused connection (a big answer nobody read) would stall the next request.
        return self.complete and not self.closed and self._keep_alive and not self._paused

    def send(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    async def head(self, timeout: float | None) -> None:
        await self._within(self._head, timeout)

    async def read(self, timeout: float | None) -> bytes:
        """All the body that has arrived, or b"" at the end of the body.

        Everything buffered at once: when the backend is ahead of the proxy, its chunks go
        out in one write to the client instead of one each, at no cost in latency.
        """
        while True:
            if self._chunks:
                chunk = self._chunks.popleft() if len(self._chunks) == 1 else self._drain()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _PAUSE_ABOVE // 2:
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
        if self._transport is not None:
            self._transport.close()

    async def _within(self, future: asyncio.Future[None], timeout: float | None) -> None:
        """Await `future`; a timer (cheaper than `wait_for`) fails it after `timeout`."""
        timer = None
        if timeout is not None and not future.done():
            timer = self._loop.call_later(timeout, self._time_out, future, timeout)
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()

    def _time_out(self, future: asyncio.Future[None], timeout: float) -> None:
        if not future.done():
            future.set_exception(httpx.ReadTimeout(f"no data for {timeout:g} s"))

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


class _Body(httpx.AsyncByteStream):
    def __init__(
        self,
        pool: UpstreamTransport,
        key: tuple[str, int],
        conn: _Connection,
        read_timeout: float | None,
    ) -> None:
        self._pool, self._key, self._conn = pool, key, conn
        self.timeout = read_timeout  # for each read; the relay changes it as a stream goes
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self._conn.read(self.timeout):
            yield chunk
        self._release()

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self._key, self._conn)


class UpstreamTransport(httpx.AsyncBaseTransport):
    """Keep-alive connections per backend origin; no cap on how many are open."""

    def __init__(self, max_idle_per_origin: int = 64) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._max_idle = max_idle_per_origin

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"only http:// backends are supported, not {request.url}"
            )
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        key = (request.url.host, request.url.port or 80)
        payload = _serialise(request, await request.aread())
        conn = await self._acquire(key, timeouts.get("connect"))
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
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_Body(self, key, conn, timeouts.get("idle", timeouts.get("read"))),
            extensions={"http_version": b"HTTP/1.1"},
        )

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
        for connections in self._idle.values():
            for conn in connections:
                conn.close()
        self._idle.clear()

    async def _acquire(self, key: tuple[str, int], timeout: float | None) -> _Connection:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reset()
                return conn
        return await self._connect(key, timeout)

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

    def release(self, key: tuple[str, int], conn: _Connection) -> None:
        if conn.reusable():
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()  # an unfinished answer: closing tells the backend to stop


def set_read_timeout(response: httpx.Response, seconds: float) -> None:
    """Change the longest wait for the next chunk of `response` (a no-op for responses of
    other transports, such as the tests' MockTransport)."""
    if isinstance(response.stream, _Body):
        response.stream.timeout = seconds


def _serialise(request: httpx.Request, body: bytes) -> bytes:
    url = request.url
    target = url.raw_path
    lines = [request.method.encode() + b" " + target + b" HTTP/1.1"]
    lines.extend(name + b": " + value for name, value in request.headers.raw)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body

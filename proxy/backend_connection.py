"""One keep-alive TCP connection to a backend, for the pool in upstream.py: httptools
parses its answers, one request at a time.

What it will not pass on as an answer: interim 1xx answers (skipped: RFC 9110 15.2; 101 is
an error), bytes after an answer's end (they close the connection; the whole answer before
them stands), and a head over its limits (`AnswerTooLargeError`). Between answers it is
parked: any byte then closes it.
"""

from __future__ import annotations

import asyncio
import select
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import httptools
import httpx

_PAUSE_ABOVE = 1 << 20  # stop reading a backend that answers faster than the client reads
_SLACK = 0.005  # seconds a read timeout may fire late, to keep one timer per connection
MAX_HEADER_FIELDS = 100  # in one answer's head, as aiohttp and h11 allow


class AnswerTooLargeError(httpx.RemoteProtocolError):
    """The backend's answer is over one of the pool's limits: its head, or a body read whole."""


class _StrayError(Exception):
    """Bytes after the end of the answer: raised from the parser's callback to stop it."""


class BackendConnection(asyncio.Protocol):
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
        lost: Callable[[BackendConnection], None],
    ) -> None:
        self._loop = loop
        self._max_head = max_head
        self._lost = lost  # tells the pool it is gone: see `upstream.UpstreamTransport`
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
        """The parser stopped: on a malformed answer, or on a callback's error.

        Once the answer is whole it stands, whatever stopped the parser after it: the start
        of another (`_StrayError`), or any byte after a `Connection: close` or HTTP/1.0
        answer, which llhttp refuses itself ("Data after `Connection: close`"). Those bytes
        only close the connection: the answer is not the backend's failure, and a request
        retried elsewhere would be generated twice."""
        if not self.complete:
            cause = exc.__context__
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

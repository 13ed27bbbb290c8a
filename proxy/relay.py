"""Talking to a backend and relaying its answer to the client, as raw ASGI.

The upstream response is opened before anything is sent to the client, so a dead backend
becomes a clean 502/504 instead of a broken stream. Stream events are forwarded as soon as
each one is complete, never collected. The upstream response is closed in `finally`, and a
client that goes away closes it at once: a speculative mlx_lm.server serves one request at
a time, and generating for nobody would block everyone else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from proxy.accesslog import RequestRecord
from proxy.errors import (
    BackendAnswerTooLargeError,
    BackendRefusedError,
    BackendStatusError,
    BackendTimeoutError,
    BackendUnreachableError,
    ProxyError,
)
from proxy.payload import rewrite
from proxy.sse import EventSplitter, Kind, classify, event_end, generated, quiet_until
from proxy.timing import Clock
from proxy.upstream import (
    AnswerTooLargeError,
    Transport,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeouts,
)

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]

_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
# How long a backend's connection may go on after [DONE] (what comes is read and dropped)
# before it is closed rather than kept: mlx_lm.server closes within 25 ms.
AFTER_DONE_S = 0.5


@dataclass(slots=True)
class Exchange:
    """One client request on its way to one backend, and what is learnt about it."""

    backend: str
    request: UpstreamRequest
    record: RequestRecord
    clock: Clock
    response_headers: list[tuple[bytes, bytes]]  # x-request-id and x-backend
    wants_usage: bool
    rewrites: tuple[tuple[bytes, bytes], ...]  # backend model name -> client model name
    # Set just before the last byte goes out: once the answer is complete, the server reports
    # a disconnect to anyone still listening, and that is not the client leaving early.
    complete: bool = False
    collect: list[str] | None = None  # the generated text goes here when shadowed
    sent_at: float = 0.0  # perf_counter() when the request went to the backend
    # Body messages the client has accepted, and whether one is on its way: see WriteWatch.
    sent: int = 0
    sending: bool = False

    @property
    def timeouts(self) -> UpstreamTimeouts:
        """Seconds: `first_byte` is the backend's first_token timeout, `idle` its idle one."""
        return self.request.timeouts


async def open_upstream(transport: Transport, exchange: Exchange) -> UpstreamResponse:
    """Send the request and wait for the response headers; errors become `ProxyError`s.

    Straight to the transport: a client adds auth, redirect and cookie handling that a
    proxy must not do anyway, at a measurable cost per request.
    """
    exchange.sent_at = time.perf_counter()
    try:
        response = await transport.send(exchange.request)
    except httpx.ConnectTimeout as exc:
        raise BackendTimeoutError(
            f"backend {exchange.backend!r}: no connection in time: {_describe(exc)}"
        ) from None
    except httpx.TimeoutException:
        raise BackendTimeoutError(_no_token(exchange)) from None
    except httpx.ConnectError as exc:
        raise BackendRefusedError(
            f"backend {exchange.backend!r} is unreachable: {_describe(exc)}"
        ) from None
    except AnswerTooLargeError as exc:
        raise _too_large(exchange.backend, exc) from None
    except httpx.TransportError as exc:
        raise BackendUnreachableError(
            f"backend {exchange.backend!r} is unreachable: {_describe(exc)}"
        ) from None
    if response.status >= 400:
        try:
            body = await _read(response, exchange.backend)
        finally:
            await response.aclose()
        raise BackendStatusError(response.status, body, exchange.backend)
    return response


async def relay_json(response: UpstreamResponse, exchange: Exchange, send: Send) -> None:
    """A non-stream answer: read it whole (it is one JSON object) and send it on. The
    whole of it falls under `first_token` (mlx_lm.server sends it all at the end)."""
    exchange.clock.headers()
    first_token_by = exchange.sent_at + exchange.timeouts.first_byte
    response.body.timeout = max(first_token_by - time.perf_counter(), 0.001)
    body = await _read(response, exchange.backend)
    payload = _json_object(body)
    _count_tokens(exchange.record, payload.get("usage"))
    if exchange.collect is not None:
        choices = payload.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            exchange.collect.append(generated(choices[0]) or "")
    body = rewrite(body, exchange.rewrites)
    headers = [
        (b"content-type", _content_type(response)),
        (b"content-length", str(len(body)).encode()),
        *exchange.response_headers,
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    exchange.record.status = response.status
    exchange.complete = True
    exchange.sending = True
    await send({"type": "http.response.body", "body": body})
    exchange.sending = False


async def relay_stream(response: UpstreamResponse, exchange: Exchange, send: Send) -> None:
    """An SSE answer: forward each whole event as it arrives, watching what passes.

    The answer starts (status and headers) with the backend's first event, not with its
    headers: until then nothing has reached the client, so a backend that fails or stalls
    in prefill raises a `ProxyError` here, and the request can still be retried elsewhere
    or answered with a plain error status. (`: keepalive` comments before it are dropped.)
    It ends with the read that brings `[DONE]`.
    """
    record = exchange.record
    splitter = EventSplitter()
    try:
        done = await _forward_events(response, exchange, splitter, send)
    except httpx.HTTPError as exc:
        if record.status is None:
            raise _stream_error(exchange, exc) from None
        await _fail_stream(send, exchange, _stream_error(exchange, exc))
        return
    if done:
        # The backend may still be closing (mlx_lm.server: 10-25 ms after [DONE]): its
        # connection reads the rest by itself, and neither this client nor its next
        # request on the same connection waits for that.
        await response.aclose(linger=AFTER_DONE_S)
        return
    if leftover := splitter.leftover():  # bytes after the last blank line: the client's too
        await _send_events(send, exchange, response, leftover)
    if record.error is None:
        # mlx_lm.server speaks HTTP/1.0: a backend that dies mid-stream looks like a clean
        # end of the body. Only `[DONE]` says the answer is complete.
        message = f"backend {exchange.backend!r} ended the stream before [DONE]"
        error = BackendUnreachableError(message, code="stream_incomplete")
        if record.status is None:
            raise error
        await _fail_stream(send, exchange, error)
        return
    exchange.complete = True
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_events(
    send: Send, exchange: Exchange, response: UpstreamResponse, body: bytes, more: bool = True
) -> None:
    """Forward whole events, starting the answer first if they are its first bytes."""
    if exchange.record.status is None:
        headers = _SSE_HEADERS + exchange.response_headers
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        exchange.record.status = response.status
    exchange.sending = True
    await send({"type": "http.response.body", "body": body, "more_body": more})
    exchange.sending = False
    exchange.sent += 1


async def _forward_events(
    response: UpstreamResponse, exchange: Exchange, splitter: EventSplitter, send: Send
) -> bool:
    """Forward the backend's events, whole, as they arrive, up to the read that brings
    [DONE] (it ends the client's response); True if it came."""
    clock = exchange.clock
    # Until the first token, each read may wait only for what is left of `first_token`;
    # after it, `idle` (the transport's default for reads of the body).
    first_token_by = exchange.sent_at + exchange.timeouts.first_byte
    response.body.timeout = max(first_token_by - time.perf_counter(), 0.001)
    while chunk := await response.body.read():
        waiting = clock.first_token is None
        body, done = _take_events(splitter.feed(chunk), exchange)
        if clock.first_token is None:
            response.body.timeout = max(first_token_by - time.perf_counter(), 0.001)
        elif waiting:
            response.body.timeout = exchange.timeouts.idle
        if body:  # with [DONE], never empty
            body = rewrite(body, exchange.rewrites)  # events are whole: no name is cut
            # With [DONE] the answer is whole, not when the backend closes (mlx_lm.server
            # takes 10-25 ms more): that is its latency, the client's response ends here,
            # in the same write (the openai SDK reads to its end), and a client that hangs
            # up on [DONE] has not left early.
            await _send_events(send, exchange, response, body, more=not done)
        if done:
            exchange.complete = True  # after: a client that left during the write had not
            clock.finish()
            return True
    return False


def _take_events(block: bytes, exchange: Exchange) -> tuple[bytes, bool]:
    """What the client gets of one read's events, up to [DONE] if it is among them (what
    follows is not the client's), and whether it was; what the events say goes to the
    exchange's record and clock.

    Events that came in one read arrived together: once one of them carries content, the
    clock has all it can learn from this read. The events after it need reading only if
    they may be something else (usage, an error, [DONE]: see `quiet_until`) or their
    text is wanted (a shadowed request); the others pass unread, as one slice. Comments
    are dropped only before the answer's first event: after it, they start nothing.
    """
    record, clock = exchange.record, exchange.clock
    dropped: list[tuple[int, int]] = []  # (start, end) of events the client does not get
    done = timed = False
    # Until an event of the answer goes, a comment would start it: see relay_stream.
    unstarted = record.status is None
    start, size = 0, len(block)
    while start < size:
        end = event_end(block, start)
        event = classify(block[start:end])
        drop = False
        if event.kind is Kind.CONTENT:
            if not timed:  # the clock reads once per read: its events arrived together
                clock.token()
                timed = True
            if exchange.collect is not None:
                exchange.collect.append(event.text)
        elif event.kind is Kind.DONE:
            done = True
        elif event.kind is Kind.ERROR:
            record.error = "backend_stream_error"
        elif event.kind is Kind.COMMENT:
            drop = unstarted  # a keepalive before the answer
        if event.usage is not None:
            _count_tokens(record, event.usage)
            drop = event.kind is Kind.USAGE and not exchange.wants_usage
        if drop:
            dropped.append((start, end))
        else:
            unstarted = False
            if event.kind is Kind.CONTENT and exchange.collect is None:
                end = quiet_until(block, end)
        start = end
        if done:  # what follows [DONE] is not the client's: see relay_stream
            block = block[:end]
            break
    if not dropped:
        return block, done
    kept, at = [], 0
    for start, end in dropped:
        kept.append(block[at:start])
        at = end
    kept.append(block[at:])
    return b"".join(kept), done


def _stream_error(exchange: Exchange, exc: httpx.HTTPError) -> ProxyError:
    if isinstance(exc, httpx.TimeoutException):
        if exchange.clock.first_token is None:
            return BackendTimeoutError(_no_token(exchange))
        return BackendTimeoutError(_stalled(exchange))
    message = f"backend {exchange.backend!r} failed mid-stream: {_describe(exc)}"
    return BackendUnreachableError(message, code="stream_interrupted")


async def watch_disconnect(receive: Receive, exchange: Exchange, task: asyncio.Task[Any]) -> None:
    """Cancel the exchange's task as soon as the client goes away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            client_left(exchange, task)
            return


def client_left(exchange: Exchange, task: asyncio.Task[Any]) -> None:
    """The client went away: unless its answer is whole, stop the exchange's task."""
    if not exchange.complete:
        exchange.record.client_disconnected = True
        task.cancel()


class WriteWatch:
    """Drops clients that stopped reading: a request whose same body message has been
    waiting for its client at two sweeps `seconds` apart is cancelled, as if the client had
    left. Without it, such a client would hold its backend (a one-at-a-time speculative
    server) for as long as its connection stays open. One timer for all requests, running
    while any is watched; per request, a dict entry, and three attribute writes per
    message: nothing on the path of a client that reads. A reload's new `write_timeout`
    applies from the next sweep on."""

    def __init__(self) -> None:
        # Task -> [its exchange, the message count seen waiting at the last sweep or -1]
        self._watched: dict[asyncio.Task[Any], list[Any]] = {}
        self._seconds = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, task: asyncio.Task[Any], exchange: Exchange, seconds: float) -> None:
        self._watched[task] = [exchange, -1]
        self._seconds = seconds  # the latest config's: a reload applies from here on
        if self._timer is None:
            self._loop = task.get_loop()
            self._timer = self._loop.call_later(seconds, self._sweep)

    def forget(self, task: asyncio.Task[Any]) -> None:
        self._watched.pop(task, None)

    def _sweep(self) -> None:
        self._timer = None
        for task, entry in list(self._watched.items()):
            exchange, last = entry
            if exchange.sending and exchange.sent == last:  # the same send, both times
                exchange.record.client_disconnected = True
                exchange.record.error = "client_write_timeout"
                task.cancel()
                del self._watched[task]
            else:
                entry[1] = exchange.sent if exchange.sending else -1
        if self._watched and self._loop is not None:
            self._timer = self._loop.call_later(self._seconds, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def send_error(send: Send, exc: ProxyError, headers: list[tuple[bytes, bytes]]) -> None:
    body = orjson.dumps(exc.body())
    start_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *exc.headers,
        *headers,
    ]
    await send({"type": "http.response.start", "status": exc.status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


async def _fail_stream(send: Send, exchange: Exchange, exc: ProxyError) -> None:
    """End a started stream with an error event: the openai SDK raises on it, where a
    stream that just stops would look complete."""
    exchange.record.error = exc.code or exc.kind
    exchange.complete = True
    event = b"data: " + orjson.dumps(exc.body()) + b"\n\n"
    await send({"type": "http.response.body", "body": event, "more_body": False})


async def _read(response: UpstreamResponse, backend: str) -> bytes:
    try:
        return await response.read_all()
    except httpx.TimeoutException:
        raise BackendTimeoutError(f"backend {backend!r} timed out while answering") from None
    except AnswerTooLargeError as exc:
        raise _too_large(backend, exc) from None
    except httpx.TransportError as exc:
        raise BackendUnreachableError(
            f"backend {backend!r} failed while answering: {_describe(exc)}"
        ) from None


def _too_large(backend: str, exc: AnswerTooLargeError) -> BackendAnswerTooLargeError:
    return BackendAnswerTooLargeError(f"backend {backend!r} answered too much: {exc}")


def _content_type(response: UpstreamResponse) -> bytes:
    return response.header(b"content-type") or b"application/json"


def _json_object(body: bytes) -> dict[str, Any]:
    """The answer as a JSON object, or {} when it is something else."""
    try:
        payload = orjson.loads(body)
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _count_tokens(record: RequestRecord, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    record.prompt_tokens = prompt if isinstance(prompt, int) else None
    record.completion_tokens = completion if isinstance(completion, int) else None


def _stalled(exchange: Exchange) -> str:
    seconds = exchange.timeouts.idle
    return f"backend {exchange.backend!r} sent nothing for {seconds:g} s mid-stream"


def _no_token(exchange: Exchange) -> str:
    seconds = exchange.timeouts.first_byte
    what = "its first token" if exchange.record.stream else "its answer"
    return f"backend {exchange.backend!r} did not send {what} within {seconds:g} s"


def _describe(exc: httpx.HTTPError) -> str:
    return str(exc) or type(exc).__name__

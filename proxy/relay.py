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
from starlette.types import Scope

from proxy.config import Timeouts
from proxy.errors import (
    STREAM_ERROR_EVENT,
    STREAM_INCOMPLETE,
    STREAM_INTERRUPTED,
    BackendAnswerTooLargeError,
    BackendRefusedError,
    BackendStatusError,
    BackendTimeoutError,
    BackendUnreachableError,
    ProxyError,
)
from proxy.payload import rewrite
from proxy.server import ON_DISCONNECT
from proxy.sse import EventSplitter, Kind, classify, event_end, generated, quiet_until
from proxy.timing import Clock
from proxy.upstream import (
    AnswerTooLargeError,
    Transport,
    UpstreamRequest,
    UpstreamResponse,
)

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]

_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
# How long a backend's connection may go on after [DONE] (what comes is read and dropped)
# before it is closed rather than kept: mlx_lm.server closes within 25 ms.
AFTER_DONE_S = 0.5


@dataclass(slots=True)
class RequestState:
    """How far a client's request has got: what decides what may happen to it next.

    Owned by the completion path (chat.py), which creates it and reads it to decide; the
    relay advances it as the answer goes out; the disconnect callback (or watcher) and
    `WriteWatch` mark the client gone. The log line is built from it once the request is
    over, and nothing here is ever read back from the log.
    """

    # The answer has started: its status and headers went out, so no other answer can.
    answered: bool = False
    # The status the answer started with, or the one the request failed with unanswered
    # (499 when the client left first): the log's `status`.
    status: int | None = None
    # Set once the last byte went out (or, ending a stream in error, just before): after
    # that the server reports a disconnect to anyone still listening, and that is not the
    # client leaving early. A client that left while that last write waited has left early.
    complete: bool = False
    client_gone: bool = False
    failure: str | None = None  # what went wrong, by its short name: the log's `error`
    prompt_tokens: int | None = None  # the backend's usage, as it was seen
    completion_tokens: int | None = None
    # Body messages the client has accepted, and whether one is on its way: see WriteWatch.
    sent: int = 0
    sending: bool = False

    def start(self, status: int) -> None:
        """The answer's status and headers are going out."""
        self.answered, self.status = True, status


@dataclass(slots=True)
class Attempt:
    """One try at serving a request on one backend: what to send, and how to relay it."""

    backend: str
    request: UpstreamRequest
    state: RequestState
    clock: Clock
    timeouts: Timeouts  # the backend's, as configured
    response_headers: list[tuple[bytes, bytes]]  # x-request-id and x-backend
    stream: bool
    wants_usage: bool
    rewrites: tuple[tuple[bytes, bytes], ...]  # backend model name -> client model name
    collect: list[str] | None = None  # the generated text goes here when shadowed
    sent_at: float = 0.0  # perf_counter() when the request went to the backend
    # What broke the answer after it had started (the backend's fault), by its short name.
    broken: str | None = None


async def open_upstream(transport: Transport, attempt: Attempt) -> UpstreamResponse:
    """Send the request and wait for the response headers; errors become `ProxyError`s.

    Straight to the transport: a client adds auth, redirect and cookie handling that a
    proxy must not do anyway, at a measurable cost per request.
    """
    attempt.sent_at = time.perf_counter()
    try:
        response = await transport.send(attempt.request)
    except httpx.ConnectTimeout as exc:
        raise BackendTimeoutError(
            f"backend {attempt.backend!r}: no connection in time: {_describe(exc)}"
        ) from None
    except httpx.TimeoutException:
        raise BackendTimeoutError(_no_token(attempt)) from None
    except httpx.ConnectError as exc:
        raise BackendRefusedError(
            f"backend {attempt.backend!r} is unreachable: {_describe(exc)}"
        ) from None
    except AnswerTooLargeError as exc:
        raise _too_large(attempt.backend, exc) from None
    except httpx.TransportError as exc:
        raise BackendUnreachableError(
            f"backend {attempt.backend!r} is unreachable: {_describe(exc)}"
        ) from None
    if response.status >= 400:
        try:
            body = await _read(response, attempt.backend)
        finally:
            await response.aclose()
        raise BackendStatusError(response.status, body, attempt.backend)
    return response


async def relay_json(response: UpstreamResponse, attempt: Attempt, send: Send) -> str | None:
    """A non-stream answer: read it whole (it is one JSON object) and send it on. The
    whole of it falls under `first_token` (mlx_lm.server sends it all at the end). Once
    it has started, nothing can break it: None, as `relay_stream` says of a whole answer."""
    attempt.clock.headers()
    first_token_by = attempt.sent_at + attempt.timeouts.first_token
    response.body.timeout = max(first_token_by - time.perf_counter(), 0.001)
    body = await _read(response, attempt.backend)
    payload = _json_object(body)
    _count_tokens(attempt.state, payload.get("usage"))
    if attempt.collect is not None:
        choices = payload.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            attempt.collect.append(generated(choices[0]) or "")
    body = rewrite(body, attempt.rewrites)
    headers = [
        (b"content-type", _content_type(response)),
        (b"content-length", str(len(body)).encode()),
        *attempt.response_headers,
    ]
    state = attempt.state
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    state.start(response.status)
    state.sending = True
    await send({"type": "http.response.body", "body": body})
    state.sending = False
    # After the send, as the stream path does with [DONE]: a client that left while this
    # write waited for it (a paused write) has not had its answer. The server reports no
    # disconnect once the last byte is written, so a client that hangs up then is no risk.
    state.complete = True
    return None


async def relay_stream(response: UpstreamResponse, attempt: Attempt, send: Send) -> str | None:
    """An SSE answer: forward each whole event as it arrives, watching what passes.

    The answer starts (status and headers) with the backend's first event, not with its
    headers: until then nothing has reached the client, so a backend that fails or stalls
    in prefill raises a `ProxyError` here, and the request can still be retried elsewhere
    or answered with a plain error status. (`: keepalive` comments before it are dropped.)
    It ends with the read that brings `[DONE]`. Returns what broke the answer once it had
    started (an error event from the backend, or the stream ending early), or None.
    """
    state = attempt.state
    splitter = EventSplitter()
    try:
        done = await _forward_events(response, attempt, splitter, send)
    except httpx.HTTPError as exc:
        if not state.answered:
            raise _stream_error(attempt, exc) from None
        await _fail_stream(send, attempt, _stream_error(attempt, exc))
        return attempt.broken
    if done:
        # The backend may still be closing (mlx_lm.server: 10-25 ms after [DONE]): its
        # connection reads the rest by itself, and neither this client nor its next
        # request on the same connection waits for that.
        await response.aclose(linger=AFTER_DONE_S)
        return attempt.broken
    if leftover := splitter.leftover():  # bytes after the last blank line: the client's too
        await _send_events(send, attempt, response, leftover)
    if attempt.broken is None:
        # mlx_lm.server speaks HTTP/1.0: a backend that dies mid-stream looks like a clean
        # end of the body. Only `[DONE]` says the answer is complete.
        message = f"backend {attempt.backend!r} ended the stream before [DONE]"
        error = BackendUnreachableError(message, code=STREAM_INCOMPLETE)
        if not state.answered:
            raise error
        await _fail_stream(send, attempt, error)
        return attempt.broken
    state.complete = True
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return attempt.broken


async def _send_events(
    send: Send, attempt: Attempt, response: UpstreamResponse, body: bytes, more: bool = True
) -> None:
    """Forward whole events, starting the answer first if they are its first bytes."""
    state = attempt.state
    if not state.answered:
        headers = _SSE_HEADERS + attempt.response_headers
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        state.start(response.status)
    state.sending = True
    await send({"type": "http.response.body", "body": body, "more_body": more})
    state.sending = False
    state.sent += 1


async def _forward_events(
    response: UpstreamResponse, attempt: Attempt, splitter: EventSplitter, send: Send
) -> bool:
    """Forward the backend's events, whole, as they arrive, up to the read that brings
    [DONE] (it ends the client's response); True if it came."""
    clock = attempt.clock
    # Until the first token, each read may wait only for what is left of `first_token`;
    # after it, `idle` (the transport's default for reads of the body).
    first_token_by = attempt.sent_at + attempt.timeouts.first_token
    response.body.timeout = max(first_token_by - time.perf_counter(), 0.001)
    while chunk := await response.body.read():
        waiting = clock.first_token is None
        body, done = _take_events(splitter.feed(chunk), attempt)
        if clock.first_token is None:
            response.body.timeout = max(first_token_by - time.perf_counter(), 0.001)
        elif waiting:
            response.body.timeout = attempt.timeouts.idle
        if body:  # with [DONE], never empty
            body = rewrite(body, attempt.rewrites)  # events are whole: no name is cut
            # With [DONE] the answer is whole, not when the backend closes (mlx_lm.server
            # takes 10-25 ms more): that is its latency, the client's response ends here,
            # in the same write (the openai SDK reads to its end), and a client that hangs
            # up on [DONE] has not left early.
            await _send_events(send, attempt, response, body, more=not done)
        if done:
            attempt.state.complete = True  # after: a client that left during the write had not
            clock.finish()
            return True
    return False


def _take_events(block: bytes, attempt: Attempt) -> tuple[bytes, bool]:
    """What the client gets of one read's events, up to [DONE] if it is among them (what
    follows is not the client's), and whether it was; what the events say goes to the
    attempt (and its request's state) and the clock.

    Events that came in one read arrived together: once one of them carries content, the
    clock has all it can learn from this read. The events after it need reading only if
    they may be something else (usage, an error, [DONE]: see `quiet_until`) or their
    text is wanted (a shadowed request); the others pass unread, as one slice. Comments
    are dropped only before the answer's first event: after it, they start nothing.
    """
    state, clock = attempt.state, attempt.clock
    dropped: list[tuple[int, int]] = []  # (start, end) of events the client does not get
    done = timed = False
    # Until an event of the answer goes, a comment would start it: see relay_stream.
    unstarted = not state.answered
    start, size = 0, len(block)
    while start < size:
        end = event_end(block, start)
        event = classify(block[start:end])
        drop = False
        if event.kind is Kind.CONTENT:
            if not timed:  # the clock reads once per read: its events arrived together
                clock.token()
                timed = True
            if attempt.collect is not None:
                attempt.collect.append(event.text)
        elif event.kind is Kind.DONE:
            done = True
        elif event.kind is Kind.ERROR:
            attempt.broken = STREAM_ERROR_EVENT
        elif event.kind is Kind.COMMENT:
            drop = unstarted  # a keepalive before the answer
        if event.usage is not None:
            _count_tokens(state, event.usage)
            drop = event.kind is Kind.USAGE and not attempt.wants_usage
        if drop:
            dropped.append((start, end))
        else:
            unstarted = False
            if event.kind is Kind.CONTENT and attempt.collect is None:
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


def _stream_error(attempt: Attempt, exc: httpx.HTTPError) -> ProxyError:
    if isinstance(exc, httpx.TimeoutException):
        if attempt.clock.first_token is None:
            return BackendTimeoutError(_no_token(attempt))
        return BackendTimeoutError(_stalled(attempt))
    message = f"backend {attempt.backend!r} failed mid-stream: {_describe(exc)}"
    return BackendUnreachableError(message, code=STREAM_INTERRUPTED)


def watch_client(
    scope: Scope, receive: Receive, state: RequestState, task: asyncio.Task[Any]
) -> asyncio.Future[None] | None:
    """Have `task` cancelled as soon as its client leaves before the answer is whole; the
    watcher to cancel when the request ends, if there is one.

    Two ways to hear of it, one behaviour. Our server calls back (`ON_DISCONNECT` in the
    scope's extensions): no task per request. Other ASGI servers (uvicorn) only tell
    through `receive()`, so a plain task waits on it there. A task per request costs the
    app 3.6 µs more per request, 14% of a non-stream one (`scripts/bench_app.py`:
    `watcher` against `fast`); an anyio task group, more.
    """
    on_disconnect = scope.get("extensions", {}).get(ON_DISCONNECT)
    if on_disconnect is not None:
        on_disconnect(lambda: client_left(state, task))
        return None
    return asyncio.ensure_future(_watch_receive(receive, state, task))


async def _watch_receive(receive: Receive, state: RequestState, task: asyncio.Task[Any]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            client_left(state, task)
            return


def client_left(state: RequestState, task: asyncio.Task[Any]) -> None:
    """The client went away: unless its answer is whole, stop the request's task."""
    if not state.complete:
        state.client_gone = True
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
        # Task -> [its request's state, the message count seen waiting at the last sweep or -1]
        self._watched: dict[asyncio.Task[Any], list[Any]] = {}
        self._seconds = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, task: asyncio.Task[Any], state: RequestState, seconds: float) -> None:
        self._watched[task] = [state, -1]
        self._seconds = seconds  # the latest config's: a reload applies from here on
        if self._timer is None:
            self._loop = task.get_loop()
            self._timer = self._loop.call_later(seconds, self._sweep)

    def forget(self, task: asyncio.Task[Any]) -> None:
        self._watched.pop(task, None)

    def _sweep(self) -> None:
        self._timer = None
        for task, entry in list(self._watched.items()):
            state, last = entry
            if state.sending and state.sent == last:  # the same send, both times
                state.client_gone = True
                state.failure = "client_write_timeout"
                task.cancel()
                del self._watched[task]
            else:
                entry[1] = state.sent if state.sending else -1
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


async def _fail_stream(send: Send, attempt: Attempt, exc: ProxyError) -> None:
    """End a started stream with an error event: the openai SDK raises on it, where a
    stream that just stops would look complete."""
    attempt.broken = exc.code or exc.kind
    attempt.state.complete = True
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


def _count_tokens(state: RequestState, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    state.prompt_tokens = prompt if isinstance(prompt, int) else None
    state.completion_tokens = completion if isinstance(completion, int) else None


def _stalled(attempt: Attempt) -> str:
    seconds = attempt.timeouts.idle
    return f"backend {attempt.backend!r} sent nothing for {seconds:g} s mid-stream"


def _no_token(attempt: Attempt) -> str:
    seconds = attempt.timeouts.first_token
    what = "its first token" if attempt.stream else "its answer"
    return f"backend {attempt.backend!r} did not send {what} within {seconds:g} s"


def _describe(exc: httpx.HTTPError) -> str:
    return str(exc) or type(exc).__name__

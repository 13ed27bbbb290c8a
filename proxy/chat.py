"""The completion endpoints: read the body, route, relay, and log one line, whatever happens.

A raw ASGI app rather than a Starlette endpoint: it needs to watch for the client leaving
while it waits on the backend, and to log after the last byte has been sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from proxy.accesslog import RequestRecord, request_id
from proxy.errors import BadRequestError, PayloadTooLargeError, ProxyError
from proxy.payload import (
    ChatRequest,
    model_rewriter,
    parse_body,
    upstream_body,
    upstream_headers,
)
from proxy.relay import (
    Exchange,
    Receive,
    Send,
    open_upstream,
    relay_json,
    relay_stream,
    send_error,
    watch_disconnect,
)
from proxy.routing import choose
from proxy.runtime import Runtime
from proxy.shadow import Mirror, wants_shadow
from proxy.timing import Clock

# nginx's status for "client closed the request before the answer": logged, never sent.
CLIENT_CLOSED = 499


class ClientGoneError(Exception):
    """The client disconnected before its request body arrived."""


class Completions:
    """`POST /v1/chat/completions` and friends. A class, so Starlette mounts it as ASGI."""

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await completions(scope, receive, send)


async def completions(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    runtime: Runtime = scope["state"]["runtime"]
    clock = Clock()
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    record = RequestRecord(request_id(headers.get("x-request-id")))
    response_headers = [(b"x-request-id", record.request_id.encode("latin-1"))]
    shadowed: tuple[dict[str, Any], ChatRequest, list[str]] | None = None

    try:
        raw = await _read_body(receive, headers, runtime.config.limits.max_body_bytes)
        request = parse_body(raw, runtime.config.model)
        record.model, record.stream = request.model, request.stream
        decision = choose(runtime.router, headers, runtime.rng)
        record.backend, record.reason = decision.backend, decision.reason
        response_headers.append((b"x-backend", decision.backend.encode()))
        exchange = _build_exchange(
            runtime, scope, request, decision.backend, record, clock, response_headers
        )
        if wants_shadow(runtime.config.shadow, request, decision.backend, runtime.rng):
            exchange.collect = []
            shadowed = (scope, request, exchange.collect)
        await _dispatch(runtime, exchange, receive, send)
    except ProxyError as exc:
        # The relay sets the status as it starts the answer: unset, nothing was sent yet.
        answered = record.status is not None
        record.status, record.error = exc.status, exc.kind
        if not answered and not record.client_disconnected:
            await send_error(send, exc, response_headers)
    except ClientGoneError:
        record.client_disconnected, record.status = True, CLIENT_CLOSED
    except Exception:  # a bug: logged as such here, answered and traced by the app
        record.status, record.error = 500, "internal_error"
        raise
    finally:
        _finish(runtime, record, clock)
        complete = record.status == 200 and record.error is None and not record.client_disconnected
        if shadowed is not None and complete:
            _start_shadow(runtime, record, *shadowed)


def _finish(runtime: Runtime, record: RequestRecord, clock: Clock) -> None:
    """The figures of a request that is over, to the log and the live stats."""
    clock.finish()
    record.ttft_ms = clock.ttft_ms()
    record.latency_ms = clock.latency_ms()
    if record.stream:
        record.decode_tps = clock.decode_tps(record.completion_tokens)
    runtime.log.request(record)
    runtime.stats.observe(record)


async def _dispatch(runtime: Runtime, exchange: Exchange, receive: Receive, send: Send) -> None:
    """Open the upstream response and relay it, closing it early if the client leaves."""
    backend = exchange.backend
    exchange.record.in_flight = runtime.in_flight[backend]
    if runtime.shadower is not None:
        exchange.record.behind_shadow = runtime.shadower.running[backend] > 0
    runtime.in_flight[backend] += 1
    task = asyncio.current_task()
    assert task is not None
    # A plain task rather than an anyio task group: this runs for every request, and the
    # task group's cancel-scope bookkeeping was a measurable share of the proxy's CPU.
    watcher = asyncio.ensure_future(watch_disconnect(receive, exchange, task))
    try:
        await _relay(runtime.transport, exchange, send)
    except asyncio.CancelledError:
        # Cancelled by the watcher because the client left: that ends the request normally.
        if not exchange.record.client_disconnected or task.uncancel() > 0:
            raise
        if exchange.record.status is None:
            exchange.record.status = CLIENT_CLOSED
    finally:
        watcher.cancel()
        runtime.in_flight[backend] -= 1


async def _relay(transport: httpx.AsyncBaseTransport, exchange: Exchange, send: Send) -> None:
    response = await open_upstream(transport, exchange)
    try:
        if exchange.record.stream:
            await relay_stream(response, exchange, send)
        else:
            await relay_json(response, exchange, send)
    except OSError:  # servers on ASGI spec 2.4 raise it when the client is gone (uvicorn: 2.3)
        exchange.record.client_disconnected = True
    finally:
        await response.aclose()


def _start_shadow(
    runtime: Runtime,
    record: RequestRecord,
    scope: dict[str, Any],
    request: ChatRequest,
    collected: list[str],
) -> None:
    """The same request to the shadow target, now that the client has its whole answer."""
    assert runtime.shadower is not None
    target = runtime.shadower.shadow.target
    upstream = _upstream_request(runtime, scope, request, target, record.request_id)
    text = "".join(collected)
    runtime.shadower.submit(
        Mirror(upstream, request.stream, record.request_id, text, record.latency_ms)
    )


def _build_exchange(
    runtime: Runtime,
    scope: dict[str, Any],
    request: ChatRequest,
    backend: str,
    record: RequestRecord,
    clock: Clock,
    response_headers: list[tuple[bytes, bytes]],
) -> Exchange:
    return Exchange(
        backend=backend,
        request=_upstream_request(runtime, scope, request, backend, record.request_id),
        record=record,
        clock=clock,
        response_headers=response_headers,
        wants_usage=request.wants_usage,
        rewrites=model_rewriter(runtime.config.backends[backend].model, request.model),
    )


def _upstream_request(
    runtime: Runtime, scope: dict[str, Any], request: ChatRequest, backend: str, request_id: str
) -> httpx.Request:
    url = runtime.upstream_url(backend, scope["path"])
    body = upstream_body(request, runtime.config.backends[backend].model)
    headers = upstream_headers(scope["headers"], runtime.not_forwarded)
    headers += [
        (b"host", url.netloc),
        (b"content-length", str(len(body)).encode()),  # mlx_lm.server answers 411 without
        (b"x-request-id", request_id.encode("latin-1")),
    ]
    # `stream=` rather than `content=`: httpx then takes the headers as given here instead
    # of deriving Host and Content-Length again.
    return httpx.Request(
        "POST",
        url,
        headers=headers,
        stream=httpx.ByteStream(body),
        extensions={"timeout": runtime.timeouts[backend]},
    )


async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequestError("Content-Length header is not a number")
        if int(declared) > limit:
            raise PayloadTooLargeError(_too_large(limit))
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(_too_large(limit))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"

"""The completion endpoints: read the body, route, relay, and log one line, whatever happens.

A raw ASGI app rather than a Starlette endpoint: it needs to watch for the client leaving
while it waits on the backend, and to log after the last byte has been sent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.types import Scope

from proxy import failover
from proxy.accesslog import RequestRecord
from proxy.errors import (
    BadRequestError,
    InternalError,
    PayloadTooLargeError,
    ProxyError,
    ShuttingDownError,
    TooBusyError,
)
from proxy.health import failure_kind
from proxy.limits import Full, Limiter
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
    client_left,
    open_upstream,
    relay_json,
    relay_stream,
    send_error,
    watch_disconnect,
)
from proxy.routing import Decision, choose
from proxy.runtime import Routes, Runtime
from proxy.server import ON_DISCONNECT
from proxy.shadow import Mirror, wants_shadow
from proxy.timing import Clock
from proxy.upstream import Transport, UpstreamRequest

# nginx's status for "client closed the request before the answer": logged, never sent.
CLIENT_CLOSED = 499


class ClientGoneError(Exception):
    """The client disconnected before its request body arrived."""


class Completions:
    """`POST /v1/chat/completions` and friends. A class, so Starlette mounts it as ASGI."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await completions(scope, receive, send)


async def completions(scope: Scope, receive: Receive, send: Send) -> None:
    runtime: Runtime = scope["state"]["runtime"]
    routes = runtime.routes  # read once: a reload meanwhile does not change this request
    clock = Clock()
    wanted = routes.read_headers  # names are lower-case bytes in ASGI
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in wanted}
    given_id = headers.get("x-request-id")
    record = RequestRecord(runtime.ids(given_id), routes.version)
    record.request_id_replaced = bool(given_id) and record.request_id != given_id
    response_headers = [(b"x-request-id", record.request_id.encode("latin-1"))]
    call: _Call | None = None

    try:
        raw = await _read_body(receive, headers, routes.config.limits.max_body_bytes)
        request = parse_body(raw, routes.config.model)
        record.model, record.stream = request.model, request.stream
        decision = choose(routes.router, headers, runtime.rng)
        _note(record, decision)
        decision = failover.steer(decision, runtime.health.healthy, routes.config.fallback_of)
        _note(record, decision)  # again: it may have moved (a refusal now names the new one)
        exchange = _exchange(routes, scope, request, decision.backend, record, clock)
        exchange.response_headers = response_headers  # `_aim` adds x-backend to them
        call = _Call(runtime, routes, scope, request, exchange)
        if wants_shadow(routes.config.shadow, request, decision.backend, runtime.rng):
            call.exchange.collect = []
        await _dispatch(call, decision, receive, send)
    except ProxyError as exc:
        # The relay sets the status as it starts the answer: unset, nothing was sent yet.
        answered = record.status is not None
        record.status, record.error = exc.status, exc.kind
        if not answered and not record.client_disconnected:
            await _send_error(send, exc, record, response_headers)
    except ClientGoneError:
        record.client_disconnected, record.status = True, CLIENT_CLOSED
    except asyncio.CancelledError:  # not the client leaving: the server's shutdown deadline
        record.error = record.error or "cancelled"
        if record.status is None and not record.client_disconnected:
            # Answered here rather than left to the server, to carry x-request-id.
            late = ShuttingDownError()
            record.status = late.status
            await _send_error(send, late, record, response_headers)
        raise
    except Exception:  # a bug: answered and logged here, its traceback by the server
        answered = record.status is not None
        record.status, record.error = 500, "internal_error"
        if not answered and not record.client_disconnected:
            await _send_error(send, InternalError(), record, response_headers)
        raise
    finally:
        _finish(runtime, record, clock)
        if call is not None and call.exchange.collect is not None:
            _start_shadow(call)


async def _send_error(
    send: Send, exc: ProxyError, record: RequestRecord, response_headers: list[tuple[bytes, bytes]]
) -> None:
    """Answer with `exc`: x-request-id, and x-backend once routed (a 503 or 429 refusal
    before any attempt names the backend too, as its log line does)."""
    if record.backend is not None:
        _name_backend(response_headers, record.backend)
    await send_error(send, exc, response_headers)


@dataclass(slots=True)
class _Call:
    """One client request, with what it needs on every attempt."""

    runtime: Runtime
    routes: Routes
    scope: Scope
    request: ChatRequest
    exchange: Exchange


def _finish(runtime: Runtime, record: RequestRecord, clock: Clock) -> None:
    """The figures of a request that is over, to the log, the live stats and the metrics."""
    clock.finish()
    record.ttft_ms = clock.ttft_ms()
    record.latency_ms = clock.latency_ms()
    if record.stream:
        record.decode_tps = clock.decode_tps(record.completion_tokens)
    runtime.log.request(record)
    runtime.stats.observe(record)
    runtime.metrics.observe(record)


async def _dispatch(call: _Call, decision: Decision, receive: Receive, send: Send) -> None:
    """Serve the request, closing the upstream early if the client leaves."""
    record = call.exchange.record
    task = asyncio.current_task(call.runtime.loop)
    assert task is not None
    watcher = None
    on_disconnect = call.scope.get("extensions", {}).get(ON_DISCONNECT)
    if on_disconnect is not None:  # our server calls back: no task needed
        on_disconnect(lambda: client_left(call.exchange, task))
    else:  # other servers: a plain task rather than an anyio task group, which was a
        # measurable share of the proxy's CPU
        watcher = asyncio.ensure_future(watch_disconnect(receive, call.exchange, task))
    writes = call.runtime.writes
    writes.watch(task, call.exchange, call.routes.config.limits.write_timeout)
    try:
        await _serve(call, decision, send)
    except asyncio.CancelledError:
        # Cancelled by the watcher because the client left: that ends the request normally.
        if not record.client_disconnected or task.uncancel() > 0:
            raise
        if record.status is None:
            record.status = CLIENT_CLOSED
    finally:
        if watcher is not None:
            watcher.cancel()
        writes.forget(task)


async def _serve(call: _Call, decision: Decision, send: Send) -> None:
    """One attempt, and one retry on the fallback if the backend failed before answering."""
    routes, health = call.routes, call.runtime.health
    decision, limiter = await _admit(call, decision)
    try:
        await _attempt(call, decision, limiter, send)
        return
    except ProxyError as error:
        again = failover.retry(decision, error, health.healthy, routes.config.fallback_of)
        if again is None or call.exchange.record.status is not None:
            raise
    await _attempt(call, *await _admit(call, again), send)


async def _admit(call: _Call, decision: Decision) -> tuple[Decision, Limiter]:
    """Take a concurrency slot on the decision's backend, or on its fallback when it is full
    (then the returned decision says so). The caller's `_attempt` gives the slot back to
    the limiter returned. Every wait counts in `queue_ms`, one that timed out too."""
    record, limiters = call.exchange.record, call.runtime.limiters
    limiter = limiters[decision.backend]
    try:
        waited = await limiter.acquire()
    except Full as full:
        _queued(record, full.waited)
        moved = failover.overflow(decision, call.routes.config.fallback_of)
        if moved is None:
            raise TooBusyError(
                f"backend {decision.backend!r} is busy: {full}", full.retry_after
            ) from None
        _note(record, moved)
        limiter = limiters[moved.backend]
        try:
            waited = await limiter.acquire()
        except Full as also:
            _queued(record, also.waited)
            raise TooBusyError(
                f"backends {decision.backend!r} and {moved.backend!r} are busy: {also}",
                also.retry_after,
            ) from None
        decision = moved
    _queued(record, waited)
    return decision, limiter


def _queued(record: RequestRecord, seconds: float) -> None:
    record.queue_ms = round((record.queue_ms or 0.0) + seconds * 1000.0, 3)


async def _attempt(call: _Call, decision: Decision, limiter: Limiter, send: Send) -> None:
    """Send the request to the decision's backend (whose slot in `limiter` is taken) and
    relay the answer; what happened counts for or against the backend's health."""
    runtime, exchange = call.runtime, call.exchange
    backend = decision.backend
    url = call.routes.config.backends[backend].url  # health is kept per URL: see health.py
    runtime.in_flight[backend] += 1
    try:
        _aim(call, decision)
        exchange.record.in_flight = runtime.in_flight[backend] - 1
        exchange.record.behind_shadow = runtime.shadower.running[backend] > 0
        await _relay(runtime.transport, exchange, send)
    except ProxyError as error:
        if failover.backend_failed(error):
            runtime.health.failure(backend, url, failure_kind(error))
        else:  # a 4xx: the request's fault, and the backend is alive
            runtime.health.success(backend, url)
        raise
    finally:
        runtime.in_flight[backend] -= 1
        limiter.release()
    if exchange.record.error is not None:  # a stream that broke after it started
        runtime.health.failure(backend, url, exchange.record.error)
    elif not exchange.record.client_disconnected:
        runtime.health.success(backend, url)


def _aim(call: _Call, decision: Decision) -> None:
    """Point the exchange (and the log line, and x-backend) at the decision's backend."""
    exchange, backend = call.exchange, decision.backend
    _note(exchange.record, decision)
    if exchange.backend != backend:  # moved: a new request, for the backend's model name
        routes, request = call.routes, call.request
        exchange.backend = backend
        exchange.request = _upstream_request(
            routes, call.scope, request, backend, exchange.record.request_id
        )
        exchange.rewrites = model_rewriter(routes.config.backends[backend].model, request.model)
    _name_backend(exchange.response_headers, backend)


def _name_backend(response_headers: list[tuple[bytes, bytes]], backend: str) -> None:
    """x-backend, after x-request-id (the first): the backend the request went to last."""
    response_headers[1:] = [(b"x-backend", backend.encode())]


def _note(record: RequestRecord, decision: Decision) -> None:
    record.backend, record.reason = decision.backend, decision.reason
    record.fallback_from, record.fallback_cause = decision.fallback_from, decision.fallback_cause


async def _relay(transport: Transport, exchange: Exchange, send: Send) -> None:
    response = await open_upstream(transport, exchange)
    try:
        if exchange.record.stream:
            await relay_stream(response, exchange, send)
        else:
            await relay_json(response, exchange, send)
    except OSError:  # servers on ASGI spec 2.4 raise it when the client is gone (ours: 2.3)
        exchange.record.client_disconnected = True
    finally:
        await response.aclose()


def _start_shadow(call: _Call) -> None:
    """The same request to the shadow target, now that the client has its whole answer."""
    record, shadow = call.exchange.record, call.routes.config.shadow
    complete = record.status == 200 and record.error is None and not record.client_disconnected
    if shadow is None or not complete or record.backend != shadow.source:
        return
    # Moved on the way (a fallback), or the target is down: nothing worth comparing.
    if record.fallback_from is not None or not call.runtime.health.healthy(shadow.target):
        return
    assert call.exchange.collect is not None
    upstream = _upstream_request(
        call.routes, call.scope, call.request, shadow.target, record.request_id
    )
    text = "".join(call.exchange.collect)
    call.runtime.shadower.submit(
        shadow, Mirror(upstream, call.request.stream, record.request_id, text, record.latency_ms)
    )


def _exchange(
    routes: Routes,
    scope: Scope,
    request: ChatRequest,
    backend: str,
    record: RequestRecord,
    clock: Clock,
) -> Exchange:
    return Exchange(
        backend=backend,
        request=_upstream_request(routes, scope, request, backend, record.request_id),
        record=record,
        clock=clock,
        response_headers=[],
        wants_usage=request.wants_usage,
        rewrites=model_rewriter(routes.config.backends[backend].model, request.model),
    )


def _upstream_request(
    routes: Routes, scope: Scope, request: ChatRequest, backend: str, request_id: str
) -> UpstreamRequest:
    endpoint = routes.endpoint(backend, scope["path"])
    body = upstream_body(request, routes.config.backends[backend].model)
    headers = upstream_headers(scope["headers"], routes.not_forwarded)
    headers += [
        (b"host", endpoint.netloc),
        (b"content-length", str(len(body)).encode()),  # mlx_lm.server answers 411 without
        (b"x-request-id", request_id.encode("latin-1")),
    ]
    return UpstreamRequest(b"POST", endpoint, headers, body, routes.timeouts[backend])


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

"""The completion endpoints: read the body, route, relay, and log one line, whatever happens.

A raw ASGI app rather than a Starlette endpoint: it needs to watch for the client leaving
while it waits on the backend, and to log after the last byte has been sent.

What happens to a request is decided here, from its `RequestState` (see relay.py): whether
an error can still be answered, whether a failed attempt may be retried, what counts for
or against a backend's health. The log line is built once, at the end (`_record`), from
that state, the clock and the routing decision; nothing reads it back.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.types import Scope

from proxy import failover, replicas
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
from proxy.limits import Full
from proxy.payload import (
    ChatRequest,
    model_rewriter,
    parse_body,
    upstream_body,
    upstream_headers,
)
from proxy.relay import (
    Attempt,
    Receive,
    RequestState,
    Send,
    open_upstream,
    relay_json,
    relay_stream,
    send_error,
    watch_client,
)
from proxy.routing import Decision, choose
from proxy.runtime import ActiveConfig, Runtime
from proxy.server import RECEIVED_AT
from proxy.shadow import Mirror, wants_shadow
from proxy.timing import Clock
from proxy.upstream import Transport, UpstreamRequest

# nginx's status for "client closed the request before the answer": logged, never sent.
CLIENT_CLOSED = 499


class ClientGoneError(Exception):
    """The client disconnected before its request body arrived."""


@dataclass(slots=True)
class _Call:
    """One client request, with what it needs on every attempt and what the log line says
    of it beyond its state and clock."""

    runtime: Runtime
    active: ActiveConfig  # read once: a reload meanwhile does not change this request
    scope: Scope
    headers: dict[str, str]  # those the proxy reads (`read_headers`), names in lower case
    request_id: str
    request_id_replaced: bool  # the client sent one we would not use (limits)
    clock: Clock
    state: RequestState = field(default_factory=RequestState)
    request: ChatRequest | None = None  # once the body is read and valid
    decision: Decision | None = None  # the latest: where the request is (or was) going
    replica: str | None = None  # the URL of the decision's replica, once one was tried
    collect: list[str] | None = None  # the generated text, when the request is shadowed
    in_flight: int | None = None  # other requests on its replica when it was sent
    behind_shadow: bool = False

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """x-request-id, and x-backend once routed: the backend the request went to last
        (a 503 or 429 refusal before any attempt names it too, as the log line does)."""
        headers = [(b"x-request-id", self.request_id.encode("latin-1"))]
        if self.decision is not None:
            headers.append((b"x-backend", self.decision.backend.encode()))
        return headers


class Completions:
    """`POST /v1/chat/completions` and friends. A class, so Starlette mounts it as ASGI."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await completions(scope, receive, send)


async def completions(scope: Scope, receive: Receive, send: Send) -> None:
    call = _start(scope)
    state = call.state
    try:
        await _handle(call, receive, send)
    except ProxyError as exc:
        await _fail(call, send, exc, exc.kind)
    except ClientGoneError:
        state.client_gone = True
    except asyncio.CancelledError:  # not the client leaving: the server's shutdown deadline
        # Answered here rather than left to the server, to carry x-request-id.
        await _fail(call, send, ShuttingDownError(), state.failure or "cancelled")
        raise
    except Exception:  # a bug: answered and logged here, its traceback by the server
        await _fail(call, send, InternalError(), "internal_error")
        raise
    finally:
        record = _finish(call)
        if call.collect is not None:
            _start_shadow(call, record)
        # Last: the ramp may act on this request's outcome (a new split), and nothing the
        # request itself needs waits behind it.
        call.runtime.ramp.tick()


def _start(scope: Scope) -> _Call:
    runtime: Runtime = scope["state"]["runtime"]
    received_at = scope.get("extensions", {}).get(RECEIVED_AT)  # our server's; else now
    clock = Clock() if received_at is None else Clock(received_at)
    active = runtime.active
    wanted = active.read_headers  # names are lower-case bytes in ASGI
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in wanted}
    given = headers.get("x-request-id")
    request_id = runtime.ids(given)
    replaced = bool(given) and request_id != given
    return _Call(runtime, active, scope, headers, request_id, replaced, clock)


async def _handle(call: _Call, receive: Receive, send: Send) -> None:
    active, runtime, headers = call.active, call.runtime, call.headers
    raw = await _read_body(receive, headers, active.config.limits.max_body_bytes)
    request = call.request = parse_body(raw, active.config.model)
    call.decision = choose(active.router, headers, runtime.rng)
    # Steered off an unhealthy backend, or refused: then the log names the one chosen.
    call.decision = failover.steer(call.decision, runtime.health.healthy, active.config.fallback_of)
    if wants_shadow(active.config.shadow, request, call.decision.backend, runtime.rng):
        call.collect = []
    await _dispatch(call, call.decision, receive, send)


async def _fail(call: _Call, send: Send, exc: ProxyError, failure: str) -> None:
    """The request failed with `exc`: logged as `failure`, and answered with `exc` unless
    its answer has started (the status sent stands) or its client has gone."""
    state = call.state
    state.failure = failure
    if state.answered:
        return
    state.status = exc.status
    if not state.client_gone:
        state.start(exc.status)
        await send_error(send, exc, call.response_headers())


def _finish(call: _Call) -> RequestRecord:
    """The request is over: its line to the log, the live stats and verdict, the metrics."""
    call.clock.finish()
    record = _record(call)
    runtime = call.runtime
    runtime.log.request(record)
    runtime.stats.observe(record)
    runtime.verdict.observe(record)
    runtime.metrics.observe(record)
    return record


def _record(call: _Call) -> RequestRecord:
    """The request's log line: built once, from its state, clock and routing decision."""
    state, clock, request, decision = call.state, call.clock, call.request, call.decision
    stream = request is not None and request.stream
    status = state.status
    if status is None and state.client_gone:
        status = CLIENT_CLOSED
    # By position, in the record's order: keywords cost twice as much (half a microsecond,
    # every request), and mypy checks each type.
    return RequestRecord(
        call.request_id,
        call.active.version,  # config_version
        request.model if request is not None else None,
        stream,
        decision.backend if decision is not None else None,
        call.replica,
        decision.reason if decision is not None else None,
        decision.fallback_from if decision is not None else None,
        decision.fallback_cause if decision is not None else None,
        clock.queue_ms(),
        status,
        clock.ttft_ms(),
        clock.latency_ms(),
        state.prompt_tokens,
        state.completion_tokens,
        clock.decode_tps(state.completion_tokens) if stream else None,
        call.in_flight,
        state.failure,  # error
        state.client_gone,  # client_disconnected
        call.behind_shadow,
        call.request_id_replaced,
        _session(call),
    )


def _session(call: _Call) -> str | None:
    """The keyed hash of the sticky header's value, whatever routed the request: a forced
    request with one is still part of its session. An empty value is none, as in routing."""
    sticky = call.active.router.sticky_header
    value = call.headers.get(sticky) if sticky is not None else None
    return call.runtime.sessions(value) if value else None


async def _dispatch(call: _Call, decision: Decision, receive: Receive, send: Send) -> None:
    """Serve the request, closing the upstream early if the client leaves."""
    state = call.state
    task = asyncio.current_task(call.runtime.loop)
    assert task is not None
    watcher = watch_client(call.scope, receive, state, task)
    writes = call.runtime.writes
    writes.watch(task, state, call.active.config.limits.write_timeout)
    try:
        await _serve(call, decision, send)
    except asyncio.CancelledError:
        # Cancelled because the client left: that ends the request normally.
        if not state.client_gone or task.uncancel() > 0:
            raise
    finally:
        if watcher is not None:
            watcher.cancel()
        writes.forget(task)


async def _serve(call: _Call, decision: Decision, send: Send) -> None:
    """An attempt; if its replica failed before answering, one more on another replica of
    the same backend (replicas.py), then one on the backend's fallback."""
    decision, replica = await _admit(call, decision)
    tried = [replica]
    while True:
        try:
            await _attempt(call, decision, replica, send)
            return
        except ProxyError as error:
            if call.state.answered or not failover.backend_failed(error):
                raise
            again = _again(call, decision, error, tried)
            if again is None:
                raise
        decision, replica = await _admit(call, *again)
        tried.append(replica)


def _again(
    call: _Call, decision: Decision, error: ProxyError, tried: list[replicas.Replica]
) -> tuple[Decision, replicas.Replica | None] | None:
    """Where a request whose replica failed before answering goes next: another healthy
    replica of its backend, while it has tried fewer than `ATTEMPTS_PER_ARM` there; else
    the backend's fallback (any replica of it); else nowhere (None)."""
    runtime, active = call.runtime, call.active
    fleet = runtime.fleets[decision.backend]
    on_this_arm = [replica for replica in tried if replica.backend == decision.backend]
    if len(on_this_arm) < replicas.ATTEMPTS_PER_ARM:
        other = replicas.choose(fleet.replicas, runtime.rng, on_this_arm)
        if other is not None:
            return decision, other
    moved = failover.retry(decision, error, runtime.health.healthy, active.config.fallback_of)
    return None if moved is None else (moved, None)


async def _admit(
    call: _Call, decision: Decision, replica: replicas.Replica | None = None
) -> tuple[Decision, replicas.Replica]:
    """Take a concurrency slot on a replica of the decision's backend (`replica`, or the
    least loaded), or on one of its fallback's when it is full (then the returned decision
    says so). The caller's `_attempt` gives the slot back to the replica returned. Every
    wait counts in `queue_ms`, one that timed out too."""
    clock = call.clock
    replica = replica or _replica(call, decision.backend)
    try:
        waited = await replica.limiter.acquire()
    except Full as full:
        clock.queued(full.waited)
        moved = failover.overflow(decision, call.active.config.fallback_of)
        if moved is None:
            raise TooBusyError(
                f"backend {decision.backend!r} is busy: {full}", full.retry_after
            ) from None
        call.decision = moved
        replica = _replica(call, moved.backend)
        try:
            waited = await replica.limiter.acquire()
        except Full as also:
            clock.queued(also.waited)
            raise TooBusyError(
                f"backends {decision.backend!r} and {moved.backend!r} are busy: {also}",
                also.retry_after,
            ) from None
        decision = moved
    clock.queued(waited)
    return decision, replica


def _replica(call: _Call, backend: str) -> replicas.Replica:
    chosen = replicas.choose(call.runtime.fleets[backend].replicas, call.runtime.rng)
    assert chosen is not None  # nothing tried yet: there is always one
    return chosen


async def _attempt(call: _Call, decision: Decision, replica: replicas.Replica, send: Send) -> None:
    """Send the request to the decision's replica (whose slot is taken) and relay the
    answer; what happened counts for or against the replica's health."""
    runtime = call.runtime
    backend, url = decision.backend, replica.url
    call.decision, call.replica = decision, url
    runtime.in_flight[backend] += 1
    replica.in_flight += 1
    try:
        attempt = _aim(call, backend, url)
        call.in_flight = replica.in_flight - 1
        call.behind_shadow = runtime.shadower.running[backend] > 0
        broken = await _relay(runtime.transport, attempt, send)
    except ProxyError as error:
        if failover.backend_failed(error):
            runtime.health.failure(backend, url, failure_kind(error))
        else:  # a 4xx: the request's fault, and the replica is alive
            runtime.health.success(backend, url)
        raise
    finally:
        runtime.in_flight[backend] -= 1
        replica.in_flight -= 1
        replica.limiter.release()
    if broken is not None:  # a stream that broke after it started
        call.state.failure = broken
        runtime.health.failure(backend, url, broken)
    elif not call.state.client_gone:
        runtime.health.success(backend, url)


def _aim(call: _Call, backend: str, url: str) -> Attempt:
    """The attempt on `backend`'s replica at `url`: the request as that backend takes it
    (its model name)."""
    active, request = call.active, call.request
    assert request is not None
    config = active.config.backends[backend]
    return Attempt(  # by position, as the record is (see `_record`)
        backend,
        _upstream_request(active, call.scope, request, backend, url, call.request_id),
        call.state,
        call.clock,
        config.timeouts,
        call.response_headers(),
        request.stream,
        request.wants_usage,
        model_rewriter(config.model, request.model),  # rewrites
        call.collect,
    )


async def _relay(transport: Transport, attempt: Attempt, send: Send) -> str | None:
    """Relay the backend's answer; what broke it once started, if anything."""
    response = await open_upstream(transport, attempt)
    try:
        if attempt.stream:
            return await relay_stream(response, attempt, send)
        return await relay_json(response, attempt, send)
    except OSError:  # servers on ASGI spec 2.4 raise it when the client is gone (ours: 2.3)
        attempt.state.client_gone = True
        return None
    finally:
        await response.aclose()


def _start_shadow(call: _Call, record: RequestRecord) -> None:
    """The same request to the shadow target, now that the client has its whole answer."""
    shadow = call.active.config.shadow
    complete = record.status == 200 and record.error is None and not record.client_disconnected
    if shadow is None or not complete or record.backend != shadow.source:
        return
    # Moved on the way (a fallback), or the target is down: nothing worth comparing.
    if record.fallback_from is not None or not call.runtime.health.healthy(shadow.target):
        return
    assert call.collect is not None and call.request is not None
    target = _replica(call, shadow.target).url
    upstream = _upstream_request(
        call.active, call.scope, call.request, shadow.target, target, record.request_id
    )
    text = "".join(call.collect)
    call.runtime.shadower.submit(
        shadow, Mirror(upstream, call.request.stream, record.request_id, text, record.latency_ms)
    )


def _upstream_request(
    active: ActiveConfig,
    scope: Scope,
    request: ChatRequest,
    backend: str,
    replica: str,
    request_id: str,
) -> UpstreamRequest:
    endpoint = active.endpoint(replica, scope["path"])
    body = upstream_body(request, active.config.backends[backend].model)
    headers = upstream_headers(scope["headers"], active.not_forwarded)
    headers += [
        (b"host", endpoint.netloc),
        (b"content-length", str(len(body)).encode()),  # mlx_lm.server answers 411 without
        (b"x-request-id", request_id.encode("latin-1")),
    ]
    return UpstreamRequest(b"POST", endpoint, headers, body, active.upstream_timeouts[backend])


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

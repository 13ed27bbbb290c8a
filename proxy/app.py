"""Assembly: the Starlette app, its routes, and the lifespan that owns shared state.

Two ways in, one set of routes. Every route is in Starlette's router, the completions'
too; but a POST to a completion path, nearly all the traffic, skips the router and the
middleware stack (`ProxyApp.__call__`) and goes straight to the same endpoint. Each layer
of the stack wraps `send`, which every streamed chunk passes through: through Starlette,
a request costs the app 30% more CPU without streaming (7.5 µs) and 11% more with it
(`scripts/bench_app.py`, `standard` against `fast`). Both ways check access with one
function (`admit`), and answer and log a refusal with one (`refuse`); the completions
answer their own errors, a bug's 500 included. Other methods on these paths take the
long way, to Starlette's 405.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from proxy import auth
from proxy.accesslog import AccessLog
from proxy.chat import Completions, completions
from proxy.config import Config, Health, Limits
from proxy.errors import ConfigError, InternalError, ProxyError, openai_error
from proxy.health import probe, probe_forever
from proxy.launch import Supervisor
from proxy.metrics import CONTENT_TYPE
from proxy.relay import Receive, Send, send_error
from proxy.runtime import ActiveConfig, Runtime
from proxy.server import Server
from proxy.sessions import SessionHasher, session_key
from proxy.upstream import Transport, UpstreamTransport, as_transport

_HEALTH_TIMEOUT = 2.0  # seconds, for the probes /healthz makes while the caller waits
COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/completions"})


class ProxyApp(Starlette):
    """Starlette, with a short way in for POSTs to the completion paths: see the module's
    docstring for why."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        http = scope["type"] == "http"
        if http and scope["method"] == "POST" and scope["path"] in COMPLETION_PATHS:
            if await admit(scope, send):
                await completions(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    config: Config,
    *,
    transport: Transport | httpx.AsyncBaseTransport | None = None,
    rng: random.Random | None = None,
    log: AccessLog | None = None,
    supervisor: Supervisor | None = None,
    config_path: Path | None = None,
) -> ProxyApp:
    """Build the proxy. `transport` and `rng` are for tests; `log` defaults to the config's;
    `supervisor`, the launched backends, adds their process figures to /healthz;
    `config_path` is the file that SIGHUP and `POST /admin/reload` read again."""
    initial = ActiveConfig.build(config)  # a missing key variable fails here, before serving
    sessions = SessionHasher(session_key(config.logging))  # and so does the session key

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        access_log = log or AccessLog(config.logging.path, stdout=config.logging.stdout)
        upstream = as_transport(transport) if transport is not None else _pool(config)
        runtime = Runtime(
            initial, upstream, access_log, rng or random.Random(), supervisor, config_path, sessions
        )
        app.state.runtime = runtime  # for the SIGHUP handler, which has no request
        probes = asyncio.ensure_future(
            probe_forever(
                runtime.health,
                upstream,
                lambda: _probed(runtime.config),
                supervisor.loading if supervisor is not None else lambda name, url: False,
            )
        )
        try:
            yield {"runtime": runtime}
        finally:
            probes.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probes
            await runtime.shadower.aclose()
            runtime.writes.stop()
            await upstream.aclose()
            if log is None:
                access_log.close()

    # POSTs to the completions take ProxyApp's short way to the same endpoint; other
    # methods on their paths get Starlette's 405 with `Allow: POST` from these routes.
    endpoint = Completions()
    routes = [
        *(Route(path, endpoint, methods=["POST"]) for path in sorted(COMPLETION_PATHS)),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/verdict", verdict, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/admin/reload", admin_reload, methods=["POST"]),
        Route("/admin/ramp/reset", admin_ramp_reset, methods=["POST"]),
    ]
    return ProxyApp(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(AccessControl)],
        exception_handlers={
            HTTPException: _http_error,  # type: ignore[dict-item]
            Exception: _unexpected_error,
        },
    )


def _pool(config: Config) -> UpstreamTransport:
    """The connection pool, with the config's limits (a reload cannot change them: see
    `runtime.needs_restart`)."""
    limits = config.limits
    return UpstreamTransport(
        max_connections_per_backend=limits.max_connections_per_backend,
        max_response_head_bytes=limits.max_response_head_bytes,
        max_response_body_bytes=limits.max_response_body_bytes,
    )


def create_server(app: ProxyApp, grace_seconds: float, limits: Limits | None = None) -> Server:
    """The HTTP server for `app`, as `serve` runs it (the tests too): requests the server
    refuses before the app sees them get a request id, answered as `x-request-id` and put
    on a `rejected` line in the app's log. `limits` gives it `body_timeout` (the
    config's defaults without); `write_timeout` it reads from the active config."""

    def rejected(*, status: int | None, error: str, client: str | None, detail: str) -> str | None:
        runtime: Runtime | None = getattr(app.state, "runtime", None)
        if runtime is None:
            return None
        request_id = runtime.ids(None)  # the request's own header may be what was malformed
        runtime.log.rejected(request_id, status, error, client=client, detail=detail)
        return request_id

    def lifespan() -> AbstractAsyncContextManager[Mapping[str, Any] | None]:
        return app.router.lifespan_context(app)

    def write_timeout() -> float:
        # Read at each sweep: a reload's write_timeout applies to the server too.
        runtime: Runtime | None = getattr(app.state, "runtime", None)
        return (runtime.config.limits if runtime is not None else start).write_timeout

    start = limits = limits or Limits()
    return Server(
        app,
        lifespan,
        grace_seconds=grace_seconds,
        body_timeout=limits.body_timeout,
        write_timeout=write_timeout,
        on_reject=rejected,
    )


def _probed(config: Config) -> Iterator[tuple[str, str, Health]]:
    for name, backend in config.backends.items():
        for url in backend.urls:
            yield name, url, backend.health


async def reload_config(app: Starlette, source: str) -> None:
    """Reload for a signal: the outcome goes to the log only, as nobody waits for it."""
    runtime: Runtime | None = getattr(app.state, "runtime", None)
    if runtime is None:
        return  # not serving yet
    with contextlib.suppress(ConfigError):  # logged by the runtime; the old config stays
        await runtime.reload(source)


class AccessControl:
    """API keys and the admin token (see auth.py), before any route runs."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or await admit(scope, send):
            await self.app(scope, receive, send)


async def admit(scope: Scope, send: Send) -> bool:
    """Whether the request may go on (see auth.py); if not, it has been answered and
    logged. The one access check, for both ways in."""
    runtime: Runtime = scope["state"]["runtime"]
    try:
        auth.check(scope, runtime.active.keys)
    except ProxyError as exc:
        # No detail: the log says nothing about credentials, not even how they are sent.
        request_id = refuse(runtime, scope, exc.status, exc.kind, None)
        await send_error(send, exc, [(b"x-request-id", request_id.encode("latin-1"))])
        return False
    return True


def refuse(runtime: Runtime, scope: Scope, status: int, error: str, detail: str | None) -> str:
    """Log a request the app refuses (a `rejected` line); the request id its answer
    carries as `x-request-id`, the same as the line's."""
    given = None
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            given = value.decode("latin-1")
    request_id = runtime.ids(given)
    client = scope.get("client")
    runtime.log.rejected(
        request_id,
        status,
        error,
        method=scope["method"],
        path=scope["path"],
        client=f"{client[0]}:{client[1]}" if client else None,
        detail=detail,
    )
    return request_id


def _model_card(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "specproxy"}


def _answer(
    request: Request, body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A JSON answer that carries `x-request-id`, as every answer of the proxy does."""
    ids = request.state.runtime.ids
    headers = {**(headers or {}), "x-request-id": ids(request.headers.get("x-request-id"))}
    return JSONResponse(body, status_code=status, headers=headers)


async def list_models(request: Request) -> JSONResponse:
    runtime: Runtime = request.state.runtime
    return _answer(request, {"object": "list", "data": [_model_card(runtime.config.model)]})


async def get_model(request: Request) -> Response:
    runtime: Runtime = request.state.runtime
    model = request.path_params["model"]
    if model != runtime.config.model:
        message = f"The model {model!r} does not exist"
        body = openai_error(message, "invalid_request_error", param="model", code="model_not_found")
        return _refused(request, body, 404, "model_not_found", message)
    return _answer(request, _model_card(model))


async def healthz(request: Request) -> JSONResponse:
    """The proxy is up (200); each replica's reachability is probed on its `/health`."""
    runtime: Runtime = request.state.runtime
    active = runtime.active  # once: a reload meanwhile changes nothing here
    replicas = [(n, url) for n, b in active.config.backends.items() for url in b.urls]
    results = await asyncio.gather(
        *(probe(runtime.transport, url, _HEALTH_TIMEOUT) for _, url in replicas)
    )
    probed: dict[str, dict[str, tuple[bool, str]]] = {}
    for (name, url), result in zip(replicas, results, strict=True):
        probed.setdefault(name, {})[url] = result
    backends = {name: _backend_health(runtime, active, name, probed[name]) for name in probed}
    ok = all(b["reachable"] and b["healthy"] for b in backends.values())
    body = {
        "status": "ok" if ok else "degraded",
        "model": active.config.model,
        "config_version": active.version,
        "backends": backends,
    }
    if runtime.ramp.arms:  # the file's split, the ramp's, and why (see ramp_control.py)
        body["ramp"] = runtime.ramp.status()
    return _answer(request, body)


def _backend_health(
    runtime: Runtime, active: ActiveConfig, name: str, probed: dict[str, tuple[bool, str]]
) -> dict[str, Any]:
    """A backend's state: with one replica, that replica's; with several, the arm's
    (reachable and healthy if any replica is, counts summed), each replica's under
    `replicas`."""
    each = {url: _replica_health(runtime, name, url, *result) for url, result in probed.items()}
    state: dict[str, Any] = {
        "url": None,  # a fleet's are under `replicas`
        **_routing_state(runtime, active, name),
        "in_flight": runtime.in_flight[name],
        "split": active.config.routing.split.get(name, 0.0),
    }
    if len(each) == 1:
        (only,) = each.values()
        return {**state, **{k: v for k, v in only.items() if k != "in_flight"}}
    reachable = sum(r["reachable"] for r in each.values())
    state |= {
        "reachable": reachable > 0,
        "detail": f"{reachable} of {len(each)} replicas reachable",
        "healthy": any(r["healthy"] for r in each.values()),
        "consecutive_failures": min(r["consecutive_failures"] for r in each.values()),
        "last_error": None,
        "ejections": sum(r["ejections"] for r in each.values()),
        "queued": sum(r["queued"] for r in each.values()),
        "replicas": each,
    }
    return state


def _replica_health(
    runtime: Runtime, name: str, url: str, reachable: bool, detail: str
) -> dict[str, Any]:
    """What the proxy thinks of one replica, and what its probe just saw."""
    fleet = runtime.fleets.get(name)
    replica = next((r for r in fleet.replicas if r.url == url), None) if fleet else None
    health = runtime.health.backends.get(name, {}).get(url)  # absent only while a reload lands
    state: dict[str, Any] = {
        "url": url,
        "reachable": reachable,
        "detail": detail,
        "healthy": health is None or health.healthy,
        "consecutive_failures": health.failures if health else 0,
        "last_error": health.last_error if health else None,
        "ejections": health.ejections if health else 0,
        "in_flight": replica.in_flight if replica else 0,
        "queued": replica.limiter.queued if replica else 0,
    }
    if runtime.supervisor is not None:
        managed = runtime.supervisor.replicas.get((name, url))
        if managed is not None:
            state["process"] = managed.status()
    return state


def _routing_state(runtime: Runtime, active: ActiveConfig, name: str) -> dict[str, Any]:
    """What the proxy itself decides for a backend: its fallback, its slots per replica."""
    return {
        "fallback": active.config.fallback_of(name),
        "max_in_flight": active.config.backends[name].max_in_flight,
    }


async def metrics(request: Request) -> Response:
    runtime: Runtime = request.state.runtime
    rid = runtime.ids(request.headers.get("x-request-id"))
    return Response(
        runtime.metrics.render(), media_type=CONTENT_TYPE, headers={"x-request-id": rid}
    )


async def admin_reload(request: Request) -> JSONResponse:
    """Re-read routes.yaml: 200 with the new version, or 400 and the old config kept."""
    runtime: Runtime = request.state.runtime
    previous = runtime.active.version
    try:
        active = await runtime.reload("admin")
    except ConfigError as exc:
        body = openai_error(str(exc), "invalid_request_error", code="invalid_config")
        return _answer(request, body, 400)
    return _answer(
        request,
        {"status": "reloaded", "config_version": active.version, "previous": previous},
    )


async def admin_ramp_reset(request: Request) -> JSONResponse:
    """Start ramps again at their first step: `?backend=<name>`'s, or every one's. A
    rolled-back arm stays at 0 until this or a reload that changes its ramp block."""
    runtime: Runtime = request.state.runtime
    try:
        names = runtime.ramp.reset(request.query_params.get("backend"), "admin")
    except ProxyError as exc:
        return _refused(request, exc.body(), exc.status, exc.kind, exc.message)
    body = {"status": "reset", "backends": names, "config_version": runtime.active.version}
    return _answer(request, {**body, "ramp": runtime.ramp.status()})


async def stats(request: Request) -> JSONResponse:
    """Per-backend figures since start (bounded memory; the report reads the logs)."""
    runtime: Runtime = request.state.runtime
    return _answer(request, {"since_start": True, "backends": runtime.stats.snapshot()})


async def verdict(request: Request) -> JSONResponse:
    """The A/B verdict of the experiment's traffic so far: see liveverdict.py."""
    runtime: Runtime = request.state.runtime
    return _answer(request, runtime.verdict.document())


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own 404/405 in the OpenAI error shape, and a log line for each."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    body = openai_error(message, "invalid_request_error", code=kind)
    return _refused(request, body, exc.status_code, kind, message, dict(exc.headers or {}))


def _refused(
    request: Request,
    body: dict[str, Any],
    status: int,
    error: str,
    detail: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error answer for a request the app refuses, with its `rejected` line."""
    runtime: Runtime = request.state.runtime
    request_id = refuse(runtime, request.scope, status, error, detail)
    headers = {**(headers or {}), "x-request-id": request_id}
    return JSONResponse(body, status_code=status, headers=headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: still an OpenAI-shaped 500 for the client (Starlette logs the traceback)."""
    error = InternalError()
    return _answer(request, error.body(), error.status)

"""Assembly: the Starlette app, its routes, and the lifespan that owns shared state."""

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
from proxy.config import Config, Health
from proxy.errors import ConfigError, InternalError, ProxyError, openai_error
from proxy.health import probe, probe_forever
from proxy.launch import Supervisor
from proxy.metrics import CONTENT_TYPE
from proxy.relay import Receive, Send, send_error
from proxy.runtime import Routes, Runtime
from proxy.server import Server
from proxy.upstream import Transport, UpstreamTransport, as_transport

_HEALTH_TIMEOUT = 2.0  # seconds, for the probes /healthz makes while the caller waits
COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/completions"})


class ProxyApp(Starlette):
    """Starlette, with a short way in for the completion requests, nearly all the traffic.

    They skip the router and the middleware stack: each layer wraps `send`, which every
    streamed chunk passes through, and the stack cost about a fifth of the proxy's CPU under
    load (`scripts/bench_overhead.py`). The access check is the same function; the
    completions answer their own errors, a bug's 500 included. Other methods on these paths
    take the long way, to Starlette's 405.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in COMPLETION_PATHS:
            if scope["method"] == "POST" and await _admitted(scope, send):
                await completions(scope, receive, send)
            if scope["method"] == "POST":
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
    initial = Routes.build(config)  # a missing key variable fails here, before serving

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        access_log = log or AccessLog(config.logging.path, stdout=config.logging.stdout)
        upstream = as_transport(transport) if transport is not None else _pool(config)
        runtime = Runtime(
            initial, upstream, access_log, rng or random.Random(), supervisor, config_path
        )
        app.state.runtime = runtime  # for the SIGHUP handler, which has no request
        probes = asyncio.ensure_future(
            probe_forever(
                runtime.health,
                upstream,
                lambda: _probed(runtime.config),
                supervisor.loading if supervisor is not None else lambda name: False,
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

    # POSTs to these take ProxyApp's short way and never reach the router; the routes
    # are here for what other methods get (405 with `Allow: POST`).
    endpoint = Completions()
    routes = [
        Route("/v1/chat/completions", endpoint, methods=["POST"]),
        Route("/chat/completions", endpoint, methods=["POST"]),
        Route("/v1/completions", endpoint, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/admin/reload", admin_reload, methods=["POST"]),
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


def create_server(app: ProxyApp, grace_seconds: float) -> Server:
    """The HTTP server for `app`, as `serve` runs it (the tests too): requests the server
    refuses before the app sees them get a request id, answered as `x-request-id` and put
    on a `rejected` line in the app's log."""

    def rejected(**fields: Any) -> str | None:
        runtime: Runtime | None = getattr(app.state, "runtime", None)
        if runtime is None:
            return None
        request_id = runtime.ids(None)  # the request's own header may be what was malformed
        runtime.log.event("rejected", request_id=request_id, **fields)
        return request_id

    def lifespan() -> AbstractAsyncContextManager[Mapping[str, Any] | None]:
        return app.router.lifespan_context(app)

    return Server(app, lifespan, grace_seconds=grace_seconds, on_reject=rejected)


def _probed(config: Config) -> Iterator[tuple[str, str, Health]]:
    for name, backend in config.backends.items():
        yield name, backend.url, backend.health


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
        if scope["type"] != "http" or await _admitted(scope, send):
            await self.app(scope, receive, send)


async def _admitted(scope: Scope, send: Send) -> bool:
    """Whether the request may go on; if not, it has been answered and logged."""
    runtime: Runtime = scope["state"]["runtime"]
    try:
        auth.check(scope, runtime.routes.keys)
    except ProxyError as exc:
        await _refuse(runtime, scope, send, exc)
        return False
    return True


async def _refuse(runtime: Runtime, scope: Scope, send: Send, exc: ProxyError) -> None:
    given = dict(scope["headers"]).get(b"x-request-id")
    rid = runtime.ids(given.decode("latin-1") if given else None)
    runtime.log.event(
        "rejected",
        request_id=rid,
        method=scope["method"],
        path=scope["path"],
        status=exc.status,
        error=exc.kind,
    )
    await send_error(send, exc, [(b"x-request-id", rid.encode("latin-1"))])


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


async def get_model(request: Request) -> JSONResponse:
    runtime: Runtime = request.state.runtime
    model = request.path_params["model"]
    if model != runtime.config.model:
        body = openai_error(
            f"The model {model!r} does not exist",
            "invalid_request_error",
            param="model",
            code="model_not_found",
        )
        return _answer(request, body, 404)
    return _answer(request, _model_card(model))


async def healthz(request: Request) -> JSONResponse:
    """The proxy is up (200); each backend's reachability is probed on its `/health`."""
    runtime: Runtime = request.state.runtime
    routes = runtime.routes  # once: a reload meanwhile changes nothing here
    names = list(routes.config.backends)
    probes = [
        probe(runtime.transport, b.url, _HEALTH_TIMEOUT) for b in routes.config.backends.values()
    ]
    results = await asyncio.gather(*probes)
    backends = {
        name: _backend_health(runtime, routes, name, reachable, detail)
        for name, (reachable, detail) in zip(names, results, strict=True)
    }
    ok = all(b["reachable"] and b["healthy"] for b in backends.values())
    body = {
        "status": "ok" if ok else "degraded",
        "model": routes.config.model,
        "config_version": routes.version,
        "backends": backends,
    }
    return _answer(request, body)


def _backend_health(
    runtime: Runtime, routes: Routes, name: str, reachable: bool, detail: str
) -> dict[str, Any]:
    state = {
        "url": routes.config.backends[name].url,
        "reachable": reachable,
        "detail": detail,
        "in_flight": runtime.in_flight[name],
        "split": routes.config.routing.split.get(name, 0.0),
        **_routing_state(runtime, routes, name),
    }
    if runtime.supervisor is not None and name in runtime.supervisor.backends:
        state["process"] = runtime.supervisor.backends[name].status()
    return state


def _routing_state(runtime: Runtime, routes: Routes, name: str) -> dict[str, Any]:
    """What the proxy itself thinks of a backend: health, fallback, slots."""
    state = runtime.health.backends.get(name)  # absent only while a reload lands
    limiter = runtime.limiters.get(name)
    return {
        "healthy": state is None or state.healthy,
        "consecutive_failures": state.failures if state else 0,
        "last_error": state.last_error if state else None,
        "ejections": state.ejections if state else 0,
        "fallback": routes.config.fallback_of(name),
        "max_in_flight": limiter.limit if limiter else None,
        "queued": limiter.queued if limiter else 0,
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
    previous = runtime.routes.version
    try:
        routes = await runtime.reload("admin")
    except ConfigError as exc:
        body = openai_error(str(exc), "invalid_request_error", code="invalid_config")
        return _answer(request, body, 400)
    return _answer(
        request,
        {"status": "reloaded", "config_version": routes.version, "previous": previous},
    )


async def stats(request: Request) -> JSONResponse:
    """Per-backend figures since start (bounded memory; the report reads the logs)."""
    runtime: Runtime = request.state.runtime
    return _answer(request, {"since_start": True, "backends": runtime.stats.snapshot()})


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own 404/405 in the OpenAI error shape, and a log line for each."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    response = _answer(
        request,
        openai_error(message, "invalid_request_error", code=kind),
        exc.status_code,
        dict(exc.headers or {}),
    )
    runtime: Runtime = request.state.runtime
    runtime.log.event(
        "rejected",
        request_id=response.headers["x-request-id"],
        method=request.method,
        path=request.url.path,
        status=exc.status_code,
        error=kind,
    )
    return response


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: still an OpenAI-shaped 500 for the client (Starlette logs the traceback)."""
    error = InternalError()
    return _answer(request, error.body(), error.status)

"""Assembly: the Starlette app, its routes, and the lifespan that owns shared state."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy.accesslog import AccessLog, request_id
from proxy.chat import Completions
from proxy.config import Config
from proxy.errors import openai_error
from proxy.launch import Supervisor
from proxy.runtime import Runtime
from proxy.upstream import UpstreamTransport

_HEALTH_TIMEOUT = httpx.Timeout(2.0).as_dict()


def create_app(
    config: Config,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    rng: random.Random | None = None,
    log: AccessLog | None = None,
    supervisor: Supervisor | None = None,
) -> Starlette:
    """Build the proxy. `transport` and `rng` are for tests; `log` defaults to the config's;
    `supervisor`, the launched backends, adds their process figures to /healthz."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        access_log = log or AccessLog(config.logging.path, stdout=config.logging.stdout)
        upstream = transport or UpstreamTransport()
        runtime = Runtime(config, upstream, access_log, rng or random.Random(), supervisor)
        try:
            yield {"runtime": runtime}
        finally:
            if runtime.shadower is not None:
                await runtime.shadower.aclose()
            await upstream.aclose()
            if log is None:
                access_log.close()

    completions = Completions()
    routes = [
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/chat/completions", completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPException: _http_error,  # type: ignore[dict-item]
            Exception: _unexpected_error,
        },
    )


def _model_card(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "specproxy"}


def _answer(
    request: Request, body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A JSON answer that carries `x-request-id`, as every answer of the proxy does."""
    headers = {**(headers or {}), "x-request-id": request_id(request.headers.get("x-request-id"))}
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
    results: dict[str, dict[str, Any]] = {}

    async def probe(name: str, url: str) -> None:
        started = time.perf_counter()
        request = httpx.Request("GET", url + "/health", extensions={"timeout": _HEALTH_TIMEOUT})
        try:
            response = await runtime.transport.handle_async_request(request)
            await response.aclose()
            reachable, detail = response.status_code < 500, f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            reachable, detail = False, str(exc) or type(exc).__name__
        results[name] = {
            "url": url,
            "reachable": reachable,
            "detail": detail,
            "probe_ms": round((time.perf_counter() - started) * 1000, 3),
            "in_flight": runtime.in_flight[name],
            "split": runtime.config.routing.split.get(name, 0.0),
        }
        if runtime.supervisor is not None and name in runtime.supervisor.backends:
            results[name]["process"] = runtime.supervisor.backends[name].status()

    async with anyio.create_task_group() as group:
        for name, backend in runtime.config.backends.items():
            group.start_soon(probe, name, backend.url)
    status = "ok" if all(r["reachable"] for r in results.values()) else "degraded"
    ordered = {name: results[name] for name in runtime.config.backends}
    return _answer(request, {"status": status, "model": runtime.config.model, "backends": ordered})


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
    body = openai_error("internal error in the proxy", "server_error", code="internal_error")
    return _answer(request, body, 500)

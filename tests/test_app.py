"""The app in-process against mocked backends: request and response shapes, headers, errors."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.app import create_app
from proxy.config import Config
from proxy.server import RECEIVED_AT
from tests.conftest import REJECTED, make_config, read_log

pytestmark = pytest.mark.anyio

Handler = Callable[[httpx.Request], httpx.Response]
CHAT = "/v1/chat/completions"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Backends:
    """Mock backends: record what the proxy sends, answer like mlx_lm.server."""

    def __init__(self, answer: Handler | None = None):
        self.seen: list[httpx.Request] = []
        self.answer = answer or mlx_like

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return self.answer(request)

    def body(self, index: int = -1) -> dict[str, Any]:
        return json.loads(self.seen[index].content)


def mlx_like(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if body.get("stream"):
        # A stream (not `content=`), so the proxy reads it as it would a real one.
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=httpx.ByteStream(sse(body, ["Hel", "lo"])),
        )
    return httpx.Response(
        200,
        json={
            "id": "x",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        },
    )


def sse(body: dict[str, Any], pieces: list[str]) -> bytes:
    def event(payload: Any) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    out = ": keepalive 1/1\n\n"
    for piece in pieces:
        out += event(
            {
                "object": "chat.completion.chunk",
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": piece}}],
            }
        )
    if (body.get("stream_options") or {}).get("include_usage"):
        out += event(
            {
                "object": "chat.completion",
                "model": body["model"],
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": len(pieces)},
            }
        )
    return (out + "data: [DONE]\n\n").encode()


@asynccontextmanager
async def proxy_client(
    config: Config,
    backends: Handler,
    seed: int = 0,
    raise_app_exceptions: bool = True,
    extensions: dict[str, Any] | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, behind httpx's in-process transport; each
    request's scope carries `extensions`, as a server's would."""
    app = create_app(config, transport=httpx.MockTransport(backends), rng=random.Random(seed))
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(state)
            if extensions is not None:
                scope["extensions"] = {**scope.get("extensions", {}), **extensions}
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            yield client


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(
        tmp_path,
        {"baseline": "http://b:1", "speculative": "http://s:2"},
        routing={"sticky_header": "X-Session-Id"},
    )


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    return dict(error)


async def test_non_stream_is_relayed_with_model_name_restored(config: Config) -> None:
    backends = Backends()
    async with proxy_client(config, backends) as client:
        response = await client.post(CHAT, json={"model": "my-model", "messages": []})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello"
    assert response.json()["model"] == "my-model"
    assert backends.body()["model"] == "default_model"


async def test_backend_model_name_comes_from_config(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"b": "http://b:1"})
    config = config.model_copy(
        update={
            "backends": {
                "b": config.backends["b"].model_copy(update={"model": "mlx-community/Foo"})
            }
        }
    )
    backends = Backends()
    async with proxy_client(config, backends) as client:
        await client.post(CHAT, json={"messages": []})
    assert backends.body()["model"] == "mlx-community/Foo"


async def test_body_passes_through_except_draft_fields(config: Config) -> None:
    backends = Backends()
    sent = {
        "model": "m",
        "messages": [{"role": "user", "content": "é"}],
        "temperature": 0,
        "draft_model": "x",
        "num_draft_tokens": 9,
        "seed": 3,
        "custom": {"a": [1]},
    }
    async with proxy_client(config, backends) as client:
        await client.post(CHAT, json=sent)
    upstream = backends.body()
    assert "draft_model" not in upstream and "num_draft_tokens" not in upstream
    assert {k: upstream[k] for k in ("messages", "temperature", "seed", "custom")} == {
        k: sent[k] for k in ("messages", "temperature", "seed", "custom")
    }
    assert backends.seen[-1].headers["content-length"] == str(len(backends.seen[-1].content))


async def test_headers_forwarded_and_hop_by_hop_dropped(config: Config) -> None:
    backends = Backends()
    headers = {
        "Authorization": "Bearer sk-secret",
        "X-Backend": "speculative",
        "Connection": "keep-alive, X-Custom-Hop",
        "Proxy-Authorization": "p",
        "TE": "trailers",
        "X-Trace": "t1",
        "Accept-Encoding": "gzip",
        "X-Custom-Hop": "1",
    }
    async with proxy_client(config, backends) as client:
        await client.post(CHAT, json={"messages": []}, headers=headers)
    sent = backends.seen[-1].headers
    assert sent["authorization"] == "Bearer sk-secret"
    assert sent["x-trace"] == "t1"
    for name in ("proxy-authorization", "te", "x-backend", "x-custom-hop", "connection"):
        assert name not in sent
    assert "accept-encoding" not in sent  # answers are relayed as bytes: no compression
    assert str(backends.seen[-1].url) == "http://s:2/v1/chat/completions"


async def test_authorization_is_never_logged(config: Config) -> None:
    async with proxy_client(config, Backends()) as client:
        await client.post(
            CHAT, json={"messages": []}, headers={"Authorization": "Bearer sk-secret"}
        )
    assert config.logging.path is not None
    assert "sk-secret" not in config.logging.path.read_text()


async def test_response_headers_carry_request_id_and_backend(config: Config) -> None:
    async with proxy_client(config, Backends()) as client:
        given = await client.post(
            CHAT,
            json={"messages": []},
            headers={"X-Request-Id": "req-1", "X-Backend": "speculative"},
        )
        generated = await client.post(CHAT, json={"messages": [], "stream": True})
    assert given.headers["x-request-id"] == "req-1"
    assert given.headers["x-backend"] == "speculative"
    assert len(generated.headers["x-request-id"]) == 32
    assert generated.headers["x-backend"] in {"baseline", "speculative"}


async def test_request_id_is_forwarded_to_the_backend(config: Config) -> None:
    backends = Backends()
    async with proxy_client(config, backends) as client:
        response = await client.post(CHAT, json={"messages": []})
    assert backends.seen[-1].headers["x-request-id"] == response.headers["x-request-id"]


async def test_stream_asks_for_usage_and_hides_it_when_client_did_not(config: Config) -> None:
    backends = Backends()
    async with proxy_client(config, backends) as client:
        response = await client.post(CHAT, json={"messages": [], "stream": True, "model": "m"})
    assert backends.body()["stream_options"] == {"include_usage": True}
    events = [line for line in response.text.split("\n\n") if line]
    assert not any('"usage"' in event for event in events)
    assert events[-1] == "data: [DONE]"
    assert all('"model": "m"' in event for event in events if event.startswith("data: {"))
    line = read_log(config.logging.path)[-1]  # type: ignore[arg-type]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (3, 2)


async def test_a_stream_that_came_in_one_read_has_no_decode_speed(config: Config) -> None:
    """Tokens the proxy received together cannot be timed apart: decode_tps is null, not
    the speed of the proxy's own parsing (the mock sends the whole stream as one chunk)."""
    async with proxy_client(config, Backends()) as client:
        await client.post(CHAT, json={"messages": [], "stream": True})
    line = read_log(config.logging.path)[-1]  # type: ignore[arg-type]
    assert line["completion_tokens"] == 2 and line["ttft_ms"] is not None
    assert line["decode_tps"] is None


async def test_stream_null_means_no_stream(config: Config) -> None:
    async with proxy_client(config, Backends()) as client:
        response = await client.post(CHAT, json={"messages": [], "stream": None})
    assert response.status_code == 200 and response.json()["object"] == "chat.completion"


async def test_stream_keeps_usage_when_client_asked(config: Config) -> None:
    backends = Backends()
    body = {"messages": [], "stream": True, "stream_options": {"include_usage": True}}
    async with proxy_client(config, backends) as client:
        response = await client.post(CHAT, json=body)
    assert response.headers["content-type"] == "text/event-stream"
    assert '"usage": {"prompt_tokens": 3, "completion_tokens": 2}' in response.text


async def test_routing_reason_is_logged(config: Config) -> None:
    async with proxy_client(config, Backends()) as client:
        await client.post(CHAT, json={"messages": []}, headers={"X-Backend": "baseline"})
        await client.post(CHAT, json={"messages": []}, headers={"X-Session-Id": "u1"})
        await client.post(CHAT, json={"messages": []})
    reasons = [line["reason"] for line in read_log(config.logging.path)]  # type: ignore[arg-type]
    assert reasons == ["header", "sticky", "split"]


async def test_log_line_has_every_field(config: Config) -> None:
    async with proxy_client(config, Backends()) as client:
        await client.post(CHAT, json={"messages": [], "model": "m"}, headers={"X-Request-Id": "r9"})
    line = read_log(config.logging.path)[-1]  # type: ignore[arg-type]
    assert set(line) == {
        "event",
        "timestamp",
        "request_id",
        "config_version",
        "backend",
        "replica",
        "reason",
        "fallback_from",
        "fallback_cause",
        "queue_ms",
        "model",
        "stream",
        "status",
        "ttft_ms",
        "latency_ms",
        "prompt_tokens",
        "completion_tokens",
        "decode_tps",
        "in_flight",
        "error",
        "client_disconnected",
        "behind_shadow",
        "request_id_replaced",
        "session",
    }
    assert line["event"] == "request" and line["request_id"] == "r9"
    assert line["timestamp"].endswith("Z")
    assert (line["status"], line["error"], line["in_flight"], line["model"]) == (200, None, 0, "m")
    assert line["config_version"] == config.version() and line["queue_ms"] == 0
    assert line["fallback_from"] is None and line["fallback_cause"] is None
    assert line["replica"] == config.backends[line["backend"]].url  # its one server
    assert 0 < line["ttft_ms"] <= line["latency_ms"]
    assert line["decode_tps"] is None  # unknowable without a stream


@pytest.mark.parametrize(
    ("content", "code", "fragment"),
    [
        (b"{not json", "bad_request", "not valid JSON"),
        (b"[1, 2]", "bad_request", "must be a JSON object, not an array"),
        (b'{"stream": "yes"}', "bad_request", "'stream' must be true or false"),
        (b'{"model": 5}', "bad_request", "'model' must be a string"),
        (b'{"stream": 1}', "bad_request", "'stream' must be true or false"),
        (b'{"stream": 0}', "bad_request", "'stream' must be true or false"),
        (b'{"messages": ' + b"[" * 300 + b"]" * 300 + b"}", "bad_request", "cannot be passed on"),
        (b'{"stream": true, "stream_options": 1}', "bad_request", "'stream_options'"),
    ],
)
async def test_bad_body_is_400_and_logged(
    config: Config, content: bytes, code: str, fragment: str
) -> None:
    backends = Backends()
    async with proxy_client(config, backends) as client:
        response = await client.post(CHAT, content=content)
    error = assert_openai_error(response, 400, code)
    assert fragment in error["message"]
    assert not backends.seen
    line = read_log(config.logging.path)[-1]  # type: ignore[arg-type]
    assert (line["status"], line["error"], line["backend"]) == (400, "bad_request", None)


async def test_unknown_backend_header_is_400_listing_backends(config: Config) -> None:
    async with proxy_client(config, Backends()) as client:
        response = await client.post(CHAT, json={}, headers={"X-Backend": "turbo"})
    error = assert_openai_error(response, 400, "unknown_backend")
    assert "baseline, speculative" in error["message"]
    assert error["param"] == "x-backend"


async def test_body_over_limit_is_413(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"b": "http://b:1"}, limits={"max_body_bytes": 1000})
    backends = Backends()
    async with proxy_client(config, backends) as client:
        big = await client.post(CHAT, json={"messages": [{"content": "x" * 2000}]})

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(20):
                yield b" " * 100

        streamed = await client.post(CHAT, content=chunked())
        ok = await client.post(CHAT, json={"messages": []})
    assert_openai_error(big, 413, "body_too_large")
    assert_openai_error(streamed, 413, "body_too_large")
    assert ok.status_code == 200
    assert len(backends.seen) == 1


async def test_backend_error_body_becomes_openai_shape(config: Config) -> None:
    def failing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": "Model 'x' not found"})

    async with proxy_client(config, Backends(failing)) as client:
        response = await client.post(CHAT, json={"messages": []})
        streamed = await client.post(CHAT, json={"messages": [], "stream": True})
    for answer in (response, streamed):
        error = assert_openai_error(answer, 404, "backend_error")
        assert error["message"] == "Model 'x' not found"
        assert answer.headers["x-backend"] in {"baseline", "speculative"}


async def test_backend_openai_shaped_error_is_relayed_as_is(config: Config) -> None:
    shaped = {
        "error": {
            "message": "bad temp",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }
    async with proxy_client(config, Backends(lambda r: httpx.Response(422, json=shaped))) as client:
        response = await client.post(CHAT, json={"messages": []})
    assert response.status_code == 422 and response.json() == shaped


async def test_backend_error_missing_fields_of_the_shape_gets_them(config: Config) -> None:
    partial = lambda r: httpx.Response(500, json={"error": {"message": "boom"}})  # noqa: E731
    async with proxy_client(config, Backends(partial)) as client:
        response = await client.post(CHAT, json={"messages": []})
    error = assert_openai_error(response, 500, "backend_error")
    assert (error["message"], error["type"], error["param"]) == ("boom", "server_error", None)


async def test_backend_non_json_error_is_wrapped(config: Config) -> None:
    page = lambda r: httpx.Response(500, text="<html>Internal Server Error</html>")  # noqa: E731
    async with proxy_client(config, Backends(page)) as client:
        response = await client.post(CHAT, json={"messages": []})
    error = assert_openai_error(response, 500, "backend_error")
    assert "<html>" not in error["message"]


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (httpx.ConnectError("Connection refused"), 502, "backend_unreachable"),
        (httpx.RemoteProtocolError("Server disconnected"), 502, "backend_unreachable"),
        (httpx.ConnectTimeout("timed out"), 504, "backend_timeout"),
        (httpx.ReadTimeout("timed out"), 504, "backend_timeout"),
    ],
)
async def test_backend_failures_map_to_status(
    config: Config, exc: Exception, status: int, code: str
) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise exc

    async with proxy_client(config, Backends(broken)) as client:
        response = await client.post(CHAT, json={"messages": []}, headers={"X-Backend": "baseline"})
    error = assert_openai_error(response, status, code)
    assert "'baseline'" in error["message"]
    assert response.headers["x-backend"] == "baseline"
    line = read_log(config.logging.path)[-1]  # type: ignore[arg-type]
    assert (line["status"], line["error"], line["backend"]) == (status, code, "baseline")


async def test_a_bug_still_answers_in_openai_shape_and_is_logged(config: Config) -> None:
    def buggy(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug")

    async with proxy_client(config, buggy, raise_app_exceptions=False) as client:
        response = await client.post(CHAT, json={"messages": []})
    assert_openai_error(response, 500, "internal_error")
    line = read_log(config.logging.path)[-1]  # type: ignore[arg-type]
    assert (line["status"], line["error"]) == (500, "internal_error")


async def test_models_lists_the_public_model(config: Config) -> None:
    async with proxy_client(config, Backends()) as client:
        listing = (await client.get("/v1/models")).json()
        one = await client.get("/v1/models/test-model")
        missing = await client.get("/v1/models/gpt-4")
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["test-model"]
    assert one.json()["id"] == "test-model"
    assert one.headers["x-request-id"]
    assert_openai_error(missing, 404, "model_not_found")


async def test_unknown_path_and_wrong_method_are_openai_errors(config: Config) -> None:
    async with proxy_client(config, Backends()) as client:
        missing = await client.get("/v1/nothing")
        wrong = await client.get(CHAT)
    assert_openai_error(missing, 404, "not_found")
    assert_openai_error(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "POST"
    assert len(missing.headers["x-request-id"]) == 32
    lines = read_log(config.logging.path)  # type: ignore[arg-type]
    assert [(line["event"], line["status"], line["path"]) for line in lines] == [
        ("rejected", 404, "/v1/nothing"),
        ("rejected", 405, CHAT),
    ]
    assert [line["request_id"] for line in lines] == [
        missing.headers["x-request-id"],
        wrong.headers["x-request-id"],
    ]


async def test_every_refusal_is_a_rejected_line_of_one_shape(tmp_path: Path) -> None:
    """An unknown model's 404 is logged like every other 404, and a missing key, an
    unknown path and a wrong method give lines with the same fields."""
    config = make_config(tmp_path, {"baseline": "http://b:1"}, auth={"api_keys": ["k"]})
    key = {"Authorization": "Bearer k"}
    async with proxy_client(config, Backends()) as client:
        model = await client.get("/v1/models/gpt-4", headers={**key, "X-Request-Id": "m1"})
        await client.post(CHAT, json={"messages": []})
        await client.get("/v1/nothing", headers=key)
        await client.get(CHAT, headers=key)
    assert_openai_error(model, 404, "model_not_found")
    lines = read_log(config.logging.path)  # type: ignore[arg-type]
    assert [(line["status"], line["error"]) for line in lines] == [
        (404, "model_not_found"),
        (401, "invalid_api_key"),
        (404, "not_found"),
        (405, "method_not_allowed"),
    ]
    assert all(set(line) == REJECTED and line["event"] == "rejected" for line in lines)
    assert (lines[0]["request_id"], lines[0]["path"]) == ("m1", "/v1/models/gpt-4")
    assert lines[1]["detail"] is None  # nothing about credentials goes to the log


async def test_the_clock_starts_when_the_server_received_the_request(config: Config) -> None:
    """With the server's RECEIVED_AT in the scope, ttft and latency count the wait before
    the app ran; without it (uvicorn), they start with the app, as before."""
    spans = []  # ms from the clock's start (the request, or RECEIVED_AT) to the answer
    for waited in (None, 0.3):
        received = time.perf_counter() - (waited or 0.0)
        extensions = {} if waited is None else {RECEIVED_AT: received}
        async with proxy_client(config, Backends(), extensions=extensions) as client:
            if waited is None:
                received = time.perf_counter()
            response = await client.post(CHAT, json={"messages": [], "stream": True})
            spans.append((time.perf_counter() - received) * 1000)
        assert response.status_code == 200
    plain, early = read_log(config.logging.path)  # type: ignore[arg-type]
    assert plain["latency_ms"] <= spans[0] < 300
    assert 300 <= early["ttft_ms"] <= early["latency_ms"] <= spans[1]


async def test_healthz_reports_each_backend(config: Config) -> None:
    def health(request: httpx.Request) -> httpx.Response:
        if request.url.host == "s":
            raise httpx.ConnectError("Connection refused")
        return httpx.Response(200, json={"status": "ok"})

    async with proxy_client(config, Backends(health)) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    report = response.json()
    assert report["status"] == "degraded"
    assert report["backends"]["baseline"]["reachable"] is True
    assert report["backends"]["speculative"]["reachable"] is False
    assert "refused" in report["backends"]["speculative"]["detail"]

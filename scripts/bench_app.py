"""The app's own CPU per request, in process: no sockets, no server, no backend.

The app is called as an ASGI app with a fake `receive`/`send` and a transport that answers
at once from memory, so what is timed is the proxy's code alone (routing, relay, log line).
Each variant runs `--rounds` rounds of `--requests` requests; the figure is the fastest
round's microseconds per request (the least disturbed by other processes on the machine).

Variants (each non-stream and stream, 16 content events):
- fast:       `ProxyApp.__call__`, the completions' short way in (what serving uses)
- standard:   Starlette's own `__call__`: middleware stack, router, then the same endpoint
- watcher:    the fast way, without the server's disconnect callback (a watcher task, as
              under uvicorn)
and, for the request line alone: `AccessLog.request` against structlog's bound logger.
With `--sticky`, the config has a sticky header and each request carries one (1000
sessions in turn), so the session's keyed hash is in what is timed.

    python scripts/bench_app.py [--requests 2000] [--rounds 7] [--sticky] [--replicas 1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import orjson  # noqa: E402
from starlette.applications import Starlette  # noqa: E402

from proxy.accesslog import AccessLog, RequestRecord  # noqa: E402
from proxy.app import ProxyApp, create_app  # noqa: E402
from proxy.config import parse_config  # noqa: E402
from proxy.server import ON_DISCONNECT  # noqa: E402
from proxy.upstream import UpstreamRequest, UpstreamResponse  # noqa: E402

MODEL = "bench-model"
EVENTS = 16


class _Body:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks
        self._at = 0
        self.timeout: float | None = None
        self.limit: int | None = None  # of a non-stream body: none here

    async def read(self) -> bytes:
        if self._at == len(self._chunks):
            return b""
        self._at += 1
        return self._chunks[self._at - 1]

    async def aclose(self, linger: float = 0.0) -> None:
        return None


def _event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": MODEL, "choices": [choice]}
    return b"data: " + orjson.dumps({**chunk, **extra}) + b"\n\n"


_STREAM = [
    _event({"role": "assistant", "content": ""}),
    *(_event({"content": f" tok{i}"}) for i in range(EVENTS)),
    _event({}, "stop", usage={"prompt_tokens": 24, "completion_tokens": EVENTS}),
    b"data: [DONE]\n\n",
]
_JSON = orjson.dumps(
    {
        "id": "c",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi " * EVENTS}}],
        "usage": {"prompt_tokens": 24, "completion_tokens": EVENTS},
    }
)


class InstantTransport:
    """A backend that has answered before it is asked: one read per event."""

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        if b'"stream":true' in request.body:
            headers = [(b"content-type", b"text/event-stream")]
            return UpstreamResponse(200, headers, _Body(list(_STREAM)))
        headers = [(b"content-type", b"application/json")]
        return UpstreamResponse(200, headers, _Body([_JSON]))

    async def aclose(self) -> None:
        return None


def _scope(
    state: dict[str, Any], body: bytes, callback: bool, session: int | None
) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"user-agent", b"bench"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": state,
    }
    if session is not None:
        scope["headers"].append((b"x-session-id", b"session-%d" % session))
    if callback:
        scope["extensions"] = {ON_DISCONNECT: lambda _callback: None}
    return scope


Call = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def _round(
    call: Call, state: dict[str, Any], stream: bool, n: int, callback: bool, sticky: bool
) -> float:
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    if stream:
        body = body[:-1] + b',"stream":true}'
    message = {"type": "http.request", "body": body, "more_body": False}
    parked = asyncio.get_running_loop().create_future()  # a client that never leaves

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return message
        await parked
        return {"type": "http.disconnect"}

    statuses = []

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            statuses.append(msg["status"])

    started = time.perf_counter()
    for i in range(n):
        first = True
        await call(_scope(state, body, callback, i % 1000 if sticky else None), receive, send)
    elapsed = time.perf_counter() - started
    assert statuses == [200] * n, statuses[:3]
    return elapsed / n * 1e6


async def _bench_app(
    requests: int, rounds: int, only: list[str] | None, sticky: bool, replicas: int = 1
) -> dict[str, float]:
    routing: dict[str, Any] = {"split": {"baseline": 100}}
    if sticky:
        routing["sticky_header"] = "X-Session-Id"
    # One server, or a fleet (each request then chooses among `replicas`: replicas.py).
    urls = [f"http://127.0.0.1:{9 + i}" for i in range(replicas)]
    backend = {"url": urls[0]} if replicas == 1 else {"replicas": [{"url": u} for u in urls]}
    config = parse_config(
        {
            "model": MODEL,
            "backends": {"baseline": backend},
            "routing": routing,
            "logging": {"path": None, "stdout": False},
        }
    )
    log = AccessLog(Path(tempfile.mkdtemp()) / "bench.jsonl", stdout=False)
    app: ProxyApp = create_app(config, transport=InstantTransport(), log=log)
    variants: dict[str, tuple[Call, bool]] = {
        "fast": (app.__call__, True),
        "standard": (lambda s, r, w: Starlette.__call__(app, s, r, w), True),
        "watcher": (app.__call__, False),
    }
    variants = {name: variant for name, variant in variants.items() if name in (only or variants)}
    results: dict[str, float] = {}
    async with app.router.lifespan_context(app) as state:
        for stream in (False, True):
            for call, callback in variants.values():
                await _round(call, dict(state), stream, 200, callback, sticky)  # warm
            best: dict[str, float] = {}
            for _ in range(rounds):  # interleaved, so drift hits every variant alike
                for name, (call, callback) in variants.items():
                    us = await _round(call, dict(state), stream, requests, callback, sticky)
                    best[name] = min(best.get(name, us), us)
            label = "stream" if stream else "non-stream"
            results.update({f"{label} {name}": us for name, us in best.items()})
    log.close()
    return results


def _bench_log(requests: int, rounds: int) -> dict[str, float]:
    """The request line: the access log's own chain against structlog's bound logger."""
    from proxy.accesslog import _RECORD_FIELDS, _read_fields

    with tempfile.TemporaryDirectory() as tmp:
        log = AccessLog(Path(tmp) / "bench.jsonl", stdout=False)
        log.bind(config_version="abc")
        record = RequestRecord("0" * 32, "abc", MODEL, True, "baseline", reason="split", status=200)
        record.ttft_ms, record.latency_ms, record.completion_tokens = 12.5, 80.25, 16

        def chain() -> None:
            log.request(record)

        def structlog_own() -> None:
            fields = dict(zip(_RECORD_FIELDS, _read_fields(record), strict=True))
            log.logger.info("request", **fields)

        best: dict[str, float] = {}
        for _ in range(rounds):
            for name, fn in (
                ("log line: own chain", chain),
                ("log line: structlog", structlog_own),
            ):
                started = time.perf_counter()
                for _ in range(requests):
                    fn()
                us = (time.perf_counter() - started) / requests * 1e6
                best[name] = min(best.get(name, us), us)
        log.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the fastest counts")
    parser.add_argument("--only", nargs="+", choices=("fast", "standard", "watcher"))
    parser.add_argument("--sticky", action="store_true", help="requests carry a session header")
    parser.add_argument("--replicas", type=int, default=1, help="servers behind the backend")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    results = asyncio.run(
        _bench_app(args.requests, args.rounds, args.only, args.sticky, args.replicas)
    )
    if not args.only:
        results.update(_bench_log(args.requests * 5, args.rounds))
    for name, us in results.items():
        print(f"{name:32s} {us:8.1f} us/request")
    for label in ("non-stream", "stream"):
        fast = results.get(f"{label} fast")
        for other in ("standard", "watcher"):
            if fast is None or f"{label} {other}" not in results:
                continue
            extra = results[f"{label} {other}"] - fast
            print(f"{label} {other} - fast: {extra:+.1f} us ({100 * extra / fast:+.1f}%)")


if __name__ == "__main__":
    main()

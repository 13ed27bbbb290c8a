"""The two ends of the LLM-shaped benchmark: a backend that streams at a model's pace, and a
client that reads many such streams at once. Raw asyncio protocols and httptools, run on
uvloop: at 1,024 streams of 40 events a second, a framework on either side would use the
cores the proxy is measured on.

The backend answers a streaming chat completion with a role event at once, the first token
`ttft` later, then one token every `gap` on a fixed schedule (a late timer does not delay
the tokens after it), then finish, usage and [DONE] one `gap` after the last token, in one
write. It keeps, per `x-request-id`, when it really wrote the first and the last token and
how late its timer was at worst: `GET /bench/paces` returns and forgets them.

The client keeps one connection per stream, sends each request with its own
`x-request-id`, and times the first content event, the last one, the largest gap between
two, and the end of the answer, in `data_received` (one callback per read, no task).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from dataclasses import dataclass
from typing import Any

import httptools

HOST = "127.0.0.1"
CONTENT_MARK = b'"content":"tok'  # in every token event, in no other
DONE_MARK = b"data: [DONE]"
TAIL = len(CONTENT_MARK) - 1  # bytes of one read kept to find a mark split across two
PROMPT_TOKENS = 24


@dataclass(frozen=True, slots=True)
class Pace:
    """How the fake model writes: tokens per answer, seconds to the first, seconds apart."""

    tokens: int = 64
    ttft: float = 0.050
    gap: float = 0.025

    @property
    def tps(self) -> float:
        return 1.0 / self.gap


# ---------------------------------------------------------------- the paced backend


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(model: str, delta: dict[str, str], finish: str | None, **extra: Any) -> bytes:
    choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    obj = {
        "id": "chatcmpl-paced",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [] if extra else choices,
        **extra,
    }
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


@functools.lru_cache(maxsize=16)
def frames(model: str, tokens: int) -> tuple[bytes, bytes, bytes]:
    """(head and role event, one token event, the tail: finish, usage, [DONE], end)."""
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
    )
    usage = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": tokens,
        "total_tokens": PROMPT_TOKENS + tokens,
    }
    tail = (
        _event(model, {}, "stop")
        + _event(model, {}, None, usage=usage)
        + _chunk(DONE_MARK + b"\n\n")
        + b"0\r\n\r\n"
    )
    return (
        head + _event(model, {"role": "assistant", "content": ""}, None),
        _event(model, {"content": "tok "}, None),
        tail,
    )


class PacedBackend(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    def __init__(self, pace: Pace, paces: dict[str, list[float]]) -> None:
        self.pace, self.paces = pace, paces
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.url = b""
        self.request_id = ""
        self.body: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.request_id, self.body = b"", "", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-request-id":
            self.request_id = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        if method == b"GET" and self.url in (b"/health", b"/healthz"):
            self.reply(b"200 OK", b'{"status":"ok"}')
        elif method == b"GET" and self.url == b"/bench/paces":
            self.reply(b"200 OK", json.dumps(self.paces).encode())
            self.paces.clear()
        elif method == b"POST" and self.url.endswith(b"/chat/completions"):
            self.stream(json.loads(b"".join(self.body) or b"{}"))
        else:
            self.reply(b"404 Not Found", b'{"error":"not found"}')

    def reply(self, status: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(body), body)
        )

    def stream(self, request: dict[str, Any]) -> None:
        assert self.transport is not None
        head, self.token, self.tail = frames(str(request.get("model", "m")), self.pace.tokens)
        self.transport.write(head)
        self.start = self.loop.time()
        self.sent = 0
        self.first_at = self.late = 0.0
        self.timer = self.loop.call_at(self.start + self.pace.ttft, self.tick)

    def tick(self) -> None:
        """Write the next token (or the tail), and set the timer for the one after."""
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pace, now = self.pace, self.loop.time()
        due = self.start + pace.ttft + self.sent * pace.gap
        self.late = max(self.late, now - due)
        if self.sent == pace.tokens:
            transport.write(self.tail)
            return
        transport.write(self.token)
        self.sent += 1
        if self.sent == 1:
            self.first_at = now
        elif self.sent == pace.tokens and self.request_id:
            self.paces[self.request_id] = [now - self.first_at, self.late]
        self.timer = self.loop.call_at(due + pace.gap, self.tick)


async def serve_paced(port: int, pace: Pace, listeners: int = 1) -> None:
    """The paced backend on HOST:port (0: any); prints the port when it listens. With
    `listeners` > 1 it also listens on as many more ports (any free ones), printed after the
    first on the same line: one backend seen as a fleet of replicas by a proxy (the proxy's
    cost of a fleet, with the backend's work unchanged)."""
    loop = asyncio.get_running_loop()
    paces: dict[str, list[float]] = {}
    servers = [
        await loop.create_server(
            lambda: PacedBackend(pace, paces), HOST, port if i == 0 else 0, backlog=4096
        )
        for i in range(listeners)
    ]
    ports = [str(server.sockets[0].getsockname()[1]) for server in servers]
    print(" ".join(ports), flush=True)  # the parent waits for this line
    await asyncio.gather(*(server.serve_forever() for server in servers))


# ---------------------------------------------------------------- the streaming client


@dataclass(slots=True)
class Sample:
    """One stream, as the client saw it (perf_counter seconds; None: did not happen)."""

    request_id: str
    sent: float
    first: float | None = None  # first content event
    last: float | None = None  # last content event
    end: float | None = None  # end of the answer
    tokens: int = 0  # content events
    max_gap: float = 0.0  # largest wait between two content events
    status: int = 0
    done: bool = False  # [DONE] came
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.done and self.first is not None

    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    def total(self) -> float | None:
        return None if self.end is None else self.end - self.sent

    def tps(self) -> float | None:
        if self.first is None or self.last is None or self.tokens < 2 or self.last <= self.first:
            return None
        return (self.tokens - 1) / (self.last - self.first)


class StreamClient(asyncio.Protocol):
    """One keep-alive connection to the server under test, one stream at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.sample: Sample | None = None
        self.finished: asyncio.Future[Sample] | None = None
        self.tail = b""
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(f"malformed answer: {exc}")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.fail(f"connection lost: {exc or 'closed'}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def send(self, request: bytes, request_id: str) -> asyncio.Future[Sample]:
        assert self.transport is not None and self.sample is None
        self.finished = asyncio.get_running_loop().create_future()
        self.sample = Sample(request_id, time.perf_counter())
        self.tail = b""
        self.transport.write(request)
        return self.finished

    def fail(self, error: str) -> None:
        if self.sample is not None and self.finished is not None and not self.finished.done():
            self.sample.error = error
            self.finished.set_result(self.sample)
        self.sample = None

    # httptools callbacks
    def on_headers_complete(self) -> None:
        if self.sample is not None:
            self.sample.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        sample = self.sample
        if sample is None:
            return
        window = self.tail + body
        count = window.count(CONTENT_MARK)
        if count:
            now = time.perf_counter()
            if sample.first is None:
                sample.first = now
            elif sample.last is not None:
                sample.max_gap = max(sample.max_gap, now - sample.last)
            sample.last = now
            sample.tokens += count
        if not sample.done and DONE_MARK in window:
            sample.done = True
        self.tail = body[-TAIL:]  # shorter than a mark: what was counted is not counted again

    def on_message_complete(self) -> None:
        sample, self.sample = self.sample, None
        if sample is not None and self.finished is not None and not self.finished.done():
            sample.end = time.perf_counter()
            self.finished.set_result(sample)


def chat_request(host: str, port: int, request_id: str, model: str, tokens: int) -> bytes:
    """A streaming chat completion, as bytes on the wire."""
    body = json.dumps(
        {
            "model": model,
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [
                {"role": "system", "content": "You are a terse benchmarking assistant."},
                {"role": "user", "content": "Count from one to sixty-four, one word each."},
            ],
        }
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        b"Accept: text/event-stream\r\nX-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (host.encode(), port, request_id.encode(), len(body), body)
    )


def main() -> None:
    """`python scripts/bench_paced.py PORT [TOKENS TTFT_MS GAP_MS [LISTENERS]]`: only the
    backend."""
    import sys

    import uvloop

    port, *rest = (float(arg) for arg in sys.argv[1:])
    pace = Pace(int(rest[0]), rest[1] / 1000, rest[2] / 1000) if rest else Pace()
    listeners = int(rest[3]) if len(rest) > 3 else 1
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve_paced(int(port), pace, listeners))


if __name__ == "__main__":
    main()

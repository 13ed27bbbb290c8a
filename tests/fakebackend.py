"""A fake mlx_lm.server on a real socket, with faults on demand.

It speaks like mlx_lm.server on the wire: HTTP/1.0, a stream's body ends when the connection
closes, `: keepalive` comments during "prefill", `{"error": "text"}` error bodies, 411 without
a Content-Length. A request picks its behaviour with an `X-Fake` header, for example
`X-Fake: tokens=20; delay=0.05; die_after=3`:

    tokens=N       completion length (default 5)
    delay=S        seconds between tokens (default 0)
    prefill=S      seconds before the first token, sending keepalives meanwhile
    die_after=N    stream: drop the connection after N tokens, without [DONE]
    status=N       answer with this error status and an mlx_lm-style body
    stall=S        stream: after the first token, send nothing for S seconds
    hang=S         send nothing at all (not even the status line) for S seconds first
    quiet=S        stream: send the headers, then nothing (no keepalives) for S seconds
    linger=S       stream: keep the connection open S seconds after [DONE]

Every request is recorded (path, headers, JSON body), and so is the moment the client
closed the connection while the fake was still answering.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    received_at: float
    client_closed_at: float | None = None  # the peer went away before the answer was done
    finished: bool = False


def wait_until(predicate: Callable[[], object], timeout: float) -> bool:
    """Whether `predicate()` came true within `timeout` seconds (polled). Here, not in
    conftest, which imports this module: the fake's `wait_for` uses it too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


class ServerThread:
    """An asyncio server on an event loop in a thread of its own, for the tests' fakes:
    started and stopped from the test's thread, with every connection closed before its
    loop stops (see `stop`)."""

    def __init__(self, handle: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handle, self.host, self.port = handle, host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> int:
        """Serve, and return the port listened on."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._accept, self.host, self.port)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake backend did not start")
        return self.port

    def stop(self) -> None:
        assert self._loop is not None and self._server is not None and self._thread
        loop, server = self._loop, self._server

        async def shutdown() -> None:
            server.close()
            # Every connection's socket is closed before the loop stops, or it is left
            # unclosed: a ResourceWarning, an error in whichever test is tearing down. A
            # cancelled task is not enough: an accept cancelled before its first step drops
            # its socket, and a handler cancelled before its first step never runs its
            # `finally`. So: let accepts under way make their connections, abort every
            # connection, end the handlers, then let the closes (callbacks) run.
            for _ in range(3):
                await asyncio.sleep(0)
            for writer in self._writers:
                writer.transport.abort()
            for _ in range(3):  # handlers not started yet start, and see the abort
                await asyncio.sleep(0)
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2)
            for _ in range(3):
                await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(5)

    def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Coroutine[Any, Any, None]:
        """Called as the connection is made, not in a task: `stop` can close every one."""
        self._writers.add(writer)
        return self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        finally:
            self._writers.discard(writer)


@dataclass
class FakeBackend:
    host: str = "127.0.0.1"
    port: int = 0
    extra_mode: str = ""  # appended to every request's X-Fake: this instance's own behaviour
    loading_until: float = 0.0  # time.monotonic() before which POSTs get 503 "Loading model"
    requests: list[Seen] = field(default_factory=list)
    probes: int = 0  # GET /health requests answered
    _serving: ServerThread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._serving is not None and self._serving.running

    def start(self) -> FakeBackend:
        self._serving = ServerThread(self._handle, self.host, self.port)
        self.port = self._serving.start()
        return self

    def stop(self) -> None:
        assert self._serving is not None
        self._serving.stop()

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        return wait_until(predicate, timeout)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, path, headers = _parse_head(head)
            if method == "GET":
                await _answer(writer, 200, {"status": "ok"} if path == "/health" else {})
                self.probes += path == "/health"
                return
            if "content-length" not in headers:
                await _answer(writer, 411, {"error": "Content-Length header is required"})
                return
            raw = await reader.readexactly(int(headers["content-length"]))
            if time.monotonic() < self.loading_until:  # like llama.cpp's server while loading
                await _answer(writer, 503, {"error": {"message": "Loading model", "code": 503}})
                return
            seen = Seen(path, headers, json.loads(raw), time.perf_counter())
            self.requests.append(seen)
            await self._respond(seen, reader, writer)
            seen.finished = True
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the peer left, or the fake is shutting down
        finally:
            writer.close()

    async def _respond(
        self, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        mode = _mode(seen.headers.get("x-fake", "") + ";" + self.extra_mode)
        assert seen.body is not None
        watcher = asyncio.ensure_future(_watch_close(reader, seen))
        if mode.get("hang"):
            await asyncio.sleep(mode["hang"])
        if "status" in mode:
            watcher.cancel()
            await _answer(writer, int(mode["status"]), {"error": "fake backend failure"})
            return
        try:
            if seen.body.get("stream"):
                await _stream(writer, seen.body, mode)
            else:
                await asyncio.sleep(mode.get("prefill", 0) + mode.get("delay", 0) * mode["tokens"])
                await _answer(writer, 200, _completion(seen.body, int(mode["tokens"])))
        except ConnectionError:  # a write found the peer gone before the watcher did
            if seen.client_closed_at is None:
                seen.client_closed_at = time.perf_counter()
            raise
        finally:
            watcher.cancel()


async def _watch_close(reader: asyncio.StreamReader, seen: Seen) -> None:
    """HTTP/1.0: the client sends nothing more, so EOF means it closed the connection."""
    await reader.read(1)
    seen.client_closed_at = time.perf_counter()


async def _stream(
    writer: asyncio.StreamWriter, body: dict[str, Any], mode: dict[str, float]
) -> None:
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
    if mode.get("quiet"):
        await writer.drain()
        await asyncio.sleep(mode["quiet"])
    prefill = mode.get("prefill", 0.0)
    while prefill > 0:
        step = min(prefill, 0.05)
        await asyncio.sleep(step)
        prefill -= step
        writer.write(b": keepalive 1/2\n\n")
        await writer.drain()
    _event(writer, _chunk(body, {"role": "assistant", "content": ""}))  # role-only delta
    if mode.get("role_gap"):  # the role delta alone, well before the first token
        await writer.drain()
        await asyncio.sleep(mode["role_gap"])
    tokens = int(mode["tokens"])
    for i in range(tokens):
        if i and mode.get("delay"):
            await asyncio.sleep(mode["delay"])
        if "die_after" in mode and i == int(mode["die_after"]):
            writer.transport.abort()
            return
        _event(writer, _chunk(body, {"content": f"tok{i} "}))
        await writer.drain()
        if i == 0 and mode.get("stall"):
            await asyncio.sleep(mode["stall"])
    _event(writer, _chunk(body, {}, finish="length"))
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens}
        _event(
            writer,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "model": body.get("model", "default_model"),
                "created": 0,
                "choices": [],
                "usage": usage,
            },
        )
    writer.write(b"data: [DONE]\n\n")
    await writer.drain()
    await asyncio.sleep(mode.get("linger", 0))  # mlx_lm.server closes 10-25 ms after [DONE]


def _chunk(
    body: dict[str, Any], delta: dict[str, Any], finish: str | None = None
) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": body.get("model", "default_model"),
        "choices": [choice],
    }


def _completion(body: dict[str, Any], tokens: int) -> dict[str, Any]:
    text = "".join(f"tok{i} " for i in range(tokens))
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "default_model"),
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "message": {"role": "assistant", "content": text},
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens},
    }


def _event(writer: asyncio.StreamWriter, payload: dict[str, Any]) -> None:
    writer.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


async def _answer(writer: asyncio.StreamWriter, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    writer.write(
        f"HTTP/1.0 {status} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return method, path, headers


def _mode(spec: str) -> dict[str, float]:
    mode: dict[str, float] = {"tokens": 5}
    for part in spec.split(";"):
        if "=" in part:
            key, value = part.split("=", 1)
            mode[key.strip()] = float(value)
    return mode


def main() -> None:
    """A stand-in backend program for the launcher's tests."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--listen-after", type=float, default=0.0, help="seconds of 'loading'")
    parser.add_argument("--exit-after", type=float, help="exit with code 3 after this long")
    parser.add_argument(
        "--loading-503", type=float, default=0.0, help="answer 503 to completions this long"
    )
    args = parser.parse_args()

    def on_sigterm(signum: int, frame: object) -> None:
        # Who stopped it: the proxy (still its parent), or Linux after the proxy died.
        print(f"stand-in: SIGTERM, parent {os.getppid()}", flush=True)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    print("stand-in: loading", flush=True)
    time.sleep(args.listen_after)
    backend = FakeBackend(port=args.port, loading_until=time.monotonic() + args.loading_503)
    backend.start()
    print(f"stand-in: listening on {backend.url}", flush=True)
    if args.exit_after is not None:
        time.sleep(args.exit_after)
        print("stand-in: crashing", flush=True)
        raise SystemExit(3)
    threading.Event().wait()


if __name__ == "__main__":
    main()

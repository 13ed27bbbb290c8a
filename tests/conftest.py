"""Shared fixtures: fake backends on real sockets, and the proxy on its own server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import uvloop

from proxy.app import ProxyApp, create_app, create_server
from proxy.config import Config, parse_config
from proxy.upstream import Transport
from tests.fakebackend import FakeBackend

# The one shape of a `rejected` line, whoever refused the request (see AccessLog.rejected).
REJECTED = {"event", "timestamp", "config_version", "request_id", "method", "path", "status"}
REJECTED |= {"error", "client", "detail"}


def make_config(tmp_path: Path, urls: dict[str, str], **overrides: Any) -> Config:
    """A valid config over backends `urls` (name -> url), split evenly unless overridden;
    each override is merged into the top-level section of its name."""
    names = list(urls)
    share = 100 / len(names)
    data: dict[str, Any] = {
        "model": "test-model",
        "backends": {name: {"url": url} for name, url in urls.items()},
        "routing": {"header": "X-Backend", "split": dict.fromkeys(names, share)},
        "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(data)


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    # "\n" only: str.splitlines() also cuts at U+2028 and U+0085, which a logged path may hold.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture
def fake() -> Iterator[FakeBackend]:
    backend = FakeBackend().start()
    yield backend
    backend.stop()


@pytest.fixture
def fake2() -> Iterator[FakeBackend]:
    backend = FakeBackend().start()
    yield backend
    backend.stop()


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeBackend]]:
    """Start fake backends (with a behaviour of their own); all stopped at the end."""
    started: list[FakeBackend] = []

    def start(mode: str = "", port: int = 0) -> FakeBackend:
        backend = FakeBackend(port=port, extra_mode=mode).start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        if backend.running:
            backend.stop()


class ThreadedServer:
    """The proxy's own HTTP server (proxy/server.py) for `app`, as `python -m proxy serve`
    runs it (on uvloop), on a loopback port, in a thread of this process."""

    def __init__(self, app: ProxyApp, grace_seconds: float = 5.0) -> None:
        self.app = app
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.socket.getsockname()[1]
        self.server = create_server(app, grace_seconds)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("proxy did not start")
            time.sleep(0.01)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve([self.socket])

        uvloop.run(main())

    def stop(self, timeout: float = 10) -> None:
        """Shut down as on SIGTERM: in-flight requests finish, then the lifespan ends."""
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.server.shutdown)
        self.thread.join(timeout)
        self.socket.close()


@dataclass
class RunningProxy:
    url: str
    log_path: Path
    server: object  # what serves it (ours, or uvicorn in test_uvicorn.py): kept alive with it

    def log(self) -> list[dict[str, Any]]:
        """The request lines (the proxy's other events: `events`)."""
        return [line for line in read_log(self.log_path) if line["event"] == "request"]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in read_log(self.log_path) if line["event"] == name]

    def wait_for_log(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Log lines are written after the last byte; wait until `count` have landed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.log()
            if len(lines) >= count:
                return lines
            time.sleep(0.01)
        return self.log()


def stream_lines(url: str, body: dict[str, Any], headers: dict[str, str]) -> list[str]:
    """POST a streaming request over a real socket and read the whole answer, line by line."""
    with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as response:
        return list(response.iter_lines())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback URL where nothing listens, for the whole test: its port is held by a bound
    socket that never listens, so connections are refused and no other server can take it
    (a port found free and let go could be)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def refuses_connections(url: str) -> bool:
    """Whether nothing listens at `url`'s host and port any more."""
    address = httpx.URL(url)
    try:
        socket.create_connection((address.host, address.port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def serve_proxy() -> Iterator[Any]:
    """Start the proxy for a config on its own server on a loopback port, in a thread;
    `transport` in place of its own connection pool (the benchmark's aiohttp arm)."""
    servers: list[ThreadedServer] = []

    def start(
        config: Config, config_path: Path | None = None, transport: Transport | None = None
    ) -> RunningProxy:
        server = ThreadedServer(create_app(config, config_path=config_path, transport=transport))
        servers.append(server)
        assert config.logging.path is not None
        return RunningProxy(f"http://127.0.0.1:{server.port}", config.logging.path, server)

    yield start
    for server in servers:
        server.stop()


@dataclass
class ServedProxy:
    """`python -m proxy serve` running in a subprocess."""

    url: str
    pid: int
    backend_pids: list[int]
    stderr: Path


@contextlib.contextmanager
def serve_subprocess(
    routes: dict[str, Any], root: Path, timeout: float = 300, flags: tuple[str, ...] = ()
) -> Iterator[ServedProxy]:
    """Run the whole product on `routes` (launched backends included), with `serve`'s extra
    `flags`, until the block ends; then stop it as a user would (SIGINT), and check that
    nothing is left running."""
    (root / "routes.yaml").write_text(json.dumps(routes))  # JSON is YAML
    stderr = root / "stderr.txt"
    with stderr.open("w") as err:  # a file, not a pipe that could fill up and block it
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(root / "routes.yaml"), *flags],
            cwd=root,
            stderr=err,  # backend logs go to root/logs/backends/
        )
    try:
        deadline = time.monotonic() + timeout
        while "specproxy: serving on" not in stderr.read_text():
            assert process.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.2)
        children = psutil.Process(process.pid).children()
        url = f"http://127.0.0.1:{routes['listen']['port']}"
        yield ServedProxy(url, process.pid, [child.pid for child in children], stderr)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    assert process.returncode == 0, stderr.read_text()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"


class Background:
    """A request in a thread; its outcome (or exception) once joined."""

    def __init__(self, send: Callable[[], Any]):
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at = 0.0

        def run() -> None:
            try:
                self.result = send()
            except BaseException as exc:  # handed to the test by join()
                self.error = exc
            self.finished_at = time.perf_counter()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self, timeout: float = 10) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background request still running"
        if self.error is not None:
            raise self.error
        return self.result

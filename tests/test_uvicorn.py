"""Real sockets: the proxy under uvicorn, a standard ASGI server, not its own.

Our server tells the app of a client that left through a scope extension; under any other
server the app learns it from `receive()` (`relay.watch_client`). Only a real server
on real sockets shows that this path frees the backend, and that the app streams, answers
and logs under a server it was not written with. The app runs as `serve --server uvicorn`
runs it (`UvicornServer`), in a thread; the last tests run that command itself, over
plain HTTP and over TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from proxy.app import create_app
from proxy.config import Config
from proxy.uvicorn_server import UvicornServer
from tests.conftest import (
    Background,
    RunningProxy,
    free_port,
    make_config,
    read_log,
    serve_subprocess,
    stream_lines,
)
from tests.fakebackend import FakeBackend, wait_until
from tests.test_streaming import (
    CHAT,
    STREAM,
    assert_leaving_mid_stream_frees_the_backend,
    assert_one_sane_line,
    content_events,
    stream_to_first_token,
)


@contextlib.contextmanager
def under_uvicorn(config: Config) -> Iterator[RunningProxy]:
    """The proxy for `config`, as `serve --server uvicorn` runs it, on a loopback port, in
    a thread."""
    # A short grace: a test that failed mid-stream does not hold it.
    server = UvicornServer(create_app(config), grace_seconds=2)
    sock = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=asyncio.run, args=(server.serve([sock]),), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        assert config.logging.path is not None
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        yield RunningProxy(url, config.logging.path, server)
    finally:
        server.shutdown()  # a flag its loop polls: safe from this thread
        thread.join(10)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def proxy(tmp_path: Path, fake: FakeBackend) -> Iterator[RunningProxy]:
    """The proxy in front of `fake`, under uvicorn."""
    with under_uvicorn(make_config(tmp_path, {"baseline": fake.url})) as running:
        yield running


def assert_tagged(response: httpx.Response, line: dict[str, Any]) -> None:
    assert response.headers["x-backend"] == "baseline" == line["backend"]
    assert response.headers["x-request-id"] == line["request_id"]
    assert (line["status"], line["error"], line["client_disconnected"]) == (200, None, False)


def test_first_token_reaches_client_while_backend_still_generates(
    proxy: RunningProxy, fake: FakeBackend
) -> None:
    first_token_s, backend_done_then, rest, response = stream_to_first_token(
        proxy, fake, {"X-Fake": "tokens=5; delay=0.2"}
    )
    assert first_token_s < 0.5  # the whole answer takes 0.8 s
    assert backend_done_then is False
    assert len(content_events(rest)) == 4 and rest[-2] == "data: [DONE]"
    line = assert_one_sane_line(proxy)
    assert_tagged(response, line)
    assert line["completion_tokens"] == 5 and line["latency_ms"] >= 800


def test_non_stream_answer_comes_back_whole(proxy: RunningProxy) -> None:
    headers = {"X-Fake": "tokens=3; delay=0.1"}
    response = httpx.post(proxy.url + CHAT, json={"messages": []}, headers=headers, timeout=10)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    line = assert_one_sane_line(proxy)
    assert_tagged(response, line)
    assert line["completion_tokens"] == 3 and line["latency_ms"] >= 300


def test_client_disconnect_closes_the_backend_connection(
    proxy: RunningProxy, fake: FakeBackend
) -> None:
    """uvicorn drops writes to a client that left without a word: only `receive()` says so."""
    assert_leaving_mid_stream_frees_the_backend(proxy, fake)


def test_trailers_are_not_headers_under_uvicorn_either(tmp_path: Path, fake: FakeBackend) -> None:
    """uvicorn's httptools protocol would add trailer fields to the request's headers: an
    API key sent only in a trailer must still be a 401."""
    config = make_config(tmp_path, {"baseline": fake.url}, auth={"api_keys": ["sk-secret"]})
    body = b'{"messages":[{"role":"user","content":"A"}],"max_tokens":1}'
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n%x\r\n%b\r\n0\r\nAuthorization: Bearer sk-secret\r\n\r\n"
        % (len(body), body)
    )
    with under_uvicorn(config) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert not fake.requests


# --- the command: `serve --server uvicorn`, over HTTP and TLS -------------------------------
def start_serve(
    tmp_path: Path, fake: FakeBackend, *flags: str, grace: float = 10
) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    routes = {
        "model": "test-model",
        "listen": {"port": port},
        "backends": {"baseline": {"url": fake.url}},
        "routing": {"split": {"baseline": 100}},
        "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
        "shutdown": {"grace_seconds": grace},
    }
    path = tmp_path / "routes.yaml"
    path.write_text(json.dumps(routes))  # JSON is YAML
    stderr = tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "proxy", "serve", "--config", str(path), *flags]
    with stderr.open("w") as err:
        process = subprocess.Popen(command, stderr=err)
    deadline = time.monotonic() + 30
    while "specproxy: serving on" not in stderr.read_text():
        assert process.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, stderr.read_text()
        time.sleep(0.05)
    return process, port, path


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(10)


def stream(url: str, verify: ssl.SSLContext | bool = True) -> list[str]:
    headers = {"X-Fake": "tokens=5; delay=0.05"}
    with httpx.Client(verify=verify, timeout=10) as client:  # noqa: SIM117
        with client.stream("POST", url + CHAT, json=STREAM, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["x-backend"] == "baseline"
            return list(response.iter_lines())


def test_serve_on_uvicorn_streams_reloads_and_shuts_down_gracefully(
    tmp_path: Path, fake: FakeBackend
) -> None:
    """The command: a streamed completion, a SIGHUP reload, then SIGTERM lets a stream in
    flight finish before the process exits 0."""
    process, port, path = start_serve(tmp_path, fake, "--server", "uvicorn")
    url = f"http://127.0.0.1:{port}"
    try:
        lines = stream(url)
        assert len(content_events(lines)) == 5 and lines[-2] == "data: [DONE]"
        routes = json.loads(path.read_text())
        routes["routing"]["sticky_header"] = "X-Session-Id"
        path.write_text(json.dumps(routes))
        process.send_signal(signal.SIGHUP)
        log = tmp_path / "requests.jsonl"
        assert wait_until(lambda: any(e["event"] == "config_reloaded" for e in read_log(log)), 10)
        long = Background(
            lambda: stream_lines(url + CHAT, STREAM, {"X-Fake": "tokens=10; delay=0.1"})
        )
        assert fake.wait_for(lambda: len(fake.requests) == 2, 5)
        time.sleep(0.2)  # mid-stream
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        later = long.join(15)
    finally:
        stop(process)
    assert len(content_events(later)) == 10 and later[-2] == "data: [DONE]"  # not cut
    requests = [e for e in read_log(log) if e["event"] == "request"]
    assert [(e["status"], e["error"]) for e in requests] == [(200, None), (200, None)]
    assert requests[0]["config_version"] != requests[1]["config_version"]


def test_serve_on_uvicorn_over_tls(tmp_path: Path, fake: FakeBackend) -> None:
    """With a certificate and its key, the proxy answers over https, the client checking
    the certificate against its CA."""
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    certificate.private_key_pem.write_to_path(str(keyfile))
    flags = ("--server", "uvicorn", "--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile))
    process, port, _ = start_serve(tmp_path, fake, *flags)
    try:
        trusting = ssl.create_default_context()
        authority.configure_trust(trusting)
        lines = stream(f"https://127.0.0.1:{port}", verify=trusting)
        with pytest.raises(httpx.ConnectError):  # and only with the CA: it is checked
            stream(f"https://127.0.0.1:{port}")
    finally:
        assert stop(process) == 0
    assert len(content_events(lines)) == 5 and lines[-2] == "data: [DONE]"
    assert "serving on https://" in (tmp_path / "stderr.txt").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--ssl-certfile", "cert.pem"), "need --server uvicorn"),
        (("--server", "uvicorn", "--ssl-keyfile", "key.pem"), "needs --ssl-certfile"),
        (("--server", "uvicorn", "--ssl-certfile", "missing.pem"), "cannot use the TLS"),
    ],
)
def test_tls_flags_the_server_cannot_use_are_refused(
    tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    """Exit 2 and one line saying why, before any backend or port is touched."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", *flags],
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert message in done.stderr.decode()


def test_serve_on_uvicorn_launches_and_stops_its_backends(tmp_path: Path) -> None:
    """A launched backend serves the answers under uvicorn too, and is stopped with it."""
    port, backend_port = free_port(), free_port()
    standin = str(Path(__file__).with_name("fakebackend.py"))
    routes = {
        "model": "test-model",
        "listen": {"port": port},
        "backends": {
            "baseline": {
                "url": f"http://127.0.0.1:{backend_port}",
                "launch": {"command": ["{python}", standin, "--port", "{port}"]},
            }
        },
        "routing": {"split": {"baseline": 100}},
        "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
    }
    with serve_subprocess(routes, tmp_path, timeout=60, flags=("--server", "uvicorn")) as served:
        assert served.backend_pids
        lines = stream(served.url)
    assert len(content_events(lines)) == 5 and lines[-2] == "data: [DONE]"

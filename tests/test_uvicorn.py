"""Real sockets: the proxy under uvicorn, a standard ASGI server, not its own.

Our server tells the app of a client that left through a scope extension; under any other
server the app learns it from `receive()` (`relay.watch_client`). Only a real server
on real sockets shows that this path frees the backend, and that the app streams, answers
and logs under a server it was not written with.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from proxy.app import create_app
from tests.conftest import RunningProxy, make_config
from tests.fakebackend import FakeBackend
from tests.test_streaming import (
    CHAT,
    assert_leaving_mid_stream_frees_the_backend,
    assert_one_sane_line,
    content_events,
    stream_to_first_token,
)


@pytest.fixture
def proxy(tmp_path: Path, fake: FakeBackend) -> Iterator[RunningProxy]:
    """The proxy in front of `fake`, under uvicorn on a loopback port, in a thread."""
    config = make_config(tmp_path, {"baseline": fake.url})
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            lifespan="on",  # the lifespan builds the app's shared state
            ws="none",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,  # a test that failed mid-stream does not hold it
        )
    )
    sock = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
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
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


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

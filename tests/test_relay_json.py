"""A JSON answer is complete once its body went out, through the real proxy on real
sockets: a client that leaves while that write waits for it has not had its answer."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from proxy.config import parse_config
from tests.fakebackend import wait_until
from tests.rawbackend import Answer, RawBackend, completion

BIG = 8 << 20  # past what the proxy's socket, the client's and the transport buffer hold


def post(request_id: str) -> bytes:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        f"X-Request-Id: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_a_json_answer_whose_write_waits_for_a_client_that_leaves_is_not_complete(
    tmp_path: Path, serve_proxy: Any
) -> None:
    """The client pipelines two requests and reads nothing: the first answer fills every
    buffer on the way, so the second's body waits for the client to read; the client hangs
    up then. The second's line says the client left, not that it had its answer."""

    def script(index: int, request_id: str) -> Answer:
        return Answer([completion(request_id, BIG if index == 0 else 0)])

    backend = RawBackend(script).start()
    try:
        config = parse_config(
            {
                "model": "test-model",
                "backends": {"baseline": {"url": backend.url, "health": {"probe_interval": 60}}},
                "routing": {"split": {"baseline": 100}},
                "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
            }
        )
        proxy = serve_proxy(config)
        server = proxy.server.server  # the proxy's own server (proxy/server.py)

        def second_waits_to_write() -> bool:
            """The second answer's head is held for its body, and the write is paused."""
            for conn in list(server.connections):
                active, paused = conn.active, conn.write_paused
                if active is None or paused is None or paused.done():
                    continue
                if active.started and active.head:
                    return True
            return False

        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])))
        try:
            client.sendall(post("A") + post("B"))
            assert wait_until(second_waits_to_write, 20.0)
        finally:
            client.close()  # unread bytes: a reset
        lines = proxy.wait_for_log(2, timeout=20.0)
        by_id = {line["request_id"]: line for line in lines}
        second = by_id["B"]
        assert (second["status"], second["error"]) == (200, None)  # it had started
        assert second["client_disconnected"] is True
        assert [r.request_id for r in backend.requests] == ["A", "B"]
    finally:
        backend.stop()

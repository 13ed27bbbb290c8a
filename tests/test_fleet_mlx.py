"""Launched replicas, for real: `python -m proxy serve` starts two tiny-model
mlx_lm.server processes for the speculative arm (`launch.replicas: 2`, consecutive ports),
balances requests between them, and stops them all at the end."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Background, free_port, read_log, serve_subprocess
from tests.tinymodel import build_tiny_model

pytestmark = pytest.mark.mlx

MESSAGES: Any = [{"role": "user", "content": "What is the capital of France?"}]


def consecutive_free_ports(count: int) -> int:
    """The first of `count` free loopback ports in a row."""
    for _ in range(100):
        first = free_port()
        if first + count > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return first
    raise AssertionError("no run of free ports")


def test_two_launched_replicas_serve_one_arm(tmp_path: Path) -> None:
    model = str(build_tiny_model(tmp_path / "model"))
    first = consecutive_free_ports(2)
    fleet = [f"http://127.0.0.1:{first}", f"http://127.0.0.1:{first + 1}"]
    routes = {
        "listen": {"port": free_port()},
        "model": "tiny",
        "backends": {
            "baseline": {"url": f"http://127.0.0.1:{free_port()}", "launch": {"model": model}},
            "speculative": {
                "url": fleet[0],
                "launch": {
                    "model": model,
                    "draft_model": model,
                    "num_draft_tokens": 2,
                    "replicas": 2,
                },
            },
        },
        "routing": {"split": {"baseline": 0, "speculative": 100}},
        "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
    }
    with serve_subprocess(routes, tmp_path, timeout=180) as served:
        assert len(served.backend_pids) == 3  # the baseline and two replicas
        health = httpx.get(served.url + "/healthz", timeout=10).json()["backends"]["speculative"]
        assert list(health["replicas"]) == fleet and health["healthy"] is True
        pids = {r["process"]["pid"] for r in health["replicas"].values()}
        assert len(pids) == 2 and all(r["process"]["ready"] for r in health["replicas"].values())
        # A long stream on one replica: the next request goes to the other.
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 400, "stream": True}
        long = Background(
            lambda: httpx.post(served.url + "/v1/chat/completions", json=body, timeout=120)
        )

        def busy() -> list[int]:
            state = httpx.get(served.url + "/healthz", timeout=10).json()["backends"]
            return [r["in_flight"] for r in state["speculative"]["replicas"].values()]

        deadline = time.monotonic() + 30
        while sum(busy()) == 0:
            assert time.monotonic() < deadline, "the long stream never started"
            time.sleep(0.02)
        idle = fleet[busy().index(0)]
        short = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4}
        answer = httpx.post(
            served.url + "/v1/chat/completions",
            json=short,
            headers={"X-Request-Id": "short"},
            timeout=60,
        )
        assert answer.status_code == 200 and answer.headers["x-backend"] == "speculative"
        assert long.join(120).status_code == 200
        log = read_log(tmp_path / "requests.jsonl")
        lines = [line for line in log if line["event"] == "request"]
        (line,) = [line for line in lines if line["request_id"] == "short"]
        assert (line["replica"], line["in_flight"], line["error"]) == (idle, 0, None)
        assert {line["replica"] for line in lines} == set(fleet)
        ready = [e for e in log if e["event"] == "backend_ready"]
        assert sorted(e["replica"] for e in ready if e["backend"] == "speculative") == fleet
    for index in (0, 1):  # one log per replica
        assert (tmp_path / "logs" / "backends" / f"speculative-{index}.log").stat().st_size > 0

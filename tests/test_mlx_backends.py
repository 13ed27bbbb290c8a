"""The real thing: `python -m proxy serve` launches two real mlx_lm.server processes (one
with the model as its own draft), and the openai SDK talks to it. The model is a tiny
random-weight llama that the test builds."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import free_port, read_log, serve_subprocess
from tests.tinymodel import build_tiny_model

pytestmark = pytest.mark.mlx

ROOT = Path(__file__).resolve().parent.parent
MESSAGES: Any = [{"role": "user", "content": "What is the capital of France?"}]
# mlx-lm 0.32 with a draft model: reusing the prompt cache changes greedy outputs (see
# tests/tinymodel.py). Without the cache, the two backends must agree token for token.
NO_CACHE = ["--prompt-cache-size", "0"]


@dataclass
class Proxy:
    url: str
    log_path: Path
    pids: list[int]

    def line(self, request_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for line in read_log(self.log_path):
                if line.get("request_id") == request_id:
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line for {request_id}")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    root = tmp_path_factory.mktemp("mlx")
    model = str(build_tiny_model(root / "model"))
    port = free_port()
    routes = {
        "listen": {"port": port},
        "model": "tiny",
        "backends": {
            "baseline": {
                "url": f"http://127.0.0.1:{free_port()}",
                "launch": {"model": model, "extra_args": NO_CACHE},
            },
            "speculative": {
                "url": f"http://127.0.0.1:{free_port()}",
                "launch": {
                    "model": model,
                    "draft_model": model,
                    "num_draft_tokens": 2,
                    "extra_args": NO_CACHE,
                },
            },
        },
        "routing": {"split": {"baseline": 50, "speculative": 50}},
        "logging": {"path": str(root / "requests.jsonl"), "stdout": False},
        "shadow": {"from": "baseline", "to": "speculative", "sample": 1.0, "max_in_flight": 1},
    }
    with serve_subprocess(routes, root, timeout=120) as served:
        yield Proxy(served.url, root / "requests.jsonl", served.backend_pids)


@pytest.fixture
def client(proxy: Proxy) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=60
    ) as sdk:
        yield sdk


def ask(client: openai.OpenAI, backend: str | None, **params: Any) -> tuple[Any, str]:
    request_id = uuid.uuid4().hex
    headers = {"X-Request-Id": request_id} | ({"X-Backend": backend} if backend else {})
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MESSAGES, extra_headers=headers, **params
    )
    return raw, request_id


@pytest.mark.parametrize("backend", ["baseline", "speculative"])
def test_non_stream_through_the_proxy(client: openai.OpenAI, proxy: Proxy, backend: str) -> None:
    raw, request_id = ask(client, backend, max_tokens=8, temperature=0)
    completion = raw.parse()
    assert raw.headers["x-backend"] == backend
    assert completion.model == "tiny"  # not the backend's "default_model"
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    line = proxy.line(request_id)
    assert (line["backend"], line["reason"], line["status"], line["error"]) == (
        backend,
        "header",
        200,
        None,
    )
    assert line["completion_tokens"] == 8 and line["prompt_tokens"] > 0
    assert 0 < line["ttft_ms"] <= line["latency_ms"]


@pytest.mark.parametrize("backend", ["baseline", "speculative"])
def test_stream_through_the_proxy(client: openai.OpenAI, proxy: Proxy, backend: str) -> None:
    # decode_tps is null when every content chunk reached the proxy in one read: on a loaded
    # machine, the tiny model's 16 tokens can. One of three tries must time them apart.
    speeds = []
    for _ in range(3):
        raw, request_id = ask(client, backend, max_tokens=16, temperature=0, stream=True)
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(text) >= 16  # every token of the tiny model decodes to printable text
        assert all(chunk.usage is None for chunk in chunks)
        line = proxy.line(request_id)
        assert (line["backend"], line["stream"], line["completion_tokens"]) == (backend, True, 16)
        assert 0 < line["ttft_ms"] <= line["latency_ms"]
        speeds.append(line["decode_tps"])
        if speeds[-1] is not None:
            break
    assert speeds[-1] is not None and speeds[-1] > 0, speeds


def test_greedy_outputs_match_between_baseline_and_speculative(client: openai.OpenAI) -> None:
    answers = {
        backend: ask(client, backend, max_tokens=24, temperature=0)[0]
        .parse()
        .choices[0]
        .message.content
        for backend in ("baseline", "speculative")
    }
    assert answers["baseline"] == answers["speculative"], answers


def test_client_model_and_draft_fields_never_reach_the_backend(client: openai.OpenAI) -> None:
    """mlx_lm.server would try to load these (and fail offline, or reload its models)."""
    raw, _ = ask(
        client,
        "speculative",
        max_tokens=2,
        extra_body={"model": "some-unknown-model", "draft_model": "another", "num_draft_tokens": 7},
    )
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 2


def test_backend_validation_error_arrives_in_openai_shape(proxy: Proxy) -> None:
    request_id = uuid.uuid4().hex
    response = httpx.post(
        proxy.url + "/v1/chat/completions",
        timeout=60,
        headers={"X-Request-Id": request_id},
        json={"messages": MESSAGES, "max_tokens": -1},
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "max_tokens must be at least 1"
    assert proxy.line(request_id)["error"] == "backend_error"


def test_split_sends_traffic_to_both_real_backends(client: openai.OpenAI) -> None:
    served: Counter[str] = Counter()
    for _ in range(16):
        raw, _ = ask(client, None, max_tokens=1)
        served[raw.headers["x-backend"]] += 1
    assert set(served) == {"baseline", "speculative"}  # all 16 on one side: p = 2**-15


def test_healthz_reports_the_launched_processes(proxy: Proxy) -> None:
    health = httpx.get(proxy.url + "/healthz", timeout=5).json()
    for name in ("baseline", "speculative"):
        process = health["backends"][name]["process"]
        assert process["ready"] and process["rss_mb"] > 10
    events = {line["event"] for line in read_log(proxy.log_path)}
    assert {"backend_ready", "backend_memory"} <= events


def test_shadow_checks_compare_real_greedy_outputs(client: openai.OpenAI, proxy: Proxy) -> None:
    _, request_id = ask(client, "baseline", max_tokens=12, temperature=0)
    deadline = time.monotonic() + 30
    while not (
        shadows := [
            e
            for e in read_log(proxy.log_path)
            if e["event"] == "shadow" and e["request_id"] == request_id
        ]
    ):
        assert time.monotonic() < deadline, "no shadow event"
        time.sleep(0.1)
    [shadow] = shadows
    assert (shadow["from"], shadow["to"], shadow["error"]) == ("baseline", "speculative", None)
    assert shadow["match"] is True and shadow["from_chars"] >= 12  # no prompt cache: equal
    assert shadow["to_latency_ms"] > 0

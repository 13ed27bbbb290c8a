"""The real thing: two real mlx_lm.server processes (one with a draft model) behind the proxy,
driven by the openai SDK. The model is a tiny random-weight llama built by the test."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningProxy, make_config
from tests.tinymodel import build_tiny_model, free_port, run_mlx_server

pytestmark = pytest.mark.mlx

MESSAGES: Any = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("mlx")
    model = build_tiny_model(root / "model")
    with (
        run_mlx_server(model, free_port(), log_path=root / "baseline.log") as baseline,
        run_mlx_server(
            model,
            free_port(),
            draft_model=model,
            num_draft_tokens=2,
            log_path=root / "speculative.log",
        ) as speculative,
    ):
        yield {"baseline": baseline, "speculative": speculative}


@pytest.fixture
def proxy(tmp_path: Path, backends: dict[str, str], serve_proxy: Any) -> RunningProxy:
    running: RunningProxy = serve_proxy(make_config(tmp_path, backends))
    return running


@pytest.fixture
def client(proxy: RunningProxy) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=60
    ) as sdk:
        yield sdk


@pytest.mark.parametrize("backend", ["baseline", "speculative"])
def test_non_stream_through_the_proxy(
    client: openai.OpenAI, proxy: RunningProxy, backend: str
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="test-model",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        extra_headers={"X-Backend": backend},
    )
    completion = raw.parse()
    assert raw.headers["x-backend"] == backend
    assert completion.model == "test-model"  # not the backend's "default_model"
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    line = proxy.wait_for_log(1)[0]
    assert (line["backend"], line["status"], line["error"]) == (backend, 200, None)
    assert line["completion_tokens"] == 8 and line["prompt_tokens"] > 0
    assert 0 < line["ttft_ms"] <= line["latency_ms"]


@pytest.mark.parametrize("backend", ["baseline", "speculative"])
def test_stream_through_the_proxy(client: openai.OpenAI, proxy: RunningProxy, backend: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model="test-model",
            messages=MESSAGES,
            max_tokens=16,
            temperature=0,
            stream=True,
            extra_headers={"X-Backend": backend},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) >= 16  # every token of the tiny model decodes to printable text
    assert all(chunk.usage is None for chunk in chunks)
    line = proxy.wait_for_log(1)[0]
    assert (line["backend"], line["stream"], line["completion_tokens"]) == (backend, True, 16)
    assert line["decode_tps"] > 0
    assert 0 < line["ttft_ms"] <= line["latency_ms"]


def test_client_model_and_draft_fields_never_reach_the_backend(client: openai.OpenAI) -> None:
    """mlx_lm.server would try to load these (and fail offline, or reload its models)."""
    completion = client.chat.completions.create(
        model="some-model-the-backend-cannot-load",
        messages=MESSAGES,
        max_tokens=2,
        extra_headers={"X-Backend": "speculative"},
        extra_body={"draft_model": "another-unknown-model", "num_draft_tokens": 7},
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 2


def test_backend_validation_error_arrives_in_openai_shape(proxy: RunningProxy) -> None:
    response = httpx.post(
        proxy.url + "/v1/chat/completions",
        timeout=60,
        json={"messages": MESSAGES, "max_tokens": -1},
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "max_tokens must be at least 1"
    assert proxy.wait_for_log(1)[0]["error"] == "backend_error"


def test_split_sends_traffic_to_both_real_backends(client: openai.OpenAI) -> None:
    served: Counter[str] = Counter()
    for _ in range(16):
        raw = client.chat.completions.with_raw_response.create(
            model="test-model", messages=MESSAGES, max_tokens=1
        )
        served[raw.headers["x-backend"]] += 1
    assert set(served) == {"baseline", "speculative"}  # all 16 on one side: p = 2**-15

"""A real client: the openai SDK with `base_url` at the proxy, over real sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import RunningProxy, make_config
from tests.fakebackend import FakeBackend

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def proxy(tmp_path: Path, fake: FakeBackend, fake2: FakeBackend, serve_proxy: Any) -> RunningProxy:
    running: RunningProxy = serve_proxy(
        make_config(tmp_path, {"baseline": fake.url, "speculative": fake2.url})
    )
    return running


@pytest.fixture
def client(proxy: RunningProxy) -> Any:
    with openai.OpenAI(
        base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0, timeout=10
    ) as sdk:
        yield sdk


def test_non_stream_completion(client: openai.OpenAI, proxy: RunningProxy) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="test-model",
        messages=MESSAGES,
        max_tokens=4,
        extra_headers={"X-Backend": "speculative"},
    )
    completion = raw.parse()
    assert raw.headers["x-backend"] == "speculative"
    assert completion.model == "test-model"
    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    line = proxy.wait_for_log(1)[0]
    assert (line["backend"], line["reason"], line["stream"]) == ("speculative", "header", False)


def test_stream_completion(client: openai.OpenAI, proxy: RunningProxy) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="test-model",
        messages=MESSAGES,
        stream=True,
        extra_headers={"X-Fake": "tokens=4; delay=0.05"},
    )
    assert raw.headers["x-backend"] in {"baseline", "speculative"}
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 "
    assert all(chunk.usage is None for chunk in chunks)  # the client did not ask for it
    line = proxy.wait_for_log(1)[0]
    assert (line["stream"], line["completion_tokens"], line["error"]) == (True, 4, None)
    assert line["decode_tps"] > 0


def test_stream_with_usage_when_asked(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="test-model",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Fake": "tokens=3"},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_sdk_raises_when_backend_dies_mid_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="test-model",
        messages=MESSAGES,
        stream=True,
        extra_headers={"X-Fake": "tokens=10; die_after=2"},
    )
    with pytest.raises(openai.APIError, match=r"before \[DONE\]|mid-stream"):
        list(stream)


def test_sdk_gets_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="valid backends: baseline, speculative"):
        client.chat.completions.create(
            model="test-model", messages=MESSAGES, extra_headers={"X-Backend": "nope"}
        )
    with pytest.raises(openai.InternalServerError, match="fake backend failure"):
        client.chat.completions.create(
            model="test-model", messages=MESSAGES, extra_headers={"X-Fake": "status=500"}
        )


def test_sdk_lists_models(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["test-model"]

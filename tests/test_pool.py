"""The connection pool's limits as a client sees them, through the real proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from proxy.config import parse_config
from tests.conftest import Background
from tests.fakebackend import FakeBackend, wait_until

BODY = {"messages": [{"role": "user", "content": "hi"}]}


def test_a_full_pool_is_a_504_that_says_so(
    fake: FakeBackend, tmp_path: Path, serve_proxy: Any
) -> None:
    """With every connection to the backend busy, a request waits within its connect
    timeout, then gets the connect-timeout error naming the full pool; the busy one ends
    well, and the next request is served."""
    config = parse_config(
        {
            "model": "test-model",
            "backends": {
                "baseline": {
                    "url": fake.url,
                    "timeouts": {"connect": 0.3},
                    "health": {"probe_interval": 60},
                }
            },
            "routing": {"split": {"baseline": 100}},
            "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
            "limits": {"max_connections_per_backend": 1},
        }
    )
    proxy = serve_proxy(config)
    url = proxy.url + "/v1/chat/completions"
    busy = Background(lambda: httpx.post(url, json=BODY, headers={"x-fake": "hang=1.5"}))
    assert wait_until(lambda: len(fake.requests) == 1, 5.0)
    waiting = httpx.post(url, json=BODY, timeout=5)
    assert waiting.status_code == 504
    error = waiting.json()["error"]
    assert error["code"] == "backend_timeout" and "pool is full" in error["message"]
    assert "limits.max_connections_per_backend" in error["message"]
    assert busy.join().status_code == 200
    assert httpx.post(url, json=BODY, timeout=5).status_code == 200
    errors = [line["error"] for line in proxy.wait_for_log(3)]
    assert sorted(errors, key=str) == sorted(["backend_timeout", None, None], key=str)

"""Access control (API keys, admin token) and /metrics, over real sockets."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import auth
from proxy.config import Auth
from proxy.errors import AuthenticationError, ConfigError, ForbiddenError
from tests.conftest import RunningProxy, make_config
from tests.fakebackend import FakeBackend

CHAT = "/v1/chat/completions"
BODY = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
KEY, OTHER_KEY, ADMIN = "sk-client-secret-1", "sk-client-secret-2", "adm-secret-token"


@pytest.fixture
def keyed(
    tmp_path: Path, fake: FakeBackend, serve_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> RunningProxy:
    monkeypatch.setenv("SPECPROXY_TEST_KEYS", f" {OTHER_KEY} ,")
    path = tmp_path / "routes.yaml"
    config = make_config(
        tmp_path,
        {"baseline": fake.url},
        auth={"api_keys": [KEY], "api_keys_env": "SPECPROXY_TEST_KEYS", "admin_token": ADMIN},
    )
    path.write_text(config.model_dump_json(by_alias=True).replace("**********", KEY, 1))
    running: RunningProxy = serve_proxy(config, config_path=path)
    return running


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [{}, bearer("sk-wrong"), {"Authorization": KEY}])
def test_the_api_needs_a_key(keyed: RunningProxy, headers: dict[str, str]) -> None:
    for path in (CHAT, "/v1/models"):
        answer = httpx.request(
            "POST" if path == CHAT else "GET", keyed.url + path, json=BODY, headers=headers
        )
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
        error = answer.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert keyed.log() == []  # refused before routing: "rejected" events, not request lines
    rejected = keyed.events("rejected")
    assert [(e["status"], e["error"]) for e in rejected] == [(401, "invalid_api_key")] * 2


def test_keys_from_the_file_and_the_environment_work_with_the_sdk(
    keyed: RunningProxy, fake: FakeBackend
) -> None:
    for key in (KEY, OTHER_KEY):
        with openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0) as sdk:
            answer = sdk.chat.completions.create(model="test-model", messages=BODY["messages"])  # type: ignore[arg-type]
            assert answer.choices[0].message.content
    # The key was for the proxy: the backend never sees it.
    assert all("authorization" not in seen.headers for seen in fake.requests)


def test_a_wrong_key_is_an_sdk_authentication_error(keyed: RunningProxy) -> None:
    with (
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-nope", max_retries=0) as sdk,
        pytest.raises(openai.AuthenticationError),
    ):
        sdk.chat.completions.create(model="test-model", messages=BODY["messages"])  # type: ignore[arg-type]


def test_probes_stay_open(keyed: RunningProxy) -> None:
    for path in ("/healthz", "/metrics", "/stats", "/verdict"):
        assert httpx.get(keyed.url + path).status_code == 200


def test_admin_needs_the_admin_token_not_a_client_key(keyed: RunningProxy) -> None:
    for headers in ({}, bearer(KEY), bearer("adm-wrong")):
        answer = httpx.post(keyed.url + "/admin/reload", headers=headers)
        assert answer.status_code == 401, headers
    answer = httpx.post(keyed.url + "/admin/reload", headers=bearer(ADMIN))
    assert answer.status_code == 200, answer.text


def test_no_secret_reaches_the_log(
    keyed: RunningProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    httpx.post(keyed.url + CHAT, json=BODY, headers=bearer(KEY))
    httpx.post(keyed.url + CHAT, json=BODY, headers=bearer(OTHER_KEY + "x"))
    httpx.post(keyed.url + "/admin/reload", headers=bearer(ADMIN))
    httpx.post(keyed.url + "/admin/reload", headers=bearer(ADMIN + "x"))
    keyed.wait_for_log(1)
    text = keyed.log_path.read_text() + "".join(capsys.readouterr())
    assert '"event":"request"' in text and "config_reloaded" in text and "rejected" in text
    for secret in (KEY, OTHER_KEY, ADMIN, "Bearer"):
        assert secret not in text


def test_without_an_admin_token_admin_is_loopback_only() -> None:
    keys = auth.Keys(client=(), admin=None)
    scope = {"path": "/admin/reload", "headers": [], "client": ("127.0.0.1", 5000)}
    auth.check(scope, keys)  # allowed
    with pytest.raises(ForbiddenError, match="loopback-only"):
        auth.check({**scope, "client": ("10.1.2.3", 5000)}, keys)
    with pytest.raises(ForbiddenError):
        auth.check({**scope, "client": None}, keys)
    auth.check({**scope, "client": ("::ffff:127.0.0.1", 5000)}, keys)
    auth.check({**scope, "client": ("::1", 5000)}, keys)


@pytest.mark.parametrize("path", ["/v1//chat/completions", "/V1/models", "/chat/completions", "/x"])
def test_every_path_but_the_open_ones_needs_the_key(keyed: RunningProxy, path: str) -> None:
    assert httpx.post(keyed.url + path, json=BODY).status_code == 401
    assert httpx.get(keyed.url + "/admin").status_code == 401  # the admin token, not a key


def test_keys_are_compared_in_constant_time_against_every_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = (b"k1", b"k2", b"k3")
    assert auth.matches(b"k1", keys) and calls == list(keys)  # no early exit on a match
    assert not auth.matches(None, keys) and not auth.matches(b"", (b"",))
    scope = {"path": "/v1/chat/completions", "headers": [(b"authorization", b"Basic k1")]}
    with pytest.raises(AuthenticationError):
        auth.check(scope, auth.Keys(client=keys, admin=None))


def test_an_unset_key_variable_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"auth\.admin_token_env: environment variable X_ADM"):
        auth.resolve_keys(Auth(admin_token_env="X_ADM"), {})
    keys = auth.resolve_keys(
        Auth(api_keys_env="X_K", admin_token_env="X_A"), {"X_K": "a,b", "X_A": "t"}
    )
    assert keys == auth.Keys(client=(b"a", b"b"), admin=b"t")
    assert "a" not in repr(keys).replace("admin", "").replace("Keys", "")


# --- metrics -------------------------------------------------------------------------
def scrape(proxy: RunningProxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = httpx.get(proxy.url + "/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_count_requests_and_expose_state(
    tmp_path: Path, fake: FakeBackend, fake2: FakeBackend, serve_proxy: Any
) -> None:
    proxy = serve_proxy(make_config(tmp_path, {"baseline": fake.url, "speculative": fake2.url}))
    for _ in range(3):  # tokens 50 ms apart: each in its own read, so decode speed is known
        headers = {"X-Backend": "speculative", "X-Fake": "delay=0.05"}
        httpx.post(proxy.url + CHAT, json={**BODY, "stream": True}, headers=headers)
    httpx.post(
        proxy.url + CHAT, json=BODY, headers={"X-Backend": "baseline", "X-Fake": "status=400"}
    )
    proxy.wait_for_log(4)
    samples = scrape(proxy)
    spec = (("backend", "speculative"),)
    assert (
        samples["specproxy_requests_total", (*spec, ("reason", "header"), ("status", "200"))] == 3
    )
    base = (("backend", "baseline"), ("reason", "header"), ("status", "400"))
    assert samples["specproxy_requests_total", base] == 1
    assert (
        samples[
            "specproxy_request_errors_total", (("backend", "baseline"), ("error", "backend_error"))
        ]
        == 1
    )
    assert samples["specproxy_ttft_seconds_count", (*spec, ("stream", "true"))] == 3
    assert samples["specproxy_latency_seconds_count", (*spec, ("stream", "true"))] == 3
    assert samples["specproxy_decode_tokens_per_second_count", spec] == 3
    assert samples["specproxy_queue_wait_seconds_count", spec] == 3
    assert samples["specproxy_in_flight", spec] == 0
    assert samples["specproxy_queued", spec] == 0
    assert samples["specproxy_backend_healthy", spec] == 1
    version = make_config(tmp_path, {"baseline": fake.url, "speculative": fake2.url}).version()
    assert samples["specproxy_config_info", (("config_version", version),)] == 1

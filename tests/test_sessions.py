"""The `session` field: a keyed hash of the sticky header's value, and where its key lives."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import Logging
from proxy.errors import ConfigError
from proxy.sessions import KEY_FILE, SessionHasher, session_key, session_key_from_env
from tests.conftest import RunningProxy, free_port, make_config, read_log, serve_subprocess
from tests.fakebackend import FakeBackend, wait_until

CHAT = "/v1/chat/completions"
BODY = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
ENV = "SPECPROXY_TEST_SESSION_KEY"
ENV_KEY = "k3y-that-must-never-show-up-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


def expected(key: bytes, value: str) -> str:
    """The documented definition, written out independently of `SessionHasher`."""
    return hashlib.blake2b(value.encode(), key=key, digest_size=8).hexdigest()


def sticky_proxy(serve_proxy: Any, tmp_path: Path, *urls: str, **logging: Any) -> RunningProxy:
    config = make_config(
        tmp_path,
        {name: url for name, url in zip(("baseline", "speculative"), urls, strict=False)},
        routing={"sticky_header": "X-Session-Id"},
        logging={"path": str(tmp_path / "logs" / "requests.jsonl"), "stdout": False, **logging},
    )
    proxy: RunningProxy = serve_proxy(config)
    return proxy


def test_the_line_carries_the_keyed_hash_of_the_sticky_value_never_the_value(
    fake: FakeBackend, serve_proxy: Any, tmp_path: Path
) -> None:
    """Sticky or forced, a request with the header has its session; without it, or with
    an empty one, none."""
    proxy = sticky_proxy(serve_proxy, tmp_path, fake.url)
    sent = [
        ({"X-Session-Id": "alice@example.com"}, "alice@example.com"),
        ({"X-Session-Id": "alice@example.com", "X-Backend": "baseline"}, "alice@example.com"),
        ({"X-Session-Id": "bob"}, "bob"),
        ({}, None),
        ({"X-Session-Id": ""}, None),
    ]
    for headers, _ in sent:
        assert httpx.post(proxy.url + CHAT, json=BODY, headers=headers).status_code == 200
    lines = proxy.wait_for_log(len(sent))
    key = (tmp_path / "logs" / KEY_FILE).read_bytes()
    for line, (_, value) in zip(lines, sent, strict=True):
        assert line["session"] == (expected(key, value) if value else None)
    assert [line["reason"] for line in lines[:2]] == ["sticky", "header"]
    assert lines[0]["session"] != lines[2]["session"]
    text = proxy.log_path.read_text()
    assert "alice" not in text and '"bob"' not in text


def test_the_key_file_is_made_0600_once_and_read_on_later_starts(tmp_path: Path) -> None:
    logging = Logging(path=tmp_path / "logs" / "requests.jsonl")
    first = session_key(logging, {})
    path = tmp_path / "logs" / KEY_FILE
    assert len(first) == 32 and path.read_bytes() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert session_key(logging, {}) == first  # a restart
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]  # no draft left behind
    other = Logging(path=tmp_path / "elsewhere" / "requests.jsonl")
    assert session_key(other, {}) != first  # another deployment, another key


def test_the_environment_key_wins_over_the_file(tmp_path: Path) -> None:
    logging = Logging(path=tmp_path / "requests.jsonl", session_key_env=ENV)
    assert session_key(logging, {ENV: f" {ENV_KEY}\n"}) == ENV_KEY.encode()
    assert not (tmp_path / KEY_FILE).exists()


def test_without_a_log_file_each_process_has_its_own_key() -> None:
    logging = Logging(path=None)
    assert session_key(logging, {}) != session_key(logging, {})
    assert SessionHasher()("s") != SessionHasher()("s")


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({}, f"environment variable {ENV} is not set or empty"),
        ({ENV: "  "}, f"environment variable {ENV} is not set or empty"),
        ({ENV: "x" * 65}, f"environment variable {ENV} holds 65 bytes"),
    ],
)
def test_a_missing_or_unusable_key_variable_is_a_config_error_naming_it(
    environ: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError, match="^logging.session_key_env: " + problem):
        session_key_from_env(Logging(session_key_env=ENV), environ)


def test_a_key_file_that_is_not_a_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_bytes(b"short")
    with pytest.raises(ConfigError, match=f"{tmp_path / KEY_FILE} is not a session key"):
        session_key(Logging(path=tmp_path / "requests.jsonl"), {})


def test_the_hasher_never_shows_its_key() -> None:
    assert "secret" not in repr(SessionHasher(b"secret-key-bytes"))


def _session_of(url: str, log: Path, value: str) -> str:
    """The session on the line of one request to the proxy at `url`, logging to `log`."""

    def lines() -> list[dict[str, Any]]:
        return [line for line in read_log(log) if line["event"] == "request"]

    before = len(lines())
    assert httpx.post(url + CHAT, json=BODY, headers={"X-Session-Id": value}).status_code == 200
    assert wait_until(lambda: len(lines()) == before + 1, 5)  # written after the last byte
    session = lines()[-1]["session"]
    assert isinstance(session, str)
    return session


def _routes(fake: FakeBackend, root: Path, **logging: Any) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "model": "test-model",
        "backends": {"baseline": {"url": fake.url}},
        "routing": {"sticky_header": "X-Session-Id", "split": {"baseline": 100}},
        "logging": {"path": str(root / "logs" / "requests.jsonl"), "stdout": False, **logging},
    }


def test_sessions_match_across_proxy_processes_sharing_a_key_and_differ_across_keys(
    fake: FakeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real `serve` processes: a restart reads the key file it made; two deployments with
    one key variable agree; another key gives another hash."""
    seen = []
    for run in ("a", "a", "b"):  # the first two: one deployment, restarted
        root = tmp_path / run
        root.mkdir(exist_ok=True)
        with serve_subprocess(_routes(fake, root), root, timeout=60) as served:
            seen.append(_session_of(served.url, root / "logs" / "requests.jsonl", "user-7"))
    assert seen[0] == seen[1] != seen[2]
    monkeypatch.setenv(ENV, ENV_KEY)
    shared = []
    for run in ("c", "d"):
        root = tmp_path / run
        root.mkdir()
        with serve_subprocess(_routes(fake, root, session_key_env=ENV), root, timeout=60) as s:
            shared.append(_session_of(s.url, root / "logs" / "requests.jsonl", "user-7"))
        assert not (root / "logs" / KEY_FILE).exists()
    assert shared[0] == shared[1] == expected(ENV_KEY.encode(), "user-7")
    assert len(set(seen[0::2] + shared[:1])) == 3


def test_the_key_never_reaches_the_log_stdout_or_any_endpoint(
    fake: FakeBackend,
    serve_proxy: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    for source in ("file", "env"):
        root = tmp_path / source
        if source == "env":
            monkeypatch.setenv(ENV, ENV_KEY)
        extra = {"session_key_env": ENV} if source == "env" else {}
        proxy = sticky_proxy(serve_proxy, root, fake.url, stdout=True, **extra)
        for value in ("s1", "s2"):
            httpx.post(proxy.url + CHAT, json=BODY, headers={"X-Session-Id": value})
        proxy.wait_for_log(2)
        answers = [httpx.get(proxy.url + path).text for path in ("/healthz", "/stats", "/verdict")]
        key = ENV_KEY.encode() if source == "env" else (root / "logs" / KEY_FILE).read_bytes()
        config = root / "routes.yaml"
        key_env = f", session_key_env: {ENV}" if source == "env" else ""
        config.write_text(
            f"model: m\nbackends: {{baseline: {{url: '{fake.url}'}}}}\n"
            "routing: {sticky_header: X-Session-Id, split: {baseline: 100}}\n"
            f"logging: {{path: '{root / 'logs' / 'requests.jsonl'}'{key_env}}}\n"
        )
        check = subprocess.run(
            [sys.executable, "-m", "proxy", "check", "--config", str(config)],
            capture_output=True,
            cwd=ROOT,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert check.returncode == 0, check.stderr
        captured = capfd.readouterr()
        outputs = [
            proxy.log_path.read_bytes(),
            captured.out.encode(),
            captured.err.encode(),
            check.stdout,
            check.stderr,
            *(answer.encode() for answer in answers),
        ]
        assert b'"session":"' in outputs[0] and b'"session":"' in outputs[1]  # it logged
        for output in outputs:
            for form in (key, key.hex().encode(), key.hex().upper().encode()):
                assert form not in output, source


def _check(config: Path, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**environ, "PYTHONPATH": str(ROOT)},
    )


def test_check_names_an_unset_key_variable_and_says_where_a_key_comes_from(
    tmp_path: Path,
) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text(
        "model: m\nbackends: {baseline: {url: 'http://127.0.0.1:1'}}\n"
        "routing: {sticky_header: X-Session-Id, split: {baseline: 100}}\n"
        f"logging: {{path: '{tmp_path / 'logs' / 'requests.jsonl'}', session_key_env: {ENV}}}\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != ENV}
    unset = _check(config, environ)
    assert unset.returncode == 2
    assert unset.stderr == (
        f"error: logging.session_key_env: environment variable {ENV} is not set or empty\n"
    )
    found = _check(config, {**environ, ENV: ENV_KEY})
    assert found.returncode == 0, found.stderr
    assert f"sessions logged as a keyed hash: key in ${ENV}" in found.stdout
    assert not (tmp_path / "logs").exists()  # check makes nothing

"""Hot reload (POST /admin/reload and SIGHUP) and graceful shutdown, over real sockets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import load_config
from tests.conftest import (
    Background,
    RunningProxy,
    free_port,
    make_config,
    read_log,
    refuses_connections,
    stream_lines,
)
from tests.fakebackend import FakeBackend, wait_until

CHAT = "/v1/chat/completions"
BODY = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


def routes(
    tmp_path: Path, base: FakeBackend, spec: FakeBackend, split: dict[str, Any]
) -> dict[str, Any]:
    return {
        "model": "test-model",
        "backends": {"baseline": {"url": base.url}, "speculative": {"url": spec.url}},
        "routing": {"split": split},
        "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
    }


def write(path: Path, data: dict[str, Any] | str) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))  # JSON is YAML
    return path


@pytest.fixture
def reloadable(tmp_path: Path, fake: FakeBackend, fake2: FakeBackend, serve_proxy: Any) -> Any:
    path = write(tmp_path / "routes.yaml", routes(tmp_path, fake, fake2, {"baseline": 100}))
    proxy: RunningProxy = serve_proxy(load_config(path), config_path=path)
    return proxy, path


def backends_of(proxy: RunningProxy, n: int) -> set[str]:
    return {httpx.post(proxy.url + CHAT, json=BODY).headers["x-backend"] for _ in range(n)}


def test_a_valid_file_takes_effect_for_new_requests(
    reloadable: Any, fake: FakeBackend, fake2: FakeBackend, tmp_path: Path
) -> None:
    proxy, path = reloadable
    assert backends_of(proxy, 5) == {"baseline"}
    before = proxy.log()[-1]["config_version"]
    write(path, routes(tmp_path, fake, fake2, {"speculative": 100}))
    answer = httpx.post(proxy.url + "/admin/reload")
    assert answer.status_code == 200, answer.text
    after = answer.json()["config_version"]
    assert answer.json() == {"status": "reloaded", "config_version": after, "previous": before}
    assert after != before and after == load_config(path).version()
    assert backends_of(proxy, 5) == {"speculative"}
    versions = [line["config_version"] for line in proxy.wait_for_log(10)]
    assert versions == [before] * 5 + [after] * 5
    [event] = proxy.events("config_reloaded")
    assert (event["previous"], event["config_version"], event["source"]) == (before, after, "admin")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda r: r["routing"].update(split={"baseline": 70}),
            "percentages add up to 70, not 100",
        ),
        (lambda r: r.update(listen={"port": 1}), "listen: changes need a restart"),
        (
            lambda r: r.update(logging={"path": "elsewhere.jsonl"}),
            "logging: changes need a restart",
        ),
        (  # the connection pool is built once, with its limits
            lambda r: r.update(limits={"max_connections_per_backend": 8}),
            "limits.max_connections_per_backend: changes need a restart",
        ),
        (  # and the server with its body timeout
            lambda r: r.update(limits={"body_timeout": 5}),
            "limits.body_timeout: changes need a restart",
        ),
    ],
)
def test_an_invalid_or_unappliable_file_is_rejected_and_the_old_config_kept(
    reloadable: Any,
    fake: FakeBackend,
    fake2: FakeBackend,
    tmp_path: Path,
    change: Any,
    message: str,
) -> None:
    proxy, path = reloadable
    data = routes(tmp_path, fake, fake2, {"speculative": 100})
    change(data)
    write(path, data)
    answer = httpx.post(proxy.url + "/admin/reload")
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert message in error["message"] and error["code"] == "invalid_config"
    assert backends_of(proxy, 3) == {"baseline"}  # the old split still holds
    [event] = proxy.events("config_rejected")
    assert message in event["error"]


def test_limits_outside_the_pool_still_reload(
    reloadable: Any, fake: FakeBackend, fake2: FakeBackend, tmp_path: Path
) -> None:
    proxy, path = reloadable
    data = routes(tmp_path, fake, fake2, {"baseline": 100})
    data["limits"] = {"max_body_bytes": 1024}
    write(path, data)
    assert httpx.post(proxy.url + "/admin/reload").status_code == 200
    big = {**BODY, "padding": "x" * 2000}
    assert httpx.post(proxy.url + CHAT, json=big).status_code == 413


def test_a_file_that_is_not_yaml_is_rejected(reloadable: Any) -> None:
    proxy, path = reloadable
    write(path, "model: [unclosed\n")
    answer = httpx.post(proxy.url + "/admin/reload")
    assert answer.status_code == 400 and "not valid YAML" in answer.json()["error"]["message"]
    assert backends_of(proxy, 2) == {"baseline"}


def test_reload_without_a_file_says_so(fake: FakeBackend, tmp_path: Path, serve_proxy: Any) -> None:
    proxy = serve_proxy(make_config(tmp_path, {"baseline": fake.url}))
    answer = httpx.post(proxy.url + "/admin/reload")
    assert answer.status_code == 400 and "no config file" in answer.json()["error"]["message"]


def test_reloads_under_load_fail_no_request(
    reloadable: Any, fake: FakeBackend, fake2: FakeBackend, tmp_path: Path
) -> None:
    proxy, path = reloadable
    stop = threading.Event()
    outcomes: list[tuple[int, bool]] = []

    def client() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                body = {**BODY, "stream": True}
                with http.stream(
                    "POST", proxy.url + CHAT, json=body, headers={"X-Fake": "tokens=5; delay=0.02"}
                ) as response:
                    lines = list(response.iter_lines())
                outcomes.append((response.status_code, "data: [DONE]" in lines))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    splits = [{"speculative": 100}, {"baseline": 50, "speculative": 50}, {"baseline": 100}]
    valid_versions = set()
    deadline = time.monotonic() + 20
    for i in range(12):
        if i % 4 == 3:
            write(path, "model: [broken\n")
            assert httpx.post(proxy.url + "/admin/reload").status_code == 400
        else:
            write(path, routes(tmp_path, fake, fake2, splits[i % 3]))
            answer = httpx.post(proxy.url + "/admin/reload")
            assert answer.status_code == 200
            valid_versions.add(answer.json()["config_version"])
        time.sleep(0.15)
        assert time.monotonic() < deadline
    stop.set()
    for thread in threads:
        thread.join(15)
    assert len(outcomes) > 20
    assert all(outcome == (200, True) for outcome in outcomes), outcomes
    lines = proxy.wait_for_log(len(outcomes))
    assert len(lines) == len(outcomes)
    assert all(line["status"] == 200 and line["error"] is None for line in lines)
    first = read_log(proxy.log_path)[0]["config_version"]
    seen = {line["config_version"] for line in lines}
    assert seen <= valid_versions | {first} and len(seen) >= 2


# --- the real command: SIGHUP and SIGTERM ----------------------------------------------
def start_serve(path: Path, stderr: Path) -> subprocess.Popen[bytes]:
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(path)], stderr=err
        )
    deadline = time.monotonic() + 30
    while "specproxy: serving on" not in stderr.read_text():
        assert process.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, stderr.read_text()
        time.sleep(0.05)
    return process


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(10)


def wait_for_event(log: Path, name: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not any(line["event"] == name for line in read_log(log)):
        assert time.monotonic() < deadline, f"no {name} event"
        time.sleep(0.05)


def test_sighup_reloads_the_file(fake: FakeBackend, fake2: FakeBackend, tmp_path: Path) -> None:
    data = routes(tmp_path, fake, fake2, {"baseline": 100})
    port = free_port()
    data["listen"] = {"port": port}
    path = write(tmp_path / "routes.yaml", data)
    process = start_serve(path, tmp_path / "stderr.txt")
    url = f"http://127.0.0.1:{port}"
    try:
        assert httpx.post(url + CHAT, json=BODY).headers["x-backend"] == "baseline"
        data["routing"]["split"] = {"speculative": 100}
        write(path, data)
        process.send_signal(signal.SIGHUP)
        wait_for_event(tmp_path / "requests.jsonl", "config_reloaded")
        assert httpx.post(url + CHAT, json=BODY).headers["x-backend"] == "speculative"
        write(path, "routing: [broken\n")
        process.send_signal(signal.SIGHUP)
        wait_for_event(tmp_path / "requests.jsonl", "config_rejected")
        assert httpx.post(url + CHAT, json=BODY).headers["x-backend"] == "speculative"
        assert process.poll() is None  # a bad file never stops the proxy
    finally:
        assert stop(process) == 0


def graceful(
    fake: FakeBackend, tmp_path: Path, grace: float
) -> tuple[subprocess.Popen[bytes], str]:
    data: dict[str, Any] = {
        "model": "test-model",
        "listen": {"port": free_port()},
        "backends": {"baseline": {"url": fake.url}},
        "routing": {"split": {"baseline": 100}},
        "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
        "shutdown": {"grace_seconds": grace},
    }
    process = start_serve(write(tmp_path / "routes.yaml", data), tmp_path / "stderr.txt")
    return process, f"http://127.0.0.1:{data['listen']['port']}"


def test_sigterm_lets_in_flight_streams_finish_and_refuses_new_ones(
    fake: FakeBackend, tmp_path: Path
) -> None:
    process, url = graceful(fake, tmp_path, grace=10)
    long = Background(
        lambda: stream_lines(
            url + CHAT, {**BODY, "stream": True}, {"X-Fake": "tokens=15; delay=0.1"}
        )
    )
    assert fake.wait_for(lambda: fake.requests, 5)
    time.sleep(0.3)  # mid-stream
    process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: refuses_connections(url), 5)  # no longer accepting
    with pytest.raises(httpx.ConnectError):
        httpx.post(url + CHAT, json=BODY, timeout=2)
    lines = long.join(15)
    assert process.wait(15) == 0
    assert lines[-2] == "data: [DONE]"  # the stream was finished, not cut
    [line] = [e for e in read_log(tmp_path / "requests.jsonl") if e["event"] == "request"]
    assert (line["status"], line["error"], line["completion_tokens"]) == (200, None, 15)


def test_an_answer_past_the_grace_period_is_a_503_and_logged_as_one(
    fake: FakeBackend, tmp_path: Path
) -> None:
    process, url = graceful(fake, tmp_path, grace=0.5)
    slow = {"X-Fake": "tokens=100; delay=0.1"}
    answer = Background(lambda: httpx.post(url + CHAT, json=BODY, headers=slow, timeout=15))
    assert fake.wait_for(lambda: fake.requests, 5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    response = answer.join(15)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "shutting_down"
    [line] = [e for e in read_log(tmp_path / "requests.jsonl") if e["event"] == "request"]
    assert (line["status"], line["error"]) == (503, "cancelled")
    assert response.headers["x-request-id"] == line["request_id"]
    assert response.headers["x-backend"] == "baseline"


def test_streams_past_the_grace_period_are_cut_and_still_logged(
    fake: FakeBackend, tmp_path: Path
) -> None:
    process, url = graceful(fake, tmp_path, grace=0.5)
    long = Background(
        lambda: stream_lines(
            url + CHAT, {**BODY, "stream": True}, {"X-Fake": "tokens=100; delay=0.1"}
        )
    )
    assert fake.wait_for(lambda: fake.requests, 5)
    time.sleep(0.3)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert time.monotonic() - started < 5
    try:
        lines = long.join(15)
    except httpx.HTTPError:  # cut mid-stream
        lines = []
    assert "data: [DONE]" not in lines
    [line] = [e for e in read_log(tmp_path / "requests.jsonl") if e["event"] == "request"]
    assert line["error"] == "cancelled"
    assert fake.wait_for(lambda: fake.requests[0].client_closed_at is not None, 5)

"""Launching backends: the command line, and supervision of stand-in backend programs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from proxy.accesslog import AccessLog
from proxy.config import Backend, Config, parse_config
from proxy.errors import ConfigError
from proxy.launch import LaunchError, Supervisor, build_command
from tests.conftest import free_port, read_log
from tests.fakebackend import FakeBackend

pytestmark = pytest.mark.anyio

STANDIN = str(Path(__file__).with_name("fakebackend.py"))
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def backend(launch: dict[str, Any], url: str = "http://127.0.0.1:8081") -> Backend:
    return Backend.model_validate({"url": url, "launch": launch})


def test_command_for_a_plain_mlx_server() -> None:
    command = build_command("b", backend({"model": "models/m"}), python="py")
    assert command == [
        "py",
        "-m",
        "mlx_lm.server",
        "--model",
        "models/m",
        "--host",
        "127.0.0.1",
        "--port",
        "8081",
    ]


def test_draft_flags_only_when_a_draft_is_set() -> None:
    spec = backend(
        {
            "model": "m",
            "draft_model": "d",
            "num_draft_tokens": 3,
            "extra_args": ["--max-tokens", "64"],
        }
    )
    command = build_command("s", spec, python="py")
    assert command[-6:] == ["--draft-model", "d", "--num-draft-tokens", "3", "--max-tokens", "64"]
    plain = build_command("s", backend({"model": "m", "draft_model": "d"}), python="py")
    assert "--draft-model" in plain and "--num-draft-tokens" not in plain


def test_command_form_fills_placeholders() -> None:
    spec = backend(
        {"command": ["llama-server", "--host", "{host}", "--port", "{port}", "-m", "x.gguf"]},
        url="http://127.0.0.2:9000",
    )
    assert build_command("l", spec) == [
        "llama-server",
        "--host",
        "127.0.0.2",
        "--port",
        "9000",
        "-m",
        "x.gguf",
    ]


@pytest.mark.parametrize(
    ("launch", "message"),
    [
        ({}, "needs `model` (an mlx_lm.server) or `command` (any server)"),
        ({"draft_model": "d"}, "needs `model`"),
        ({"model": "m", "command": ["x"]}, "give either `model`"),
        ({"model": "m", "num_draft_tokens": 2}, "num_draft_tokens needs a draft_model"),
        ({"command": ["x"], "draft_model": "d"}, "go with `model`, not `command`"),
        ({"model": "m", "num_draft_tokens": 0}, "num_draft_tokens: Input should be greater"),
        ({"model": "m", "startup_timout": 5}, "startup_timout: unknown key"),
    ],
)
def test_invalid_launch_blocks(launch: dict[str, Any], message: str) -> None:
    data = {
        "model": "x",
        "backends": {"b": {"url": "http://127.0.0.1:1", "launch": launch}},
        "routing": {"split": {"b": 100}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert "backends.b.launch" in str(info.value) and message in str(info.value)


def standin_config(tmp_path: Path, **backends: dict[str, Any]) -> Config:
    """A config whose backends are stand-in programs: `name={"args": [...], ...launch}`."""
    spec = {}
    for name, launch in backends.items():
        args = launch.pop("args", [])
        launch.setdefault("command", ["{python}", STANDIN, "--port", "{port}", *args])
        launch.setdefault("log", str(tmp_path / f"{name}.log"))
        spec[name] = {"url": f"http://127.0.0.1:{free_port()}", "launch": launch}
    return parse_config(
        {
            "model": "m",
            "backends": spec,
            "routing": {"split": {next(iter(spec)): 100}},
            "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
        }
    )


def supervisor_for(config: Config) -> tuple[Supervisor, AccessLog, io.StringIO]:
    log = AccessLog(config.logging.path, stdout=False)
    progress = io.StringIO()
    return Supervisor(config, log, progress=progress), log, progress


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_backends_start_in_parallel_and_are_ready_only_when_serving(tmp_path: Path) -> None:
    config = standin_config(
        tmp_path, a={"args": ["--listen-after", "3"]}, b={"args": ["--loading-503", "3"]}
    )
    supervisor, log, progress = supervisor_for(config)
    started = time.perf_counter()
    try:
        await supervisor.start()
        took = time.perf_counter() - started
        # a listens after 3 s; b at once, answering 503 "loading" for 3 s: neither is ready
        # before then, and they load side by side, not one after the other (6 s)
        assert 3 <= took < 5.5
        for (name, _), managed in supervisor.replicas.items():
            assert managed.ready
            answer = httpx.post(
                config.backends[name].url + "/v1/chat/completions", json={"messages": []}, timeout=5
            )
            assert answer.status_code == 200
        assert "a ready in" in progress.getvalue() and "b ready in" in progress.getvalue()
        events = [line["event"] for line in read_log(config.logging.path)]  # type: ignore[arg-type]
        assert events.count("backend_ready") == 2
        assert "backend_memory" in events
        status = supervisor.managed("a")[0].status()
        assert status["ready"] and status["rss_mb"] > 1
    finally:
        pids = [m.process.pid for m in supervisor.replicas.values() if m.process]
        await supervisor.stop()
        log.close()
    assert all(gone(pid) for pid in pids)


async def test_a_backend_that_never_answers_fails_with_its_log_tail(tmp_path: Path) -> None:
    config = standin_config(tmp_path, slow={"args": ["--listen-after", "30"], "startup_timeout": 3})
    supervisor, log, _ = supervisor_for(config)
    with pytest.raises(LaunchError) as info:
        await supervisor.start()
    log.close()
    message = str(info.value)
    assert "backend 'slow' did not answer within 3 s" in message
    assert "stand-in: loading" in message  # the tail of its log
    assert gone(supervisor.managed("slow")[0].process.pid)  # type: ignore[union-attr]


async def test_a_backend_that_exits_at_start_fails_at_once(tmp_path: Path) -> None:
    config = standin_config(
        tmp_path,
        broken={"command": ["{python}", "-c", "print('no such model: m'); raise SystemExit(4)"]},
    )
    supervisor, log, _ = supervisor_for(config)
    started = time.perf_counter()
    with pytest.raises(LaunchError, match=r"(?s)exited with code 4.*no such model: m"):
        await supervisor.start()
    log.close()
    assert time.perf_counter() - started < 5


async def test_one_failing_backend_stops_the_others(tmp_path: Path) -> None:
    config = standin_config(
        tmp_path,
        good={},
        bad={"command": ["{python}", "-c", "import time; time.sleep(1); raise SystemExit(1)"]},
    )
    supervisor, log, _ = supervisor_for(config)
    with pytest.raises(LaunchError):
        await supervisor.start()
    log.close()
    assert gone(supervisor.managed("good")[0].process.pid)  # type: ignore[union-attr]


async def test_a_backend_that_exits_is_restarted(tmp_path: Path) -> None:
    config = standin_config(tmp_path, flaky={})
    supervisor, log, _ = supervisor_for(config)
    try:
        await supervisor.start()
        first = supervisor.managed("flaky")[0].process.pid  # type: ignore[union-attr]
        managed = supervisor.managed("flaky")[0]
        flaky = managed.url
        assert not supervisor.loading("flaky", flaky)
        assert not supervisor.loading("not-launched", flaky)
        os.killpg(first, signal.SIGKILL)  # a crash
        deadline = time.monotonic() + 15
        seen_loading = False  # the health probes then keep it ejected
        while managed.restarts < 1 or not managed.ready:
            seen_loading |= supervisor.loading("flaky", flaky)
            assert time.monotonic() < deadline, "not restarted"
            await asyncio.sleep(0.05)
        assert seen_loading and not supervisor.loading("flaky", flaky)
        assert supervisor.managed("flaky")[0].process.pid != first  # type: ignore[union-attr]
    finally:
        await supervisor.stop()
        log.close()
    events = read_log(config.logging.path)  # type: ignore[arg-type]
    exits = [e for e in events if e["event"] == "backend_exit"]
    assert exits and exits[0]["returncode"] == -9 and exits[0]["restart_in_s"] == 1.0
    assert any(e["event"] == "backend_restarted" for e in events)


def write_routes(tmp_path: Path, config: Config, **extra: Any) -> Path:
    """routes.yaml for `python -m proxy` over the stand-in backends of `config`."""
    names = list(config.backends)
    routes = {
        "model": "m",
        "backends": {
            n: b.model_dump(mode="json", exclude_none=True) for n, b in config.backends.items()
        },
        "routing": {"split": {name: 100 / len(names) for name in names}},
        "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
        **extra,
    }
    path = tmp_path / "routes.yaml"
    path.write_text(json.dumps(routes))  # JSON is YAML
    return path


def run_proxy(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """`python -m proxy ARGS` with its stderr in a file (a pipe could fill up and block it)."""
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", "proxy", *args], cwd=ROOT, stderr=err)
    return process, stderr


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal it and wait; kill it if it does not go, so that a failing test leaks nothing."""
    process.send_signal(sig)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise


def stopped_by(log: Path) -> list[int]:
    """The parent pids the stand-ins saw when SIGTERM reached them."""
    return [
        int(line.split()[-1])
        for line in log.read_text().splitlines()
        if line.startswith("stand-in: SIGTERM, parent")
    ]


def wait_until(condition: Any, process: subprocess.Popen[bytes], stderr: Path) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert process.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, stderr.read_text()
        time.sleep(0.1)


def test_serve_launches_backends_and_stops_them_on_sigterm(tmp_path: Path) -> None:
    config = standin_config(tmp_path, baseline={}, speculative={})
    port = free_port()
    path = write_routes(tmp_path, config, listen={"port": port})
    proxy, stderr = run_proxy(tmp_path, "serve", "--config", str(path))
    try:
        wait_until(lambda: "specproxy: serving on" in stderr.read_text(), proxy, stderr)
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
        pids = [health["backends"][name]["process"]["pid"] for name in ("baseline", "speculative")]
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"messages": []},
            headers={"X-Backend": "speculative"},
            timeout=10,
        )
        assert answer.status_code == 200
    finally:
        stop_process(proxy, signal.SIGTERM)
    assert proxy.returncode == 0, stderr.read_text()
    assert all(gone(pid) for pid in pids)
    for name in ("baseline", "speculative"):  # the proxy stopped them, while still alive
        assert stopped_by(tmp_path / f"{name}.log") == [proxy.pid]


def test_backends_command_runs_only_the_backends(tmp_path: Path) -> None:
    config = standin_config(tmp_path, baseline={})
    url = config.backends["baseline"].url
    runner, stderr = run_proxy(
        tmp_path, "backends", "--config", str(write_routes(tmp_path, config))
    )
    try:
        wait_until(lambda: "backends running" in stderr.read_text(), runner, stderr)
        assert httpx.post(url + "/v1/chat/completions", json={}, timeout=5).status_code == 200
    finally:
        stop_process(runner, signal.SIGINT)
    assert runner.returncode == 0, stderr.read_text()
    assert stopped_by(tmp_path / "baseline.log") == [runner.pid]
    with pytest.raises(httpx.TransportError):
        httpx.post(url + "/v1/chat/completions", json={}, timeout=2)


def test_ctrl_c_during_startup_stops_the_loading_backends(tmp_path: Path) -> None:
    config = standin_config(tmp_path, baseline={"args": ["--listen-after", "60"]})
    path = write_routes(tmp_path, config, listen={"port": free_port()})
    proxy, stderr = run_proxy(tmp_path, "serve", "--config", str(path))
    try:
        wait_until(lambda: "stand-in: loading" in _read(tmp_path / "baseline.log"), proxy, stderr)
        child = psutil.Process(proxy.pid).children()[0]
    finally:
        stop_process(proxy, signal.SIGINT)
    assert proxy.returncode == 130
    assert "interrupted" in stderr.read_text() and "Traceback" not in stderr.read_text()
    child.wait(5)  # raises psutil.TimeoutExpired if it is still running
    assert stopped_by(tmp_path / "baseline.log") == [proxy.pid]


def test_a_taken_listen_port_fails_before_loading_anything(tmp_path: Path) -> None:
    config = standin_config(tmp_path, baseline={"args": ["--listen-after", "60"]})
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        path = write_routes(tmp_path, config, listen={"port": port})
        proxy, stderr = run_proxy(tmp_path, "serve", "--config", str(path))
        proxy.wait(30)
    assert proxy.returncode == 4
    assert f"error: cannot listen on 127.0.0.1:{port}" in stderr.read_text()
    assert not (tmp_path / "baseline.log").exists()  # no backend was started


async def test_a_backend_port_held_by_another_server_is_refused(tmp_path: Path) -> None:
    """Another server there would answer the readiness probe in the backend's place."""
    config = standin_config(tmp_path, a={})
    other = FakeBackend(port=config.backends["a"].port).start()
    supervisor, log, _ = supervisor_for(config)
    try:
        with pytest.raises(LaunchError, match=r"backend 'a': 127.0.0.1:\d+ is already in use"):
            await supervisor.start()
    finally:
        other.stop()
        log.close()
    assert supervisor.managed("a")[0].process is None


def test_no_orphan_when_the_proxy_is_killed(tmp_path: Path) -> None:
    if sys.platform != "linux":
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    config = standin_config(tmp_path, baseline={})
    runner, stderr = run_proxy(
        tmp_path, "backends", "--config", str(write_routes(tmp_path, config))
    )
    try:
        wait_until(lambda: "backends running" in stderr.read_text(), runner, stderr)
        child = psutil.Process(runner.pid).children()[0]
    finally:
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait(10)
    child.wait(10)  # raises psutil.TimeoutExpired if it outlived the proxy
    assert stopped_by(tmp_path / "baseline.log") != [runner.pid]  # Linux did it, not the proxy


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""

"""Several proxies side by side: two `python -m proxy serve` processes with the same routes
file (each in its own directory, so each writes its own log, and on its own `--port`, so
the file and its config version stay the same) take alternate requests, as behind a
round-robin load balancer. Sticky sessions land on the same backend whichever proxy takes
them, and one report reads both logs: one config version, the sample ratio checked across
both."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, read_log, serve_subprocess
from tests.fakebackend import FakeBackend

ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def backends() -> Iterator[tuple[FakeBackend, FakeBackend]]:
    pair = FakeBackend().start(), FakeBackend().start()
    yield pair
    for backend in pair:
        backend.stop()


def test_two_proxies_one_routes_file_one_report(
    tmp_path: Path, backends: tuple[FakeBackend, FakeBackend]
) -> None:
    baseline, speculative = backends
    routes = {
        "listen": {"port": free_port()},  # the first proxy's; the second one's is --port
        "model": "m",
        "backends": {"baseline": {"url": baseline.url}, "speculative": {"url": speculative.url}},
        "routing": {"split": {"baseline": 50, "speculative": 50}, "sticky_header": "X-Session"},
        "logging": {"path": "requests.jsonl", "stdout": False},  # relative: one per proxy
    }
    (tmp_path / "routes.yaml").write_text(json.dumps(routes))
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    port = free_port()
    with (
        serve_subprocess(routes, first) as a,
        serve_subprocess(routes, second, flags=("--port", str(port))),
    ):
        urls = [a.url, f"http://127.0.0.1:{port}"]
        sessions: dict[str, set[str]] = {}  # session -> the backends that answered it
        proxies: dict[str, set[int]] = {}  # session -> the proxies that took it
        with httpx.Client(timeout=10) as client:
            for i in range(240):  # alternately, as a round-robin balancer sends them
                # Every third request is sticky; each session's two go to both proxies
                # (requests 6m and 6m + 3).
                session = f"user-{i // 6 % 20}" if i % 3 == 0 else None
                headers = {"X-Session": session} if session else {}
                chat = urls[i % 2] + "/v1/chat/completions"
                answer = client.post(chat, json=BODY, headers=headers)
                assert answer.status_code == 200
                if session:
                    sessions.setdefault(session, set()).add(answer.headers["x-backend"])
                    proxies.setdefault(session, set()).add(i % 2)
    logs = [first / "requests.jsonl", second / "requests.jsonl"]
    assert [len([x for x in read_log(log) if x["event"] == "request"]) for log in logs] == [120] * 2
    # Each session was sent to both proxies: the same backend answered it every time.
    assert len(sessions) == 20 and all(taken == {0, 1} for taken in proxies.values())
    assert all(len(backends) == 1 for backends in sessions.values()), sessions
    assert set().union(*sessions.values()) == {"baseline", "speculative"}
    report = subprocess.run(
        [sys.executable, "-m", "proxy", "report", *map(str, logs), "--json", "--boot", "200",
         "--config", str(tmp_path / "routes.yaml")],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    result: dict[str, Any] = json.loads(report.stdout)
    assert result["input"]["requests"] == 240 and result["input"]["files"] == list(map(str, logs))
    assert result["config_versions"]["mixed"] is False  # same file, same version, both proxies
    check = result["sample_ratio"]
    assert sum(check["observed"].values()) == 160  # the split-routed ones, from both logs
    assert check["p_value"] is not None and check["mismatch"] is False

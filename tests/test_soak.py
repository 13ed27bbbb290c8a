"""scripts/soak.py, shortened for CI: the proxy under steady streaming load, checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"
TIMEOUT_S = 60.0


def run_soak(*args: str) -> tuple[int, str, str]:
    """Run the soak script in its own process group: (exit code, stdout, stderr). On a
    timeout, SIGTERM lets it stop the proxy and backends; SIGKILL the group if it hangs."""
    proc = subprocess.Popen(
        [sys.executable, str(SOAK), *args],
        cwd=SOAK.parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise AssertionError(f"soak did not finish within {TIMEOUT_S:g} s:\n{err}") from None
    return proc.returncode, out, err


def test_soak_short_run_passes_every_check() -> None:
    """16 clients for 12 s: no errors, one ok log line per request, RSS measured."""
    code, out, err = run_soak(
        *("--minutes", "0.2", "--clients", "16", "--warmup", "3", "--progress-every", "5"),
        "--json",
    )
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    summary: dict[str, Any] = json.loads(out)
    assert summary["ok"] is True and summary["failures"] == []
    assert summary["requests"] > 100  # 16 clients, streams of about 0.3 s, for 12 s
    assert summary["requests"] == summary["sent"]
    assert summary["errors"] == 0 and summary["error_kinds"] == {}
    assert set(summary["by_backend"]) == {"baseline", "speculative"}
    log = summary["log"]
    assert log["matched"] == summary["requests"] == log["lines"]
    assert log["missing"] == log["duplicated"] == log["extra"] == log["not_ok"] == 0
    rss = summary["rss_mb"]
    assert 10 < rss["start"] <= rss["max"] and rss["end"] <= rss["max"]
    assert abs(rss["growth"] - (rss["end"] - rss["start"])) < 0.02  # each figure is rounded
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    assert "progress:" in err and "soak: OK" in err


def test_soak_fails_with_the_reason_when_a_check_fails() -> None:
    """An RSS limit no run can meet gives exit code 1 and names the reason."""
    code, out, err = run_soak(
        *("--minutes", "0.05", "--clients", "4", "--warmup", "1"),
        "--max-rss-growth-mb=-1000",
        "--json",
    )
    assert code == 1, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    summary = json.loads(out)
    assert summary["ok"] is False and summary["errors"] == 0
    assert len(summary["failures"]) == 1 and "proxy RSS grew by" in summary["failures"][0]
    assert "soak: FAILED: proxy RSS grew by" in err

"""The report's per-replica table and its outlier flag, on synthetic logs: an arm of four
servers with one known slow machine, and one with none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy import report
from proxy.report_replicas import is_outlier
from proxy.stats import Estimate

BOOT = ["--boot", "400"]
FLEET = [f"http://10.0.0.{i}:8081" for i in range(1, 5)]


@pytest.fixture(autouse=True)
def _no_routes_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository's routes.yaml would otherwise be picked up as the expected split."""
    monkeypatch.chdir(tmp_path)


def lines(backend: str, replica: str | None, n: int, decode: float, seed: int) -> list[str]:
    """n answered streams served by `replica`, decode speed lognormal around `decode`."""
    rng = np.random.default_rng(seed)
    return [
        json.dumps(
            {
                "event": "request",
                "timestamp": "2026-01-01T00:00:00Z",
                "request_id": f"{seed}-{i}",
                "stream": True,
                "backend": backend,
                "replica": replica,
                "reason": "split",
                "status": 200,
                "ttft_ms": float(200 * rng.lognormal(0, 0.2)),
                "latency_ms": 800.0,
                "completion_tokens": 100,
                "decode_tps": float(decode * rng.lognormal(0, 0.1)),
            }
        )
        for i in range(n)
    ]


def run(tmp_path: Path, capsys: Any, speeds: list[float], *args: str) -> dict[str, Any]:
    log = lines("baseline", "http://10.0.0.9:8080", 200, 20.0, seed=99)
    for index, (url, speed) in enumerate(zip(FLEET, speeds, strict=True)):
        log += lines("speculative", url, 150, speed, seed=index)
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(log) + "\n")
    assert report.main([str(path), *BOOT, *args]) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in args else {"text": out}


def test_a_known_slow_replica_is_flagged_and_no_other(tmp_path: Path, capsys: Any) -> None:
    result = run(tmp_path, capsys, [26.0, 26.0, 19.5, 26.0], "--json")
    arm = result["replicas"]["backends"]["speculative"]
    assert list(arm) == FLEET
    assert [arm[url]["outlier"] for url in FLEET] == [False, False, True, False]
    slow = arm[FLEET[2]]
    assert slow["vs_rest"]["high"] < 1 and 0.7 < slow["vs_rest"]["value"] < 0.8
    assert slow["level"] == pytest.approx(1 - 0.05 / 4)  # Bonferroni over the 4 replicas
    assert slow["requests"] == 150 and 18 < slow["decode_tps"]["value"] < 21
    (baseline,) = result["replicas"]["backends"]["baseline"].values()
    assert baseline["vs_rest"] is None and baseline["outlier"] is False  # alone in its arm
    text = run(tmp_path, capsys, [26.0, 26.0, 19.5, 26.0])["text"]
    assert f"!! OUTLIER REPLICA: speculative {FLEET[2]}" in text
    assert "Replicas (served there, answered whole)" in text


def test_identical_replicas_are_not_flagged(tmp_path: Path, capsys: Any) -> None:
    result = run(tmp_path, capsys, [26.0] * 4, "--json")
    arm = result["replicas"]["backends"]["speculative"]
    assert [r["outlier"] for r in arm.values()] == [False] * 4
    assert all(r["vs_rest"]["low"] < 1.1 and r["vs_rest"]["high"] > 0.9 for r in arm.values())
    assert "OUTLIER REPLICA" not in run(tmp_path, capsys, [26.0] * 4)["text"]


def test_logs_without_replicas_give_no_table(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "old.jsonl"
    path.write_text("\n".join(lines("baseline", None, 20, 20.0, seed=1)) + "\n")
    assert report.main([str(path), *BOOT, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["replicas"]["backends"] == {}
    assert report.main([str(path), *BOOT]) == 0
    assert "Replicas" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("ratio", "flagged"),
    [
        (Estimate(0.75, 0.70, 0.80, 100), True),
        (Estimate(1.30, 1.20, 1.40, 100), True),
        (Estimate(0.95, 0.93, 0.97, 9000), False),  # beyond the interval, but by 5%
        (Estimate(0.70, 0.40, 1.05, 5), False),  # far off, but the interval holds 1
        (Estimate(0.70, None, None, 1), False),  # one sample: no interval
    ],
)
def test_outlier_needs_the_interval_and_the_effect(ratio: Estimate, flagged: bool) -> None:
    assert is_outlier(ratio) is flagged

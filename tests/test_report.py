"""`python -m proxy report`: synthetic logs with a known truth, read back through main()."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy import logread, report
from proxy.accesslog import AccessLog, RequestRecord
from proxy.routing import Reason

BOOT = ["--boot", "200"]  # enough for an interval, fast enough for a unit test


@pytest.fixture(autouse=True)
def _no_routes_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository's routes.yaml would otherwise be picked up as the expected split."""
    monkeypatch.chdir(tmp_path)


def request(backend: str | None, **fields: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "request_id": "r",
        "model": "m",
        "stream": True,
        "backend": backend,
        "reason": "split",
        "status": 200,
        "ttft_ms": 200.0,
        "latency_ms": 800.0,
        "prompt_tokens": 30,
        "completion_tokens": 100,
        "decode_tps": 20.0,
        "in_flight": 0,
        "error": None,
        "client_disconnected": False,
        "event": "request",
        "timestamp": "2026-11-28T16:17:08.372528Z",
    }
    line.update(fields)
    return line


def traffic(
    backend: str, n: int, *, decode: float, seed: int, **fields: Any
) -> list[dict[str, Any]]:
    """n requests whose decode speed is lognormal around `decode` tokens/s (10% spread),
    spread over an hour of timestamps."""
    rng = np.random.default_rng(seed)
    speeds = decode * rng.lognormal(0.0, 0.1, n)
    latencies = 800.0 * rng.lognormal(0.0, 0.2, n)
    return [
        request(
            backend,
            decode_tps=float(speed),
            latency_ms=float(latency),
            ttft_ms=float(latency / 4),
            timestamp=f"2026-11-28T16:{i * 60 // n:02d}:{i % 60:02d}Z",
            **fields,
        )
        for i, (speed, latency) in enumerate(zip(speeds, latencies, strict=True))
    ]


def write_log(path: Path, lines: Iterable[dict[str, Any] | str]) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text)
    return path


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert report.main([*args, "--json", *BOOT]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def ab_log(path: Path, *, speedup: float = 1.3, n: int = 200) -> Path:
    return write_log(
        path,
        traffic("baseline", n, decode=20.0, seed=1)
        + traffic("speculative", n, decode=20.0 * speedup, seed=2),
    )


def test_known_decode_speedup_reads_as_faster(tmp_path: Path, capsys: Any) -> None:
    log = ab_log(tmp_path / "ab.jsonl", speedup=1.3)
    result = run_json(capsys, str(log))
    decode = result["comparison"]["speculative"]["decode_tps"]
    assert decode["ratio"]["value"] == pytest.approx(1.3, rel=0.05)
    assert decode["ratio"]["low"] < decode["ratio"]["value"] < decode["ratio"]["high"]
    assert decode["p_value"] < 0.001
    assert "faster" in decode["verdict"]
    assert report.main([str(log), *BOOT]) == 0
    assert decode["verdict"] in capsys.readouterr().out


def test_no_difference_is_not_called_faster(tmp_path: Path, capsys: Any) -> None:
    log = ab_log(tmp_path / "ab.jsonl", speedup=1.0)
    verdict = run_json(capsys, str(log))["comparison"]["speculative"]["decode_tps"]["verdict"]
    assert "no significant difference" in verdict


def test_malformed_foreign_and_other_lines_are_counted_and_skipped(
    tmp_path: Path, capsys: Any
) -> None:
    lines: list[dict[str, Any] | str] = [
        *traffic("baseline", 10, decode=20.0, seed=1),
        '{"event": "request", "backend": "baseline", "latency_',  # cut off mid-write
        "not json at all",
        "",
        "[1, 2, 3]",
        '{"level": "info", "msg": "some other program"}',  # foreign: no event
        json.dumps({"event": "backend_memory", "backend": "baseline", "rss_mb": 252.0}),
        json.dumps({"event": "backend_memory", "backend": "baseline", "rss_mb": 253.0}),
        json.dumps({"event": "rejected", "method": "GET", "path": "/x", "status": 404}),
        *traffic("speculative", 10, decode=20.0, seed=2),
    ]
    log = write_log(tmp_path / "mixed.jsonl", lines)
    empty = write_log(tmp_path / "empty.jsonl", [])
    found = run_json(capsys, str(log), str(empty))["input"]
    assert found["requests"] == 20
    assert found["skipped"] == 4  # cut off, not JSON, an array, no event; blank: not a line
    assert found["lines"] == 27
    assert found["other_events"] == {"backend_memory": 2, "rejected": 1}
    assert found["files"] == [str(log), str(empty)]


def test_a_field_of_the_wrong_type_reads_as_missing(tmp_path: Path, capsys: Any) -> None:
    lines = [request("baseline", latency_ms=100.0), request("baseline", latency_ms="fast")]
    result = run_json(capsys, str(write_log(tmp_path / "log.jsonl", lines)))
    assert result["input"]["requests"] == 2
    assert result["backends"]["baseline"]["latency_ms"]["p50"] == {
        "value": 100.0, "low": None, "high": None, "n": 1,
    }  # fmt: skip


def test_a_timestamp_past_year_9999_reads_as_missing(tmp_path: Path, capsys: Any) -> None:
    lines = [
        request("baseline", timestamp="99999-01-01T00:00:00Z"),
        request("baseline", timestamp="9999-12-31T23:59:59.999999Z"),  # a float rounds up
        request("baseline", timestamp="2026-11-28T16:17:08Z"),
    ]
    found = run_json(capsys, str(write_log(tmp_path / "log.jsonl", lines)))["input"]
    assert (found["requests"], found["first"], found["last"]) == (
        3, "2026-11-28T16:17:08Z", "2026-11-28T16:17:08Z",
    )  # fmt: skip


def test_html_page_without_decode_speeds_draws_without_warnings(
    tmp_path: Path, capsys: Any
) -> None:
    """Non-streamed requests log no decode speed: those plots stay empty, with no warning."""
    log = write_log(tmp_path / "log.jsonl", [request("baseline", decode_tps=None)] * 6)
    page = tmp_path / "report.html"
    assert report.main([str(log), "--html", str(page), *BOOT]) == 0
    assert page.read_text().count("<svg") == 4


@pytest.mark.parametrize(
    "lines",
    [[], ["garbage", ""], [json.dumps({"event": "backend_ready", "backend": "baseline"})]],
    ids=["empty", "garbage", "other-events-only"],
)
def test_no_request_lines_exits_1(tmp_path: Path, capsys: Any, lines: list[str]) -> None:
    log = write_log(tmp_path / "log.jsonl", lines)
    assert report.main([str(log)]) == 1
    captured = capsys.readouterr()
    assert "no request lines" in captured.err
    assert captured.out == ""


def test_several_files_and_a_glob(tmp_path: Path, capsys: Any) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    write_log(logs / "proxy-1.jsonl", traffic("baseline", 7, decode=20.0, seed=1))
    write_log(logs / "proxy-2.jsonl", traffic("speculative", 5, decode=20.0, seed=2))
    other = write_log(tmp_path / "other.jsonl", traffic("baseline", 3, decode=20.0, seed=3))
    result = run_json(capsys, str(logs / "*.jsonl"), str(other))
    assert result["input"]["files"] == [
        str(logs / "proxy-1.jsonl"), str(logs / "proxy-2.jsonl"), str(other),
    ]  # fmt: skip
    assert result["backends"]["baseline"]["requests"] == 10
    assert result["backends"]["speculative"]["requests"] == 5


def test_stdin_when_no_log_or_dash(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "".join(json.dumps(line) + "\n" for line in traffic("baseline", 4, decode=20, seed=1))
    for argv in ([], ["-"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))
        result = run_json(capsys, *argv)
        assert result["input"]["requests"] == 4
        assert result["input"]["files"] == ["-"]


def test_stdin_through_a_real_pipe(tmp_path: Path) -> None:
    log = ab_log(tmp_path / "ab.jsonl", n=50)
    completed = subprocess.run(
        [sys.executable, "-c", "from proxy.report import main; raise SystemExit(main())",
         "--json", *BOOT],
        input=log.read_bytes(),
        capture_output=True,
        cwd=tmp_path,
        check=False,
        env=None,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["input"]["requests"] == 100


def test_json_schema_keys_are_pinned(tmp_path: Path, capsys: Any) -> None:
    lines = [
        *traffic("baseline", 30, decode=20.0, seed=1),
        *traffic("speculative", 30, decode=26.0, seed=2),
        request("speculative", reason="header"),
        _shadow(match=False),
    ]
    log = write_log(tmp_path / "log.jsonl", lines)
    result = run_json(capsys, str(log), "--split", "baseline=50,speculative=50")
    assert result["schema"] == 1
    assert set(result) == {
        "schema", "input", "baseline", "config_versions", "backends", "comparison", "forced",
        "breakdowns", "failover", "sample_ratio", "shadow", "replicas", "notes", "verdict",
        "cost", "memory",
    }  # fmt: skip
    assert set(result["input"]) == {
        "files", "lines", "skipped", "requests", "unrouted", "shadow", "other_events", "first",
        "last",
    }  # fmt: skip
    backend = result["backends"]["speculative"]
    assert set(backend) == {
        "requests", "errors", "error_rate", "client_disconnected", "ok", "ttft_ms",
        "latency_ms", "decode_tps", "queue_ms", "traffic",
    }  # fmt: skip
    assert set(backend["traffic"]) == {"ab", "header", "moved", "other"}
    assert set(backend["queue_ms"]) == {"n", "waited", "p50", "p95"}
    assert set(backend["ttft_ms"]) == {"p50", "p90", "p99"}
    estimate_keys = {"value", "low", "high", "n"}
    assert set(backend["ttft_ms"]["p99"]) == estimate_keys
    comparison = result["comparison"]["speculative"]
    assert set(comparison) == {"n", "n_baseline", "decode_tps", "ttft_ms", "latency_ms"}
    assert set(comparison["latency_ms"]) == {
        "ratio", "p_value", "higher_is_better", "samples_needed", "verdict", "kind", "clustered",
    }  # fmt: skip
    assert set(comparison["latency_ms"]["ratio"]) == estimate_keys
    assert set(result["forced"]["speculative"]) == {
        "requests", "ok", "median_decode_tps", "median_ttft_ms", "median_latency_ms",
    }  # fmt: skip
    assert set(result["breakdowns"]) == {
        "in_flight", "completion_tokens", "prompt_tokens", "stream",
    }  # fmt: skip
    bucket = result["breakdowns"]["in_flight"][0]
    assert set(bucket) == {"bucket", "backends", "decode_ratio"}
    like = result["breakdowns"]["prompt_tokens"][0]
    assert set(like) == {"bucket", "backends", "decode_ratio", "ratios"}
    assert set(like["ratios"]["speculative"]) == {"decode_tps", "latency_ms"}
    assert set(like["ratios"]["speculative"]["decode_tps"]) == estimate_keys
    assert set(bucket["backends"]["baseline"]) == {"n", "median_decode_tps", "median_latency_ms"}
    assert set(result["sample_ratio"]) == {
        "source", "note", "config_version", "expected_share", "observed_share", "observed",
        "unexpected", "p_value", "mismatch", "sessions",
    }  # fmt: skip
    assert set(result["sample_ratio"]["sessions"]) == set(result["sample_ratio"]) - {"sessions"}
    assert set(result["config_versions"]) == {"mixed", "selected", "requests", "versions"}
    assert set(result["config_versions"]["versions"][0]) == {
        "version", "requests", "selected", "first", "last", "split_observed", "split_share",
    }  # fmt: skip
    assert set(result["failover"]) == {"moved", "backends"}
    assert set(result["failover"]["backends"]["speculative"]) == {
        "moved_away", "moved_away_by_cause", "received", "received_by_cause",
    }  # fmt: skip
    assert set(result["shadow"][0]) == {
        "from", "to", "n", "errors", "dropped", "exact_match_rate", "similarity_p50",
        "mismatch_prefix_chars", "latency_ratio_median", "compared", "identical",
    }  # fmt: skip
    assert set(result["shadow"][0]["mismatch_prefix_chars"]) == {"p10", "p50", "p90"}


def test_html_page_is_self_contained_with_svg_plots(tmp_path: Path, capsys: Any) -> None:
    log = ab_log(tmp_path / "ab.jsonl", n=100)
    page = tmp_path / "report.html"
    assert report.main([str(log), "--html", str(page), *BOOT]) == 0
    html = page.read_text()
    assert html.count("<svg") == 5  # the forest plot, then the CDFs and timelines
    assert "<table>" in html
    assert "faster" in html  # the verdict
    assert "<script" not in html
    assert 'src="http' not in html
    assert 'href="http' not in html
    assert "Backends (all requests)" in capsys.readouterr().out  # the terminal report too


def test_sample_ratio_mismatch_trips_on_70_30_against_50_50(tmp_path: Path, capsys: Any) -> None:
    log = write_log(
        tmp_path / "log.jsonl",
        traffic("baseline", 700, decode=20.0, seed=1)
        + traffic("speculative", 300, decode=20.0, seed=2),
    )
    check = run_json(capsys, str(log), "--split", "baseline=50,speculative=50")["sample_ratio"]
    assert check["mismatch"] is True
    assert check["observed"] == {"baseline": 700, "speculative": 300}
    assert check["p_value"] < 0.001
    assert report.main([str(log), "--split", "baseline=50,speculative=50", *BOOT]) == 0
    assert "!! SAMPLE RATIO MISMATCH" in capsys.readouterr().out
    fine = run_json(capsys, str(log), "--split", "baseline=70,speculative=30")["sample_ratio"]
    assert fine["mismatch"] is False
    assert report.main([str(log), "--split", "baseline=70,speculative=30", *BOOT]) == 0
    assert "MISMATCH" not in capsys.readouterr().out


def test_sample_ratio_reads_the_config_or_routes_yaml(tmp_path: Path, capsys: Any) -> None:
    log = write_log(
        tmp_path / "log.jsonl",
        traffic("baseline", 700, decode=20.0, seed=1)
        + traffic("speculative", 300, decode=20.0, seed=2),
    )
    check = run_json(capsys, str(log))["sample_ratio"]
    assert check["source"] is None
    assert "skipped" in check["note"]
    (tmp_path / "routes.yaml").write_text(
        "model: m\nbackends:\n  baseline: {url: 'http://127.0.0.1:1'}\n"
        "  speculative: {url: 'http://127.0.0.1:2'}\n"
        "routing: {split: {baseline: 50, speculative: 50}}\n"
    )
    check = run_json(capsys, str(log))["sample_ratio"]
    assert (check["source"], check["mismatch"]) == ("routes.yaml", True)
    other = tmp_path / "seventy.yaml"
    other.write_text((tmp_path / "routes.yaml").read_text().replace("50, spec", "70, spec"))
    other.write_text(other.read_text().replace("speculative: 50}", "speculative: 30}"))
    check = run_json(capsys, str(log), "--config", str(other))["sample_ratio"]
    assert (check["source"], check["mismatch"]) == (str(other), False)


def test_header_forced_requests_stay_out_of_the_comparison(tmp_path: Path, capsys: Any) -> None:
    split = traffic("baseline", 200, decode=20.0, seed=1) + traffic(
        "speculative", 200, decode=26.0, seed=2
    )
    # A client forcing its slowest work onto the speculative backend.
    forced = traffic("speculative", 600, decode=8.0, seed=3, reason="header")
    speeds = np.array([line["decode_tps"] for line in split + forced])
    on_spec = np.array([line["backend"] == "speculative" for line in split + forced])
    pooled_ratio = np.median(speeds[on_spec]) / np.median(speeds[~on_spec])
    assert pooled_ratio < 0.8  # counting them would turn the verdict around

    result = run_json(capsys, str(write_log(tmp_path / "log.jsonl", split + forced)))
    comparison = result["comparison"]["speculative"]
    assert comparison["n"] == 200
    assert comparison["decode_tps"]["ratio"]["value"] == pytest.approx(1.3, rel=0.05)
    assert "faster" in comparison["decode_tps"]["verdict"]
    assert "slower" not in comparison["decode_tps"]["verdict"]
    assert result["forced"]["speculative"]["requests"] == 600
    assert result["forced"]["speculative"]["median_decode_tps"] == pytest.approx(8.0, rel=0.05)
    assert result["backends"]["speculative"]["requests"] == 800


def test_errors_and_disconnects_count_but_stay_out_of_the_figures(
    tmp_path: Path, capsys: Any
) -> None:
    lines = [
        *traffic("baseline", 20, decode=20.0, seed=1),
        request("baseline", status=502, error="backend_unreachable", latency_ms=1.0),
        request("baseline", status=499, client_disconnected=True, latency_ms=2.0),
        # left mid-stream: the stream had started (200), so no error, but it is cut short
        request("baseline", status=200, client_disconnected=True, latency_ms=3.0),
        request(None, reason=None, status=400, error="bad_request"),
    ]
    result = run_json(capsys, str(write_log(tmp_path / "log.jsonl", lines)))
    baseline = result["backends"]["baseline"]
    assert (baseline["requests"], baseline["errors"], baseline["ok"]) == (23, 1, 20)
    assert baseline["error_rate"] == pytest.approx(1 / 23)
    assert baseline["client_disconnected"] == 2
    assert baseline["latency_ms"]["p50"]["n"] == 20
    assert result["input"]["unrouted"] == 1
    assert set(result["backends"]) == {"baseline"}


def test_breakdowns_by_load_and_length(tmp_path: Path, capsys: Any) -> None:
    lines = []
    for in_flight, count in ((0, 10), (1, 4), (3, 6), (9, 8)):
        for backend, speed in (("baseline", 20.0), ("speculative", 30.0)):
            lines += [request(backend, in_flight=in_flight, decode_tps=speed)] * count
    lines += [request("baseline", completion_tokens=300, in_flight=None)]
    result = run_json(capsys, str(write_log(tmp_path / "log.jsonl", lines)))
    load = {row["bucket"]: row for row in result["breakdowns"]["in_flight"]}
    assert list(load) == ["0", "1", "2-3", "4+"]
    assert [load[b]["backends"]["baseline"]["n"] for b in load] == [10, 4, 6, 8]
    assert load["0"]["backends"]["speculative"]["median_decode_tps"] == 30.0
    assert load["0"]["decode_ratio"] == {"speculative": 1.5}
    assert load["1"]["decode_ratio"] == {"speculative": None}  # 4 samples: too few
    length = {row["bucket"]: row for row in result["breakdowns"]["completion_tokens"]}
    assert length["65-256"]["backends"]["baseline"]["n"] == 28
    assert length["257+"]["backends"]["baseline"]["n"] == 1


def _shadow(**fields: Any) -> dict[str, Any]:
    line = {
        "event": "shadow", "request_id": "r", "from": "baseline", "to": "speculative",
        "match": True, "common_prefix_chars": 300, "similarity": 1.0, "from_chars": 300,
        "to_chars": 300, "from_latency_ms": 1000.0, "to_latency_ms": 2000.0, "error": None,
    }  # fmt: skip
    line.update(fields)
    return line


def test_shadow_section_per_pair(tmp_path: Path, capsys: Any) -> None:
    lines = [
        request("baseline"),
        *[_shadow() for _ in range(6)],
        *[_shadow(match=False, common_prefix_chars=c, similarity=0.5) for c in (10, 20, 30, 40)],
        _shadow(error="HTTPError", to_latency_ms=None, match=None),
        {"event": "shadow_dropped", "from": "baseline", "to": "speculative", "in_flight": 1},
        _shadow(**{"from": "speculative", "to": "baseline"}, to_latency_ms=500.0),
    ]
    result = run_json(capsys, str(write_log(tmp_path / "log.jsonl", lines)))
    forward, backward = result["shadow"]
    assert (forward["from"], forward["to"]) == ("baseline", "speculative")
    assert (forward["n"], forward["errors"], forward["dropped"]) == (11, 1, 1)
    assert forward["exact_match_rate"] == pytest.approx(0.6)
    assert forward["similarity_p50"] == 1.0
    assert forward["mismatch_prefix_chars"] == {"p10": 13.0, "p50": 25.0, "p90": 37.0}
    assert forward["latency_ratio_median"] == 2.0
    assert (backward["n"], backward["latency_ratio_median"]) == (1, 0.5)


@pytest.mark.parametrize(
    "args",
    [
        ["--split", "baseline=60,speculative=50"],
        ["--split", "baseline"],
        ["--split", "a=50", "--config", "routes.yaml"],
        ["--boot", "0"],
        ["--seed", "-1"],
        ["--config", "missing.yaml"],
        ["--config-version", ","],
        ["--config-version", "0123456789ab"],  # not in the logs
        ["--no-such-flag"],
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, capsys: Any, args: list[str]) -> None:
    log = ab_log(tmp_path / "ab.jsonl", n=5)
    assert report.main([str(log), *args]) == 2
    assert capsys.readouterr().err


def test_missing_log_or_unmatched_glob_exits_2(tmp_path: Path, capsys: Any) -> None:
    assert report.main([str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert report.main([str(tmp_path / "*.jsonl")]) == 2
    assert "no file matches" in capsys.readouterr().err


def test_parse_split() -> None:
    assert report.parse_split("baseline=62.5, speculative=37.5") == {
        "baseline": 62.5, "speculative": 37.5,
    }  # fmt: skip


def test_requests_behind_a_shadow_stay_out_of_the_comparison(tmp_path: Path, capsys: Any) -> None:
    """They may have queued behind the shadow on a one-at-a-time server: not a fair sample."""
    lines = [
        *traffic("baseline", 100, decode=20.0, seed=1),
        *traffic("speculative", 100, decode=20.0, seed=2),
        *traffic("speculative", 100, decode=5.0, seed=3, behind_shadow=True),
    ]
    result = run_json(capsys, str(write_log(tmp_path / "log.jsonl", lines)))
    comparison = result["comparison"]["speculative"]
    assert comparison["n"] == 100
    assert comparison["decode_tps"]["ratio"]["value"] == pytest.approx(1.0, abs=0.05)


def test_ttft_is_compared_on_streams_only(tmp_path: Path, capsys: Any) -> None:
    """A non-stream request's TTFT is its whole answer: mixing them would hide a change."""
    lines = [
        *traffic("baseline", 60, decode=20.0, seed=1),
        *traffic("speculative", 60, decode=20.0, seed=2),
        *[request("baseline", stream=False, ttft_ms=5000.0, decode_tps=None) for _ in range(200)],
    ]
    result = run_json(capsys, str(write_log(tmp_path / "log.jsonl", lines)))
    ttft = result["comparison"]["speculative"]["ttft_ms"]
    assert ttft["ratio"]["n"] == 60
    assert ttft["ratio"]["value"] == pytest.approx(1.0, abs=0.15)


# --- failover, config versions, queueing ---------------------------------------------------

VERSION_A, VERSION_B = "a1a1a1a1a1a1", "b2b2b2b2b2b2"


def moved(
    backend: str, n: int, *, fallback_from: str | None, cause: str | None, **fields: Any
) -> list[dict[str, Any]]:
    """n requests routed to `fallback_from` and served by `backend` instead."""
    fields = {"reason": "fallback", "fallback_from": fallback_from, "fallback_cause": cause,
              **fields}  # fmt: skip
    return [request(backend, **fields) for _ in range(n)]


def table_rows(text: str, title: str) -> list[list[str]]:
    """The rows (header included) of one section of the terminal report, split on spaces."""
    lines = text.splitlines()
    start = lines.index(title) + 2  # past the underline
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    return [line.split() for line in lines[start:end] if line.startswith("  ")]


def versioned(lines: list[dict[str, Any]], version: str, hour: int) -> list[dict[str, Any]]:
    """The lines, as routed by config `version`, within `hour` of the day."""
    return [
        {**line, "config_version": version,
         "timestamp": line["timestamp"].replace("T16:", f"T{hour:02d}:")}
        for line in lines
    ]  # fmt: skip


def two_version_log(path: Path) -> Path:
    """A 50/50 split under VERSION_A (16:00-17:00), then a reload to 80/20 (VERSION_B,
    17:00-18:00): pooled, 340/160 matches neither split."""
    return write_log(path, [
        *versioned(traffic("baseline", 100, decode=20.0, seed=1), VERSION_A, 16),
        *versioned(traffic("speculative", 100, decode=26.0, seed=2), VERSION_A, 16),
        {"event": "config_reloaded", "config_version": VERSION_B, "previous": VERSION_A},
        *versioned(traffic("baseline", 240, decode=20.0, seed=3), VERSION_B, 17),
        *versioned(traffic("speculative", 60, decode=26.0, seed=4), VERSION_B, 17),
    ])  # fmt: skip


def test_fallback_requests_stay_out_of_the_comparison(tmp_path: Path, capsys: Any) -> None:
    """Moved requests went where a failure sent them: not a random sample of either arm."""
    lines = [
        *traffic("baseline", 200, decode=20.0, seed=1),
        *traffic("speculative", 200, decode=26.0, seed=2),
        # Overflow from a full speculative backend, served fast by an idle baseline: pooled,
        # the baseline would look as fast as the speculative one.
        *moved("baseline", 400, fallback_from="speculative", cause="full", decode_tps=40.0),
        # A line that names the backend it was moved from is moved, whatever its reason says.
        *moved("baseline", 50, fallback_from="speculative", cause="failed", reason="split",
               decode_tps=40.0),
    ]  # fmt: skip
    log = write_log(tmp_path / "log.jsonl", lines)
    result = run_json(capsys, str(log), "--split", "baseline=50,speculative=50")
    comparison = result["comparison"]["speculative"]
    assert (comparison["n"], comparison["n_baseline"]) == (200, 200)
    assert comparison["decode_tps"]["ratio"]["value"] == pytest.approx(1.3, rel=0.05)
    assert "faster" in comparison["decode_tps"]["verdict"]
    assert result["breakdowns"]["in_flight"][0]["backends"]["baseline"]["n"] == 200
    assert result["sample_ratio"]["observed"] == {"baseline": 200, "speculative": 200}
    assert result["backends"]["baseline"]["requests"] == 650  # served, so counted there


def test_failover_counts_by_cause(tmp_path: Path, capsys: Any) -> None:
    lines = [
        *traffic("baseline", 20, decode=20.0, seed=1),
        *traffic("speculative", 20, decode=26.0, seed=2),
        *moved("baseline", 5, fallback_from="speculative", cause="unhealthy"),
        *moved("baseline", 2, fallback_from="speculative", cause="failed"),
        *moved("baseline", 3, fallback_from="speculative", cause="full"),
        *moved("baseline", 1, fallback_from="speculative", cause=None),
        *moved("speculative", 4, fallback_from="baseline", cause="failed"),
        # All of `draft2`'s traffic moved away: it served nothing, yet it is listed.
        *moved("baseline", 6, fallback_from="draft2", cause="unhealthy"),
    ]
    log = write_log(tmp_path / "log.jsonl", lines)
    result = run_json(capsys, str(log))
    assert result["failover"] == {
        "moved": 21,
        "backends": {
            "baseline": {
                "moved_away": 4,
                "moved_away_by_cause": {"unhealthy": 0, "failed": 4, "full": 0},
                "received": 17,
                "received_by_cause": {"unhealthy": 11, "failed": 2, "full": 3, "unknown": 1},
            },
            "draft2": {
                "moved_away": 6,
                "moved_away_by_cause": {"unhealthy": 6, "failed": 0, "full": 0},
                "received": 0,
                "received_by_cause": {"unhealthy": 0, "failed": 0, "full": 0},
            },
            "speculative": {
                "moved_away": 11,
                "moved_away_by_cause": {"unhealthy": 5, "failed": 2, "full": 3, "unknown": 1},
                "received": 4,
                "received_by_cause": {"unhealthy": 0, "failed": 4, "full": 0},
            },
        },
    }
    assert set(result["backends"]) == {"baseline", "speculative"}  # draft2 served nothing
    assert report.main([str(log), *BOOT]) == 0
    table = capsys.readouterr().out
    assert "speculative: the comparison lacks its 11 requests moved away" in table
    rows = table_rows(table, "Failover (moved away from a backend, by cause)")
    assert rows[0][:7] == ["backend", "moved", "away", "unhealthy", "failed", "full", "unknown"]
    assert rows[2] == ["draft2", "6", "6", "0", "0", "0", "0"]


def test_queue_wait_percentiles_per_backend(tmp_path: Path, capsys: Any) -> None:
    """Only lines that log a wait count; a line without one is not a wait of 0."""
    lines = [
        *[request("speculative", queue_ms=float(ms)) for ms in range(101)],
        *[request("speculative", queue_ms=None) for _ in range(50)],
        *[request("baseline") for _ in range(10)],  # an older proxy: no queue_ms at all
    ]
    log = write_log(tmp_path / "log.jsonl", lines)
    backends = run_json(capsys, str(log))["backends"]
    assert backends["speculative"]["queue_ms"] == {"n": 101, "waited": 100, "p50": 50.0,
                                                    "p95": 95.0}  # fmt: skip
    assert backends["baseline"]["queue_ms"] == {"n": 0, "waited": 0, "p50": None, "p95": None}
    assert report.main([str(log), *BOOT]) == 0
    table = capsys.readouterr().out
    rows = table_rows(table, "Queue wait for a slot (ms)")
    assert rows[1:3] == [
        ["baseline", "0", "0", "-", "-"],
        ["speculative", "101", "100", "50.0", "95.0"],
    ]


def test_mixed_config_versions_note_and_skip_the_sample_ratio_check(
    tmp_path: Path, capsys: Any
) -> None:
    log = two_version_log(tmp_path / "log.jsonl")
    split = ["--split", "baseline=50,speculative=50"]
    result = run_json(capsys, str(log), *split)
    versions = result["config_versions"]
    assert (versions["mixed"], versions["selected"], versions["requests"]) == (True, None, 500)
    first, second = versions["versions"]
    assert first == {
        "version": VERSION_A, "requests": 200, "selected": True,
        "first": "2026-11-28T16:00:00Z", "last": "2026-11-28T16:59:39Z",
        "split_observed": {"baseline": 100, "speculative": 100},
        "split_share": {"baseline": 0.5, "speculative": 0.5},
    }  # fmt: skip
    assert second["version"] == VERSION_B
    assert second["split_share"] == {"baseline": 0.8, "speculative": 0.2}
    check = result["sample_ratio"]
    assert (check["mismatch"], check["p_value"], check["observed"]) == (False, None, {})
    assert "skipped" in check["note"]
    assert f"--config-version {VERSION_B}" in check["note"]
    note = result["notes"][0]
    assert note.startswith("MIXED CONFIG VERSIONS")
    assert f"{VERSION_A} (200 requests, 2026-11-28T16:00:00Z .. 2026-11-28T16:59:39Z" in note
    assert "split baseline 80.0% / speculative 20.0%" in note

    page = tmp_path / "report.html"
    assert report.main([str(log), *split, "--html", str(page), *BOOT]) == 0
    table = capsys.readouterr().out
    assert "!! MIXED CONFIG VERSIONS" in table
    assert "Config versions (request lines)" in table
    assert "SAMPLE RATIO MISMATCH" not in table
    assert '<p class="alarm">MIXED CONFIG VERSIONS' in page.read_text()


def test_config_version_option_keeps_only_those_lines(tmp_path: Path, capsys: Any) -> None:
    log = two_version_log(tmp_path / "log.jsonl")
    result = run_json(capsys, str(log), "--config-version", VERSION_B,
                      "--split", "baseline=80,speculative=20")  # fmt: skip
    versions = result["config_versions"]
    assert (versions["mixed"], versions["selected"], versions["requests"]) == (
        False, [VERSION_B], 300,
    )  # fmt: skip
    assert [v["selected"] for v in versions["versions"]] == [False, True]
    assert result["backends"]["baseline"]["requests"] == 240
    assert result["comparison"]["speculative"]["n"] == 60
    check = result["sample_ratio"]
    assert (check["config_version"], check["mismatch"]) == (VERSION_B, False)
    assert check["observed"] == {"baseline": 240, "speculative": 60}
    assert result["notes"] == []
    assert result["input"]["requests"] == 500  # the input is still all of it
    # The first version against its own split: 50/50 was delivered.
    check = run_json(capsys, str(log), "--config-version", VERSION_A,
                     "--split", "baseline=50,speculative=50")["sample_ratio"]  # fmt: skip
    assert (check["config_version"], check["mismatch"]) == (VERSION_A, False)
    # Two versions, as a list or repeated: mixed again, so no sample ratio check.
    for args in ([f"{VERSION_A},{VERSION_B}"], [VERSION_A, "--config-version", VERSION_B]):
        result = run_json(capsys, str(log), "--config-version", *args,
                          "--split", "baseline=50,speculative=50")  # fmt: skip
        assert result["config_versions"]["mixed"] is True
        assert result["config_versions"]["requests"] == 500
        assert "selected request lines" in result["sample_ratio"]["note"]


def test_old_logs_without_the_new_fields_are_one_unknown_version(
    tmp_path: Path, capsys: Any
) -> None:
    """Lines written before failover and hot reload: no moves, no waits, one version."""
    old = [
        *traffic("baseline", 60, decode=20.0, seed=1),
        *traffic("speculative", 40, decode=20.0, seed=2),
    ]
    assert not any("config_version" in line or "queue_ms" in line for line in old)
    log = write_log(tmp_path / "old.jsonl", old)
    result = run_json(capsys, str(log), "--split", "baseline=60,speculative=40")
    versions = result["config_versions"]
    assert versions["mixed"] is False
    assert [(v["version"], v["requests"]) for v in versions["versions"]] == [("unknown", 100)]
    assert result["failover"]["moved"] == 0
    assert result["backends"]["baseline"]["queue_ms"]["p50"] is None
    check = result["sample_ratio"]
    assert (check["config_version"], check["mismatch"]) == ("unknown", False)
    assert result["comparison"]["speculative"]["n"] == 40
    assert report.main([str(log), *BOOT]) == 0
    table = capsys.readouterr().out
    for absent in ("Failover", "Queue wait", "Config versions", "MIXED"):
        assert absent not in table
    kept = run_json(capsys, str(log), "--config-version", "unknown")["config_versions"]
    assert (kept["selected"], kept["requests"]) == (["unknown"], 100)

    # Appended to by an upgraded proxy: the old lines are a version of their own.
    new = versioned(traffic("baseline", 10, decode=20.0, seed=3), VERSION_A, 17)
    both = write_log(tmp_path / "both.jsonl", old + new)
    result = run_json(capsys, str(both), "--split", "baseline=60,speculative=40")
    assert [v["version"] for v in result["config_versions"]["versions"]] == [
        "unknown", VERSION_A,
    ]  # fmt: skip
    assert result["config_versions"]["mixed"] is True
    assert result["sample_ratio"]["p_value"] is None


def test_the_baseline_comes_from_the_config_unless_given(tmp_path: Path, capsys: Any) -> None:
    log = write_log(
        tmp_path / "log.jsonl",
        traffic("ref", 100, decode=20.0, seed=1) + traffic("draft", 100, decode=26.0, seed=2),
    )
    config = tmp_path / "routes.yaml"
    config.write_text(
        "model: m\nbackends:\n  draft: {url: 'http://127.0.0.1:1'}\n"
        "  ref: {url: 'http://127.0.0.1:2'}\n"
        "routing: {baseline: ref, split: {draft: 50, ref: 50}}\n"
    )
    result = run_json(capsys, str(log), "--config", str(config))
    assert result["baseline"] == "ref" and list(result["comparison"]) == ["draft"]
    forced = run_json(capsys, str(log), "--config", str(config), "--baseline", "draft")
    assert forced["baseline"] == "draft" and list(forced["comparison"]) == ["ref"]
    assert run_json(capsys, str(log), "--split", "ref=50,draft=50")["baseline"] == "baseline"


# --- the log schema: one definition ------------------------------------------------------------


def test_the_reader_reads_every_field_of_the_request_record(tmp_path: Path) -> None:
    """The request line's schema is `RequestRecord`: the line written has its fields (and
    event, timestamp), and the reader reads each of them, as the type the record gives."""
    names = [field.name for field in dataclasses.fields(RequestRecord)]
    log = AccessLog(tmp_path / "log.jsonl", stdout=False)
    log.bind(config_version="v1")
    log.request(RequestRecord("r", "v1", reason=Reason.SPLIT, status=200, latency_ms=1.5))
    log.close()
    [line] = [json.loads(text) for text in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert set(line) == {"event", "timestamp", *names}
    expected = {bool: "BOOLEAN", int: "DOUBLE", float: "DOUBLE", str: "VARCHAR"}
    hints = typing.get_type_hints(RequestRecord)
    for name in names:
        [kind] = [k for k in typing.get_args(hints[name]) or (hints[name],) if k is not type(None)]
        base = next(base for base in (bool, int, float, str) if issubclass(kind, base))
        column = logread._FIELDS[name]
        assert column == expected[base] or (name == "error" and column == "JSON"), name


def test_which_reasons_make_ab_data_is_the_enums_to_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report's A/B selection asks `Reason.is_experiment`: a reason it calls A/B data
    is compared, whatever the SQL knew of reasons (a new one does not silently drop out)."""
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(request("b", reason=r)) + "\n" for r in Reason))
    experiment = [reason.is_experiment for reason in Reason]
    assert logread.read_logs([str(path)]).requests.comparable.tolist() == experiment
    monkeypatch.setattr(Reason, "is_experiment", property(lambda r: r is Reason.HEADER))
    header_only = [reason is Reason.HEADER for reason in Reason]
    assert logread.read_logs([str(path)]).requests.comparable.tolist() == header_only

"""The report's answer: the always-valid verdict fed from the log, sessions, the cost line,
the like-for-like breakdowns, and a page that leads with the cards.

Seeded simulations with a known truth, sized to run in seconds. The always-valid
statistics themselves are tested in tests/test_sequential.py; here, that the report feeds
them what `ArmState.observe` would be fed, and that the truths survive the trip through
the log.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy import itt, logread, report, report_verdict, sequential
from proxy.routing import Reason
from proxy.sequential import ArmState, Metric, Observation, Primary
from tests.test_report import BOOT, request, run_json, write_log

T0 = 1_795_880_000.0  # 2026-11-28T...


@pytest.fixture(autouse=True)
def _no_routes_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository's routes.yaml would otherwise be picked up as the expected split."""
    monkeypatch.chdir(tmp_path)


def stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def sticky_traffic(
    rng: np.random.Generator,
    *,
    sessions: dict[str, int],
    per_session: int | dict[str, int],
    speedup: float = 1.0,
    session_sd: float = 0.5,
    within_sd: float = 0.3,
) -> list[dict[str, Any]]:
    """Sticky requests: each session lives on one backend, with its own speed (log-sd
    `session_sd`) around 20 tokens/s (times `speedup` on `speculative`); requests are
    interleaved in time across sessions; a fifth are not streams; 2% are errors."""
    lines = []
    code = 0
    for backend, count in sessions.items():
        factor = speedup if backend == "speculative" else 1.0
        n = per_session if isinstance(per_session, int) else per_session[backend]
        for _ in range(count):
            code += 1
            level = rng.normal(0.0, session_sd)
            for _ in range(n):
                noise = level + rng.normal(0.0, within_sd)
                stream = bool(rng.random() < 0.8)
                error = bool(rng.random() < 0.02)
                latency = 800.0 * math.exp(noise) / factor
                lines.append(request(
                    backend, reason="sticky", session=f"{code:016x}", stream=stream,
                    decode_tps=None if error or not stream else 20.0 * factor * math.exp(-noise),
                    latency_ms=None if error else latency,
                    ttft_ms=None if error else (latency / 5 if stream else latency),
                    status=502 if error else 200, error="backend_error" if error else None,
                    prompt_tokens=int(rng.integers(5, 2000)),
                    timestamp=stamp(T0 + rng.uniform(0, 3600)),
                ))  # fmt: skip
    return lines


def memory_lines(backend: str, mb: float, count: int) -> list[dict[str, Any]]:
    return [
        {"event": "backend_memory", "backend": backend, "rss_mb": mb + (i % 3) - 1,
         "timestamp": stamp(T0 + 10 * i)}
        for i in range(count)
    ]  # fmt: skip


def shadow_lines(identical: int, different: int) -> list[dict[str, Any]]:
    return [
        {"event": "shadow", "from": "baseline", "to": "speculative", "match": i < identical,
         "similarity": 1.0 if i < identical else 0.9, "common_prefix_chars": 40,
         "from_latency_ms": 800.0, "to_latency_ms": 700.0, "error": None,
         "timestamp": stamp(T0)}
        for i in range(identical + different)
    ]  # fmt: skip


# --- feeding sequential ----------------------------------------------------------------------


def assigned_per_line(req: logread.Requests, i: int) -> tuple[str, itt.Outcome] | None:
    """`itt.assigned` on line i, as `LiveVerdict.observe` calls it."""
    moved_from = int(req.fallback_from[i])
    reason = next((r for r in Reason if r is not Reason.FALLBACK and getattr(req, r.value)[i]),
                  Reason.FALLBACK if req.moved[i] else None)  # fmt: skip
    return itt.assigned(
        reason,
        req.names[req.backend[i]] if req.backend[i] >= 0 else None,
        req.names[moved_from] if moved_from >= 0 else None,
        error=req.errors[req.error_kind[i]] if req.error_kind[i] >= 0 else None,
        status=int(req.status[i]) if math.isfinite(req.status[i]) else None,
        client_disconnected=bool(req.client_disconnected[i]),
        behind_shadow=bool(req.behind_shadow[i]),
    )


@pytest.mark.parametrize(
    "lines",
    [
        # one backend and one kind of error: digits of radix 2 in the packed key
        [request("baseline"), request("baseline", error="cancelled"),
         request("baseline", status=499, client_disconnected=True), request(None, status=400)],
        [request("baseline", reason=reason, status=status, error=error, behind_shadow=shadow,
                 client_disconnected=left)
         for reason in ("split", "sticky", "header")
         for status, error in ((200, None), (502, "backend_error"), (None, "cancelled"),
                               (200, "client_write_timeout"), (404, "backend_error"))
         for shadow in (False, True) for left in (False, True)]
        + [request("speculative", reason="fallback", fallback_from="baseline",
                   fallback_cause=cause) for cause in ("failed", "full", None)],
    ],
)  # fmt: skip
def test_the_packed_assignment_is_the_rule_on_every_line(
    tmp_path: Path, lines: list[dict[str, Any]]
) -> None:
    req = logread.load_logs([str(write_log(tmp_path / "log.jsonl", lines))]).requests
    arm, failed, answered = report_verdict.assignment(req)
    for i in range(len(lines)):
        expected = assigned_per_line(req, i)
        got = None if arm[i] < 0 else (req.names[arm[i]], failed[i], answered[i])
        want = expected and (expected[0], expected[1] is itt.Outcome.FAILED,
                             expected[1] is itt.Outcome.ANSWERED)  # fmt: skip
        assert got == want, (i, lines[i])


def observed_states(req: logread.Requests, names: list[str]) -> dict[str, ArmState]:
    """What the live proxy would hold: `itt.assigned` then `ArmState.observe` per request,
    in time order, as `LiveVerdict.observe` does."""
    rows: dict[str, list[tuple[float, int, bool]]] = {name: [] for name in names}
    for i in range(req.backend.size):
        counted = assigned_per_line(req, i)
        if counted is not None and counted[0] in rows:
            rows[counted[0]].append((req.timestamp[i], i, counted[1] is itt.Outcome.FAILED))
    states = {}
    for name in names:
        state = ArmState()
        for _, i, error in sorted(rows[name], key=lambda row: row[0]):

            def value(metric: str, i: int = i, answered: bool = not error) -> float | None:
                x = float(getattr(req, metric)[i])
                return x if answered and math.isfinite(x) else None

            state.observe(Observation(
                error=error, decode_tps=value("decode_tps"),
                ttft_ms=value("ttft_ms") if req.stream[i] else None,
                latency_ms=value("latency_ms"),
                session=None if req.session[i] < 0 else str(req.session[i]),
            ))  # fmt: skip
        states[name] = state
    return states


def test_vectorised_feed_equals_observing_each_request(tmp_path: Path) -> None:
    """The report's numpy feed leaves the same moments, counts and verdict as observing
    every request in time order, with sessions, split requests, errors and non-streams."""
    rng = np.random.default_rng(3)
    lines = sticky_traffic(rng, sessions={"baseline": 15, "speculative": 15}, per_session=8)
    lines += [request("baseline", decode_tps=float(x)) for x in rng.lognormal(3, 0.2, 30)]
    lines += [request("speculative", decode_tps=float(x)) for x in rng.lognormal(3.2, 0.2, 30)]
    lines += [request("speculative", reason="header"), request("baseline", behind_shadow=True)]
    lines += [  # moved, and what the client or a shutdown did: by intention to treat
        request("baseline", reason="fallback", fallback_from="speculative",
                fallback_cause=cause, session=session)
        for cause in ("failed", "unhealthy", "full") for session in (None, "00000000000000aa")
    ] + [
        request("speculative", error="client_write_timeout", client_disconnected=True),
        request("speculative", error="cancelled", status=None),
        request("baseline", error="stream_interrupted", client_disconnected=True),
        request("baseline", status=499, client_disconnected=True),
    ]  # fmt: skip
    req = logread.load_logs([str(write_log(tmp_path / "log.jsonl", lines))]).requests
    names = ["baseline", "speculative"]
    fast, slow = report_verdict.arm_states(req, names), observed_states(req, names)
    for name in names:
        assert (fast[name].requests, fast[name].split_requests, fast[name].sessions) == (
            slow[name].requests, slow[name].split_requests, slow[name].sessions,
        )  # fmt: skip
        for metric in Metric:
            a, b = fast[name].moments(metric), slow[name].moments(metric)
            assert (a.n, a.units, a.clustered) == (b.n, b.units, b.clustered)
            assert a.mean == pytest.approx(b.mean, rel=1e-12, abs=1e-12)
            assert a.variance == pytest.approx(b.variance, rel=1e-9)
    assert fast["speculative"].sessions == 16 and fast["speculative"].split_requests == 33
    for a, b in zip(verdict_intervals(fast), verdict_intervals(slow), strict=True):
        assert a[0] == b[0]  # the outcome
        assert a[1:] == pytest.approx(b[1:], rel=1e-9)


def verdict_intervals(states: dict[str, ArmState]) -> list[tuple[Any, ...]]:
    arm = sequential.decide(states, "baseline").arms["speculative"]
    return [
        (outcome, i.value, i.low, i.high, i.n, i.units)
        for outcome, i in [(arm.primary.outcome, arm.primary.interval)]
        + [(g.outcome, g.interval) for g in arm.guardrails.values()]
    ]


def requests_of(
    backend: np.ndarray, session: np.ndarray, decode: np.ndarray, timestamp: np.ndarray
) -> logread.Requests:
    """Sticky, answered, streamed requests straight into the reader's arrays."""
    n = backend.size
    true, false, nan = np.ones(n, bool), np.zeros(n, bool), np.full(n, np.nan)
    return logread.Requests(
        names=("baseline", "speculative"), causes=(), versions=("unknown",), errors=(),
        backend=backend.astype(np.int32), split=false, sticky=true, header=false,
        moved=false, experiment=true, fallback_from=np.full(n, -1, np.int32),
        fallback_cause=np.full(n, -1, np.int32), config_version=np.zeros(n, np.int32),
        status=np.full(n, 200.0), error=false, error_kind=np.full(n, -1, np.int32),
        client_disconnected=false, stream=true,
        behind_shadow=false, ttft_ms=200.0 / decode, latency_ms=8000.0 / decode,
        decode_tps=decode, prompt_tokens=nan, completion_tokens=nan, in_flight=nan,
        queue_ms=nan, timestamp=timestamp, session=session.astype(np.int32),
        replica=np.full(n, -1, np.int32), replicas=(),
    )  # fmt: skip


def test_peeking_at_an_a_a_log_with_sessions_rarely_calls_a_difference() -> None:
    """40 sessions of 20 requests an arm (per-session log-sd 0.5), the report's verdict
    read after every 40 requests: called better or worse (or a guardrail harm) in at most
    about 5% of 120 seeded runs. The control, the same data with the sessions dropped (as
    if requests were independent), calls one far more often: the check can fail."""
    runs, sessions, per = 120, 40, 20
    called = {"sessions": 0, "no sessions": 0}
    rng = np.random.default_rng(11)
    for _ in range(runs):
        n = 2 * sessions * per
        session = np.repeat(np.arange(2 * sessions), per)
        backend = (session >= sessions).astype(np.int32)
        level = rng.normal(0.0, 0.5, 2 * sessions)[session]
        decode = 20.0 * np.exp(level + rng.normal(0.0, 0.3, n))
        timestamp = rng.permutation(n).astype(np.float64)
        for kind, codes in (("sessions", session), ("no sessions", np.full(n, -1))):
            req = requests_of(backend, codes, decode, timestamp)
            for look in range(80, n + 1, 80):
                states = report_verdict.arm_states(req.where(timestamp < look), req.names)
                verdict = report_verdict.decide(
                    states, "baseline", alpha=0.05, primary="decode_tps", margin=0.0
                )
                assert verdict is not None
                arm = verdict.arms["speculative"]
                if arm.primary.outcome in (Primary.BETTER, Primary.WORSE) or arm.harm:
                    called[kind] += 1
                    break
    assert called["sessions"] / runs <= 0.06, called
    assert called["no sessions"] / runs >= 0.25, called


# --- end to end --------------------------------------------------------------------------------


def sticky_log(tmp_path: Path, speedup: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    lines = sticky_traffic(
        rng, sessions={"baseline": 60, "speculative": 60}, per_session=10, speedup=speedup,
        session_sd=0.3,
    )  # fmt: skip
    return write_log(tmp_path / f"log-{seed}.jsonl", lines)


def test_an_arm_failing_40_percent_retried_on_the_baseline_shows_harm_in_the_report(
    tmp_path: Path, capsys: Any
) -> None:
    """Review finding 4, in the report: the moved requests are the arm's errors."""
    rng = np.random.default_rng(4)
    lines = []
    for i in range(2000):
        at = {"timestamp": stamp(T0 + i)}
        if rng.random() < 0.5:
            lines.append(request("baseline", **at))
        elif rng.random() < 0.4:
            lines.append(request("baseline", reason="fallback", fallback_from="speculative",
                                 fallback_cause="failed", **at))  # fmt: skip
        else:
            lines.append(request("speculative", **at))
    result = run_json(capsys, str(write_log(tmp_path / "log.jsonl", lines)))
    arm = result["verdict"]["result"]["arms"]["speculative"]
    assert arm["guardrails"]["error_rate"]["verdict"] == "harm" and arm["harm"]
    assert 0.35 < arm["guardrails"]["error_rate"]["ratio"] < 0.45  # the difference of rates
    assert result["cost"]["speculative"]["guardrail_harm"] == ["error_rate"]


def test_an_arm_that_failed_everything_it_was_assigned_still_gets_its_verdict(
    tmp_path: Path, capsys: Any
) -> None:
    """It served nothing: its requests are all lines moved from it. No verdict would hide
    the worst arm there is."""
    lines = [request("baseline") for _ in range(40)]
    lines += [request("baseline", reason="fallback", fallback_from="speculative",
                      fallback_cause="unhealthy") for _ in range(40)]  # fmt: skip
    result = run_json(capsys, str(write_log(tmp_path / "log.jsonl", lines)))
    arm = result["verdict"]["result"]["arms"]["speculative"]
    assert arm["guardrails"]["error_rate"]["verdict"] == "harm"
    assert arm["primary"]["verdict"] == "inconclusive"  # no answer, so no speed


def test_what_the_client_or_a_shutdown_did_is_not_an_arms_error_in_the_report(
    tmp_path: Path, capsys: Any
) -> None:
    """Review finding 5, in the report: 40 answers an arm, then 40 of the speculative
    arm's clients stop reading or are cut at shutdown: its error rate stays 0."""
    lines = [request(name) for name in ("baseline", "speculative") for _ in range(40)]
    lines += [request("speculative", error="client_write_timeout", client_disconnected=True)
              for _ in range(20)]  # fmt: skip
    lines += [request("speculative", error="cancelled") for _ in range(20)]
    result = run_json(capsys, str(write_log(tmp_path / "log.jsonl", lines)))
    rate = result["verdict"]["result"]["arms"]["speculative"]["guardrails"]["error_rate"]
    assert (rate["n"], rate["ratio"]) == (40, 0.0)


def test_a_1_3x_log_reads_better_and_an_a_a_log_does_not(tmp_path: Path, capsys: Any) -> None:
    faster = run_json(capsys, str(sticky_log(tmp_path, 1.3, seed=1)))["verdict"]
    same = run_json(capsys, str(sticky_log(tmp_path, 1.0, seed=2)))["verdict"]
    arm = faster["result"]["arms"]["speculative"]
    assert arm["primary"]["verdict"] == "better"
    assert 1.05 < arm["primary"]["low"] < 1.3 < arm["primary"]["high"] < 1.6
    assert arm["primary"]["units"] == 60 and arm["primary"]["clustered"] is True
    assert arm["guardrails"]["latency_ms"]["verdict"] == "no_harm_detected"
    aa = same["result"]["arms"]["speculative"]
    assert aa["primary"]["verdict"] in ("inconclusive", "not_worse")
    assert not aa["harm"]


def test_primary_margin_and_alpha_options(tmp_path: Path, capsys: Any) -> None:
    log = str(sticky_log(tmp_path, 1.3, seed=1))
    result = run_json(capsys, log, "--primary", "latency_ms", "--alpha", "0.1", "--margin", "0")
    verdict = result["verdict"]
    assert (verdict["alpha"], verdict["margin"]) == (0.1, 0.0)
    arm = verdict["result"]["arms"]["speculative"]
    assert arm["primary"]["metric"] == "latency_ms" and arm["primary"]["alpha"] == 0.05
    assert set(arm["guardrails"]) == {"ttft_ms", "error_rate"}  # the others but decode
    assert "latency" in result["cost"]["speculative"]["line"]


@pytest.mark.parametrize(
    "args", [["--primary", "error_rate"], ["--alpha", "0"], ["--alpha", "x"], ["--margin", "1"]]
)
def test_bad_verdict_options_exit_2(tmp_path: Path, capsys: Any, args: list[str]) -> None:
    log = write_log(tmp_path / "log.jsonl", [request("baseline")])
    assert report.main([str(log), *args]) == 2
    assert args[0] in capsys.readouterr().err


def test_the_cost_line_from_memory_and_shadow_lines(tmp_path: Path, capsys: Any) -> None:
    """Known memory (250 and 378 MB) and shadow checks (204 of 212 identical) give the
    line's numbers, and the terminal report opens with it."""
    lines = sticky_traffic(
        np.random.default_rng(5), sessions={"baseline": 30, "speculative": 30},
        per_session=10, speedup=1.4,
    )  # fmt: skip
    lines += memory_lines("baseline", 250.0, 30) + memory_lines("speculative", 378.0, 30)
    lines += shadow_lines(204, 8)
    log = str(write_log(tmp_path / "log.jsonl", lines))
    result = run_json(capsys, log)
    memory = result["memory"]
    assert memory["baseline"] == {
        "readings": 30, "median_mb": 250.0, "max_mb": 251.0,
        "first": stamp(T0), "last": stamp(T0 + 290),
    }  # fmt: skip
    cost = result["cost"]["speculative"]
    assert cost["memory_extra_mb"] == 128.0
    assert cost["memory_extra_share"] == pytest.approx(128 / 250)
    assert (cost["shadow_identical"], cost["shadow_checks"]) == (204, 212)
    line = cost["line"]
    assert line.startswith("speculative: decode 1.4")
    assert "x faster (97.5% CI " in line
    assert line.endswith("+128 MB resident (+51%), outputs identical in 204 of 212 shadow checks")
    assert report.main([log, *BOOT]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[2].startswith("The answer") and text[4] == f"  {line}"


def test_no_memory_or_shadow_lines_say_so(tmp_path: Path, capsys: Any) -> None:
    line = run_json(capsys, str(sticky_log(tmp_path, 1.3, seed=1)))["cost"]["speculative"]["line"]
    assert "memory not logged" in line and "outputs not compared (no shadow checks)" in line


# --- sample ratio by sessions ------------------------------------------------------------------


def srm(tmp_path: Path, capsys: Any, sessions: dict[str, int], per: dict[str, int]) -> Any:
    rng = np.random.default_rng(9)
    lines = sticky_traffic(rng, sessions=sessions, per_session=per)
    log = str(write_log(tmp_path / "log.jsonl", lines))
    return run_json(capsys, log, "--split", "baseline=50,speculative=50")["sample_ratio"]


def test_sticky_sessions_36_against_9_is_a_mismatch_even_with_equal_requests(
    tmp_path: Path, capsys: Any
) -> None:
    """36 sessions of 10 requests against 9 of 40: 360 requests each, but sessions are what
    sticky routing assigns, and 36/9 against 50/50 is far off."""
    check = srm(tmp_path, capsys, {"baseline": 36, "speculative": 9},
                {"baseline": 10, "speculative": 40})  # fmt: skip
    assert check["sessions"]["observed"] == {"baseline": 36, "speculative": 9}
    assert check["sessions"]["mismatch"] is True and check["mismatch"] is True
    assert check["note"] == "no split-routed requests: skipped"


def test_balanced_sessions_with_uneven_requests_are_no_mismatch(
    tmp_path: Path, capsys: Any
) -> None:
    """20 and 20 sessions, 36 and 9 requests each (720 against 180): no mismatch."""
    check = srm(tmp_path, capsys, {"baseline": 20, "speculative": 20},
                {"baseline": 36, "speculative": 9})  # fmt: skip
    assert check["sessions"]["observed"] == {"baseline": 20, "speculative": 20}
    assert check["sessions"]["mismatch"] is False and check["mismatch"] is False


# --- like for like, per backend ------------------------------------------------------------------


def test_like_for_like_buckets_have_ratios_with_intervals(tmp_path: Path, capsys: Any) -> None:
    """Short prompts 1.5x faster, long ones no faster: each prompt bucket's interval says
    so; `stream` buckets split streams from the rest."""
    lines = []
    rng = np.random.default_rng(4)
    for backend, short in (("baseline", 20.0), ("speculative", 30.0)):
        for i in range(120):
            long = i % 2 == 0
            lines.append(request(
                backend, prompt_tokens=2000 if long else 30, stream=i % 3 != 0,
                decode_tps=float((20.0 if long else short) * rng.lognormal(0, 0.1)),
            ))  # fmt: skip
    result = run_json(capsys, str(write_log(tmp_path / "log.jsonl", lines)))
    buckets = {b["bucket"]: b for b in result["breakdowns"]["prompt_tokens"]}
    short_ratio = buckets["1-64"]["ratios"]["speculative"]["decode_tps"]
    long_ratio = buckets["1025+"]["ratios"]["speculative"]["decode_tps"]
    assert 1.3 < short_ratio["low"] < 1.5 < short_ratio["high"] < 1.7
    assert long_ratio["low"] < 1.0 < long_ratio["high"]
    assert buckets["65-256"]["ratios"]["speculative"]["decode_tps"] is None  # empty
    streams = {b["bucket"]: b for b in result["breakdowns"]["stream"]}
    assert streams["stream"]["backends"]["baseline"]["n"] == 80
    assert "ratios" not in result["breakdowns"]["in_flight"][0]  # descriptive only


def test_per_backend_ttft_counts_streams_only(tmp_path: Path, capsys: Any) -> None:
    """A non-stream answer's TTFT is the whole answer: it stays out of the TTFT table."""
    lines = [request("baseline", ttft_ms=200.0) for _ in range(20)]
    lines += [request("baseline", stream=False, ttft_ms=5000.0) for _ in range(30)]
    ttft = run_json(capsys, str(write_log(tmp_path / "log.jsonl", lines)))["backends"]
    assert ttft["baseline"]["ttft_ms"]["p90"]["value"] == 200.0
    assert ttft["baseline"]["ttft_ms"]["p50"]["n"] == 20


def test_per_backend_traffic_kinds_are_counted(tmp_path: Path, capsys: Any) -> None:
    lines = [request("baseline"), request("baseline", reason="header"),
             request("baseline", reason="fallback", fallback_from="speculative")]  # fmt: skip
    traffic = run_json(capsys, str(write_log(tmp_path / "log.jsonl", lines)))["backends"]
    assert traffic["baseline"]["traffic"] == {"ab": 1, "header": 1, "moved": 1, "other": 0}


# --- the page -----------------------------------------------------------------------------------


def test_the_page_opens_with_one_card_per_arm_then_the_forest_plot(
    tmp_path: Path, capsys: Any
) -> None:
    rng = np.random.default_rng(2)
    lines = sticky_traffic(rng, sessions={"baseline": 20, "speculative": 20, "other": 20},
                           per_session=6, speedup=1.3)  # fmt: skip
    log = write_log(tmp_path / "log.jsonl", lines + memory_lines("baseline", 250.0, 5))
    page = tmp_path / "report.html"
    assert report.main([str(log), "--html", str(page), *BOOT]) == 0
    capsys.readouterr()
    html = page.read_text()
    body = html[html.index("<body>") :]
    cards = [m.start() for m in re.finditer(r'<section class="card (good|bad|wait)"><h2>', body)]
    assert len(cards) == 2 and body.index("<h2>other</h2>") < body.index("<h2>speculative</h2>")
    forest = body.index('<figure class="forest">')
    assert body.index("<h1>") < min(cards) and max(cards) < forest < body.index("<table")
    assert forest < body.index("Details") < body.index("Latency, CDF")
    assert html.count("<svg") == 5
    assert "<script" not in html


def test_verdict_json_shape_is_pinned(tmp_path: Path, capsys: Any) -> None:
    result = run_json(capsys, str(sticky_log(tmp_path, 1.3, seed=1)))
    assert set(result["verdict"]) == {"kind", "alpha", "margin", "result"}
    body = result["verdict"]["result"]
    assert set(body) == {"baseline", "alpha", "primary", "arms"}
    arm = body["arms"]["speculative"]
    assert set(arm) == {"primary", "guardrails", "harm"}
    keys = {
        "metric", "verdict", "ratio", "low", "high", "alpha", "p_value", "n", "n_baseline",
        "units", "units_baseline", "clustered", "unit",
    }  # fmt: skip
    assert set(arm["primary"]) == keys | {"margin"}
    assert set(arm["guardrails"]) == {"ttft_ms", "latency_ms", "error_rate"}
    assert all(set(g) == keys for g in arm["guardrails"].values())
    assert arm["guardrails"]["error_rate"]["unit"] == "difference"
    assert set(result["cost"]["speculative"]) == {
        "primary", "memory_mb", "memory_extra_mb", "memory_extra_share", "shadow_checks",
        "shadow_identical", "guardrail_harm", "line",
    }  # fmt: skip
    assert result["comparison"]["speculative"]["decode_tps"]["kind"] == (
        "fixed-horizon (valid at one look)"
    )
    assert json.loads(json.dumps(result)) == result


def test_a_log_without_a_b_traffic_gives_no_verdict(tmp_path: Path, capsys: Any) -> None:
    log = write_log(tmp_path / "log.jsonl", [request("baseline", reason="header")])
    result = run_json(capsys, str(log))
    assert result["verdict"]["result"] is None and result["cost"] == {}
    assert report.main([str(log), *BOOT]) == 0
    assert "no verdict: the baseline 'baseline'" in capsys.readouterr().out

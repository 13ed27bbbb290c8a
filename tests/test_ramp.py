"""Ramp and rollback: the config block, the decision rule in seeded simulations, and the
controller on a running proxy against fake backends paced apart."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from proxy import report
from proxy.accesslog import AccessLog
from proxy.config import Config, PromoteWhen, Ramp, RampGuardrail, load_config, parse_config
from proxy.errors import ConfigError
from proxy.health import REFUSED, HealthBoard
from proxy.liveverdict import LiveVerdict
from proxy.ramp import Action, Decision, decide, step_verdict
from proxy.ramp_control import (
    EVERY_REQUESTS,
    EVERY_SECONDS,
    RampController,
    first_steps,
    with_split,
)
from proxy.routing import Router, choose
from proxy.sequential import ArmState, Observation
from tests.conftest import RunningProxy, make_config
from tests.fakebackend import FakeBackend


def routes(ramp: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": "m",
        "backends": {
            "baseline": {"url": "http://127.0.0.1:1"},
            "speculative": {"url": "http://127.0.0.1:2"},
        },
        "routing": {"split": {"baseline": 50, "speculative": 50}},
        "logging": {"path": None},
        **extra,
    }
    if ramp is not None:
        data["ramp"] = ramp
    return data


def ramp_config(**block: Any) -> Config:
    return parse_config(routes({"speculative": {"steps": [5, 25, 50], **block}}))


# --- the config block --------------------------------------------------------------------------


def test_a_ramp_block_has_defaults_for_everything_but_its_steps() -> None:
    ramp = ramp_config().ramp["speculative"]
    assert ramp.steps == [5, 25, 50]
    assert (ramp.min_requests, ramp.promote_when, ramp.margin) == (200, PromoteWhen.NOT_WORSE, 0.05)
    assert ramp.rollback_when == list(RampGuardrail)
    assert (ramp.max_step_minutes, ramp.dry_run) == (60.0, False)
    assert parse_config(routes()).ramp == {}


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"steps": [5, 5]}, "ramp.speculative.steps: steps must increase strictly: 5 follows 5"),
        ({"steps": [25, 5]}, "ramp.speculative.steps: steps must increase strictly"),
        ({"steps": [0.5]}, "ramp.speculative.steps: each step must be a percentage from 1 to 100"),
        ({"steps": [101]}, "ramp.speculative.steps: each step must be a percentage from 1 to 100"),
        ({"steps": []}, "ramp.speculative.steps: List should have at least 1 item"),
        ({"steps": [True]}, "ramp.speculative.steps.0: percentage must be a number, not True"),
        ({"steps": ["5"]}, "ramp.speculative.steps.0: percentage must be a number"),
        ({}, "ramp.speculative.steps: required key is missing"),
        ({"steps": [5], "min_requests": 9}, "ramp.speculative.min_requests: Input should be"),
        ({"steps": [5], "promote_when": "maybe"}, "ramp.speculative.promote_when: Input should"),
        ({"steps": [5], "margin": 0}, "ramp.speculative.margin: Input should be greater than 0"),
        ({"steps": [5], "margin": 0.5}, "ramp.speculative.margin: Input should be less than 0.5"),
        ({"steps": [5], "rollback_when": ["decode_tps"]}, "ramp.speculative.rollback_when.0:"),
        ({"steps": [5], "rollback_when": ["ttft_ms", "ttft_ms"]}, "a guardrail is named twice"),
        ({"steps": [5], "max_step_minutes": 0}, "ramp.speculative.max_step_minutes: Input"),
        ({"steps": [5], "dry_run": "sometimes"}, "ramp.speculative.dry_run: Input should be"),
        ({"steps": [5], "step": [5]}, "ramp.speculative.step: unknown key"),
    ],
)
def test_a_bad_ramp_block_is_one_error_naming_its_key(block: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(routes({"speculative": block}))
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("ramp", "extra", "message"),
    [
        ({"fast": {"steps": [5]}}, {}, "ramp.fast: unknown backend fast"),
        ({"baseline": {"steps": [5]}}, {}, "ramp.baseline: the baseline cannot be ramped"),
        (
            {"baseline": {"steps": [5]}},
            {"routing": {"baseline": "speculative", "split": {"speculative": 100}}},
            None,  # `baseline` is then an ordinary arm
        ),
    ],
)
def test_a_ramp_names_a_backend_that_is_not_the_baseline(
    ramp: dict[str, Any], extra: dict[str, Any], message: str | None
) -> None:
    if message is None:
        assert parse_config(routes(ramp, **extra)).ramp["baseline"].steps == [5]
        return
    with pytest.raises(ConfigError, match=message):
        parse_config(routes(ramp, **extra))


def test_the_last_steps_must_leave_the_baseline_something() -> None:
    three = routes(
        {"speculative": {"steps": [10, 60]}},
        backends={
            "baseline": {"url": "http://127.0.0.1:1"},
            "speculative": {"url": "http://127.0.0.1:2"},
            "other": {"url": "http://127.0.0.1:3"},
        },
        routing={"split": {"baseline": 50, "speculative": 0, "other": 50}},
    )
    with pytest.raises(ConfigError, match=r"add up to 110%, over 100"):
        parse_config(three)
    three["ramp"]["speculative"]["steps"] = [10, 50]
    assert parse_config(three).ramp["speculative"].steps[-1] == 50


# --- the decision rule, in seeded simulations -------------------------------------------------


@dataclass(frozen=True)
class Truth:
    """How the speculative arm really differs from the baseline."""

    decode: float = 1.0  # factor on decode tokens/s
    errors: float = 0.0  # its error rate (the baseline's is 0)


TOKENS = 100  # per answer: latency = TTFT + TOKENS / decode speed


def observations(rng: np.random.Generator, count: int, truth: Truth) -> list[Observation]:
    """`count` requests' figures: decode ~ 20 tokens/s x the truth, log-sd 0.1; TTFT ~
    100 ms, log-sd 0.2; latency follows from both. Vectorised: numpy draws, then objects."""
    decode = 20.0 * truth.decode * rng.lognormal(0.0, 0.1, count)
    ttft = 100.0 * rng.lognormal(0.0, 0.2, count)
    latency = ttft + TOKENS / decode * 1000.0
    failed = rng.random(count) < truth.errors
    return [
        Observation(True) if f else Observation(False, float(d), float(t), float(lat))
        for f, d, t, lat in zip(failed, decode, ttft, latency, strict=True)
    ]


@dataclass
class Run:
    decisions: list[Decision]
    arm_requests: list[int]  # per step, requests the arm got in it

    @property
    def final(self) -> Action:
        return self.decisions[-1].action


def simulate(seed: int, ramp: Ramp, truth: Truth, *, max_requests: int = 20_000) -> Run:
    """The ramp as the controller runs it: each step a new experiment at the step's split,
    requests routed at random, the rule read every 10 requests. Time stands still (no
    overdue holds); a step that stays undecided for `max_requests` ends the run on hold."""
    rng = np.random.default_rng(seed)
    run = Run([], [])
    step = 0
    while True:
        states = {"baseline": ArmState(), "speculative": ArmState()}
        share = ramp.steps[step] / 100
        decision = None
        for _ in range(max_requests // 10):
            to_arm = int((rng.random(10) < share).sum())
            for o in observations(rng, to_arm, truth):
                states["speculative"].observe(o)
            for o in observations(rng, 10 - to_arm, Truth()):
                states["baseline"].observe(o)
            verdict = step_verdict(ramp, states, "baseline", "speculative")
            decision = decide(ramp, step, 0.0, 0.0, verdict, "speculative")
            if decision.action is not Action.HOLD:
                break
        assert decision is not None
        run.decisions.append(decision)
        run.arm_requests.append(states["speculative"].requests)
        if decision.action is not Action.PROMOTE:
            return run
        step += 1


def ramp_of(**block: Any) -> Ramp:
    return Ramp.model_validate({"steps": [5, 25, 50], **block})


def test_decode_twice_as_slow_is_rolled_back_at_the_first_step() -> None:
    """Within a few times min_requests (the rollback on a time waits for min_requests on
    each side: the intervals with an estimated variance are too narrow below that)."""
    ramp = ramp_of(min_requests=50)
    for seed in range(20):
        run = simulate(seed, ramp, Truth(decode=0.5))
        assert [d.action for d in run.decisions] == [Action.ROLLBACK], run.decisions
        assert run.arm_requests[0] <= 3 * ramp.min_requests
        assert run.decisions[0].split == 0


def test_faster_and_no_worse_elsewhere_is_promoted_through_every_step() -> None:
    ramp = ramp_of(min_requests=50)
    for seed in range(20):
        run = simulate(seed, ramp, Truth(decode=1.3))
        actions = [d.action for d in run.decisions]
        assert actions == [Action.PROMOTE, Action.PROMOTE, Action.COMPLETE], run.decisions
        assert [d.split for d in run.decisions] == [25, 50, 50]


def test_identical_arms_are_almost_never_rolled_back_and_mostly_promoted() -> None:
    """The issue's bar: never rolled back in at least 95% of runs. Measured over 400 seeds
    at these settings: 5 rolled back (1.25%), the rest completed."""
    ramp = ramp_of(min_requests=30)
    runs = [simulate(10_000 + seed, ramp, Truth()) for seed in range(150)]
    rolled_back = sum(run.final is Action.ROLLBACK for run in runs)
    completed = sum(run.final is Action.COMPLETE for run in runs)
    assert rolled_back <= 0.05 * len(runs), rolled_back
    assert completed >= 0.9 * len(runs), completed


def test_a_fifth_of_requests_failing_is_rolled_back_before_min_requests() -> None:
    """The issue's config (min_requests 200): the error-rate guardrail fires on its own
    interval, which needs no min_requests (its variance is floored: see rate_variance)."""
    ramp = ramp_of(min_requests=200)
    for seed in range(10):
        run = simulate(20_000 + seed, ramp, Truth(errors=0.2))
        [decision] = run.decisions
        assert decision.action is Action.ROLLBACK, decision
        assert decision.evidence is not None and decision.evidence.metric == "error_rate"
        assert run.arm_requests[0] < ramp.min_requests


def filled(truth: Truth, arm: int, base: int, seed: int = 0) -> dict[str, ArmState]:
    rng = np.random.default_rng(seed)
    states = {"baseline": ArmState(), "speculative": ArmState()}
    for o in observations(rng, arm, truth):
        states["speculative"].observe(o)
    for o in observations(rng, base, Truth()):
        states["baseline"].observe(o)
    return states


def rule(ramp: Ramp, states: dict[str, ArmState], step: int = 0, **kw: Any) -> Decision:
    verdict = step_verdict(ramp, states, "baseline", "speculative")
    return decide(
        ramp, step, kw.pop("started", 0.0), kw.pop("now", 1.0), verdict, "speculative", **kw
    )


def test_an_arm_ejected_longer_than_a_step_is_a_failed_step() -> None:
    ramp = ramp_of(min_requests=10, max_step_minutes=1)
    states = filled(Truth(), 0, 50)
    assert rule(ramp, states, ejected_for=60.0).action is Action.HOLD
    decision = rule(ramp, states, ejected_for=61.0)
    assert (decision.action, decision.split) == (Action.ROLLBACK, 0)
    assert "ejected as unhealthy for 61 s" in decision.reason


def test_an_undecided_step_holds_and_says_so_past_max_step_minutes() -> None:
    ramp = ramp_of(min_requests=500, max_step_minutes=2)
    states = filled(Truth(), 40, 40)
    early = rule(ramp, states, step=1, now=119.0)
    late = rule(ramp, states, step=1, now=121.0)
    assert (early.action, early.overdue, early.split) == (Action.HOLD, False, 25)
    assert (late.action, late.overdue) == (Action.HOLD, True)
    assert late.reason.startswith("undecided for 2 min, past max_step_minutes: inconclusive")


def test_promote_when_better_holds_an_arm_that_is_only_not_worse() -> None:
    states = filled(Truth(), 300, 300)
    assert rule(ramp_of(min_requests=100), states).action is Action.PROMOTE
    held = rule(ramp_of(min_requests=100, promote_when="better"), states)
    assert held.action is Action.HOLD and "not yet better" in held.reason


def test_guardrails_left_out_of_rollback_when_do_not_roll_back() -> None:
    states = filled(Truth(errors=0.5), 100, 100)
    assert rule(ramp_of(min_requests=10), states).action is Action.ROLLBACK
    kept = rule(ramp_of(min_requests=10, rollback_when=["ttft_ms"]), states)
    assert kept.action is not Action.ROLLBACK, kept


def test_no_traffic_on_the_arm_holds() -> None:
    decision = rule(ramp_of(), {"baseline": ArmState(), "speculative": ArmState()})
    assert decision.action is Action.HOLD and decision.evidence is not None
    assert decision.evidence.value is None and "no interval yet" in decision.reason


# --- on a running proxy, against fake backends paced apart -------------------------------------

CHAT = "/v1/chat/completions"
STREAM = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def serve_ramp(
    serve_proxy: Any, tmp_path: Path, base: FakeBackend, spec: FakeBackend, **block: Any
) -> tuple[RunningProxy, Path, dict[str, Any]]:
    path = tmp_path / "routes.yaml"
    data: dict[str, Any] = {
        "model": "test-model",
        "backends": {"baseline": {"url": base.url}, "speculative": {"url": spec.url}},
        "routing": {"split": {"baseline": 50, "speculative": 50}},
        "logging": {"path": str(tmp_path / "requests.jsonl"), "stdout": False},
        "ramp": {"speculative": {"steps": [40, 60], "min_requests": 10, **block}},
    }
    path.write_text(json.dumps(data))
    proxy: RunningProxy = serve_proxy(load_config(path), config_path=path)
    return proxy, path, data


def stream(proxy: RunningProxy) -> None:
    with httpx.stream("POST", proxy.url + CHAT, json=STREAM, timeout=10) as r:
        assert r.status_code == 200
        r.read()


def until_ramp_event(proxy: RunningProxy, most: int = 300) -> dict[str, Any]:
    """Stream until the proxy logs a `ramp` event (bounded); return it."""
    for _ in range(most):
        stream(proxy)
        events = proxy.events("ramp")
        if events:
            return events[0]
    raise AssertionError(f"no ramp event after {most} requests")


def healthz(proxy: RunningProxy) -> dict[str, Any]:
    answer = httpx.get(proxy.url + "/healthz", timeout=5)
    assert answer.status_code == 200
    body: dict[str, Any] = answer.json()
    return body


def scrape(proxy: RunningProxy, prefix: str) -> dict[str, float]:
    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def test_a_backend_twice_as_slow_is_rolled_back_and_stays_out_until_reset(
    fake: FakeBackend, fake2: FakeBackend, serve_proxy: Any, tmp_path: Path
) -> None:
    fake.extra_mode = "tokens=8; delay=0.004"
    fake2.extra_mode = "tokens=8; delay=0.008"  # tokens paced twice as far apart
    proxy, path, data = serve_ramp(serve_proxy, tmp_path, fake, fake2)
    start = healthz(proxy)
    assert start["backends"]["speculative"]["split"] == 40  # the first step, not the file's 50
    assert start["ramp"]["speculative"]["state"] == "ramping"

    event = until_ramp_event(proxy)
    assert (event["action"], event["step"], event["split"], event["dry_run"]) == (
        "rollback", 1, 0, False
    )  # fmt: skip
    assert event["evidence"]["metric"] in ("decode_tps", "latency_ms", "ttft_ms")
    assert min(event["evidence"]["n"].values()) >= 10
    assert event["previous"] != event["config_version"]

    status = healthz(proxy)
    assert status["backends"]["speculative"]["split"] == 0
    assert status["backends"]["baseline"]["split"] == 100
    ramp = status["ramp"]["speculative"]
    assert (ramp["state"], ramp["rolled_back"], ramp["split_applied"], ramp["split_file"]) == (
        "rolled_back", True, 0, 50
    )  # fmt: skip
    assert ramp["last_decision"]["action"] == "rollback"
    assert ramp["last_decision"]["reason"] == event["reason"]
    metrics = scrape(proxy, "specproxy_")
    assert metrics['specproxy_split_percent{backend="speculative"}'] == 0
    assert metrics['specproxy_ramp_decisions_total{action="rollback",backend="speculative"}'] == 1

    before = len(proxy.log())
    for _ in range(10):
        stream(proxy)
    after = proxy.wait_for_log(before + 10)[before:]
    assert {line["backend"] for line in after} == {"baseline"}
    assert {line["config_version"] for line in after} == {event["config_version"]}

    # A reload of the same file keeps the rollback.
    assert httpx.post(proxy.url + "/admin/reload", timeout=5).status_code == 200
    assert healthz(proxy)["ramp"]["speculative"]["state"] == "rolled_back"
    assert healthz(proxy)["backends"]["speculative"]["split"] == 0

    # The reset starts it again at its first step.
    refused = httpx.post(proxy.url + "/admin/ramp/reset?backend=baseline", timeout=5)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "backend"
    assert "has no ramp" in refused.json()["error"]["message"]
    reset = httpx.post(proxy.url + "/admin/ramp/reset?backend=speculative", timeout=5)
    assert reset.status_code == 200 and reset.json()["backends"] == ["speculative"]
    ramp = healthz(proxy)["ramp"]["speculative"]
    assert (ramp["state"], ramp["step"], ramp["split_applied"]) == ("ramping", 1, 40)
    [logged] = proxy.events("ramp_reset")
    assert (logged["backends"], logged["source"]) == (["speculative"], "admin")

    # A reload that changes the ramp block starts it again too.
    until_ramp_event_count(proxy, 2)
    assert healthz(proxy)["ramp"]["speculative"]["state"] == "rolled_back"
    data["ramp"]["speculative"]["min_requests"] = 11
    path.write_text(json.dumps(data))
    assert httpx.post(proxy.url + "/admin/reload", timeout=5).status_code == 200
    assert healthz(proxy)["ramp"]["speculative"]["state"] == "ramping"
    assert proxy.events("ramp_reset")[-1]["source"] == "admin"


def until_ramp_event_count(proxy: RunningProxy, count: int, most: int = 300) -> None:
    for _ in range(most):
        if len(proxy.events("ramp")) >= count:
            return
        stream(proxy)
    raise AssertionError(f"fewer than {count} ramp events after {most} requests")


def test_a_faster_backend_is_promoted_under_a_new_config_version(
    fake: FakeBackend, fake2: FakeBackend, serve_proxy: Any, tmp_path: Path
) -> None:
    fake.extra_mode = "tokens=8; delay=0.008"
    fake2.extra_mode = "tokens=8; delay=0.004"
    proxy, _, _ = serve_ramp(serve_proxy, tmp_path, fake, fake2, rollback_when=["error_rate"])
    first = healthz(proxy)["config_version"]
    event = until_ramp_event(proxy)
    assert (event["action"], event["step"], event["split"]) == ("promote", 1, 60)
    assert event["previous"] == first != event["config_version"]
    status = healthz(proxy)
    assert status["config_version"] == event["config_version"]
    assert status["backends"]["speculative"]["split"] == 60
    assert status["ramp"]["speculative"]["step"] == 2
    since = datetime.fromisoformat(status["ramp"]["speculative"]["step_since"])
    assert abs((since - datetime.fromisoformat(event["timestamp"])).total_seconds()) < 1.5
    [reset] = [
        e for e in proxy.events("verdict_reset") if e["config_version"] == event["config_version"]
    ]
    assert reset["reason"] == "ramp changed the split"


def test_dry_run_logs_the_decision_and_changes_no_split(
    fake: FakeBackend, fake2: FakeBackend, serve_proxy: Any, tmp_path: Path
) -> None:
    fake.extra_mode = "tokens=8; delay=0.004"
    fake2.extra_mode = "tokens=8; delay=0.008"
    proxy, _, _ = serve_ramp(serve_proxy, tmp_path, fake, fake2, dry_run=True)
    version = healthz(proxy)["config_version"]
    assert healthz(proxy)["backends"]["speculative"]["split"] == 50  # the file's
    event = until_ramp_event(proxy)
    assert (event["action"], event["dry_run"], event["split_applied"]) == ("rollback", True, 50)
    assert event["previous"] is None and event["config_version"] == version
    status = healthz(proxy)
    assert status["config_version"] == version
    assert status["backends"]["speculative"]["split"] == 50
    assert status["ramp"]["speculative"]["state"] == "rolled_back"
    before = len(proxy.log())
    for _ in range(20):
        stream(proxy)
    after = proxy.wait_for_log(before + 20)[before:]
    assert "speculative" in {line["backend"] for line in after}  # still served: nothing changed


def test_the_report_lists_the_ramp_events_a_proxy_logged(
    fake: FakeBackend,
    fake2: FakeBackend,
    serve_proxy: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake.extra_mode = "tokens=8; delay=0.004"
    fake2.extra_mode = "tokens=8; delay=0.008"
    proxy, path, _ = serve_ramp(serve_proxy, tmp_path, fake, fake2)
    event = until_ramp_event(proxy)
    assert report.main([str(proxy.log_path), "--ramp", str(path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    [logged] = [e for e in document["events"] if e["event"] == "ramp"]
    assert {k: logged[k] for k in ("action", "config_version", "reason")} == {
        k: event[k] for k in ("action", "config_version", "reason")
    }
    # The replay of these few lines is not asserted: thinned at random, they may fall
    # short of min_requests on a side, where the live rule had just enough.
    assert document["replay"]["speculative"]["timeline"][0]["step"] == 1


# --- report --ramp: the rule replayed on a log ---------------------------------------------------


def write_log(path: Path, truth: Truth, count: int, seed: int = 0) -> None:
    """A log of `count` split requests, 50/50, 0.1 s apart, and one real ramp event."""
    rng = np.random.default_rng(seed)
    t0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    lines = []
    for i in range(count):
        backend = "speculative" if rng.random() < 0.5 else "baseline"
        [o] = observations(rng, 1, truth if backend == "speculative" else Truth())
        stamp = (t0 + timedelta(seconds=i / 10)).isoformat().replace("+00:00", "Z")
        lines.append(
            {
                "event": "request", "timestamp": stamp, "request_id": f"r{i}",
                "config_version": "abc", "stream": True, "backend": backend,
                "reason": "split", "status": 502 if o.error else 200,
                "error": "backend_error" if o.error else None, "decode_tps": o.decode_tps,
                "ttft_ms": o.ttft_ms, "latency_ms": o.latency_ms,
            }
        )  # fmt: skip
    lines.append(
        {
            "event": "ramp", "timestamp": "2026-12-01T12:00:30Z", "config_version": "def",
            "backend": "speculative", "action": "rollback", "step": 1, "steps": 3, "split": 0.0,
            "split_applied": 0.0, "dry_run": False, "reason": "worse: decode_tps ratio 0.5",
        }
    )  # fmt: skip
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")


def replay_report(
    tmp_path: Path, truth: Truth, capsys: pytest.CaptureFixture[str], *args: str
) -> str:
    log, routes_file = tmp_path / "requests.jsonl", tmp_path / "routes.yaml"
    write_log(log, truth, 3000)
    data = routes({"speculative": {"steps": [5, 25, 50], "min_requests": 30}})
    routes_file.write_text(json.dumps(data))
    assert report.main([str(log), "--ramp", str(routes_file), *args]) == 0
    return capsys.readouterr().out


def test_the_report_replays_a_slow_arm_into_a_rollback_at_the_first_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = json.loads(replay_report(tmp_path, Truth(decode=0.5), capsys, "--json"))
    replayed = document["replay"]["speculative"]
    [step] = replayed["timeline"]
    assert (step["step"], step["split"], step["action"]) == (1, 5, "rollback")
    # Thinned to the step's 5%: about 30 arm lines need about 600 in all, not 60.
    assert step["lines"] >= 400, step
    assert 0.4 < replayed["arm_share_in_log"] < 0.6
    [event] = document["events"]
    assert (event["event"], event["action"], event["config_version"]) == ("ramp", "rollback", "def")


def test_the_report_replays_a_faster_arm_through_every_step_and_prints_a_timeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = replay_report(tmp_path, Truth(decode=1.3), capsys)
    assert "Ramp replay: speculative (steps 5, 25, 50%" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("  step")] == [
        ["step", "1"], ["step", "2"], ["step", "3"]
    ]  # fmt: skip
    assert "complete" in out.splitlines()[3]
    assert "speculative  rollback at step 1/3 -> 0.0%" in out  # the logged event, as it was


def test_the_report_refuses_a_routes_file_without_a_ramp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, routes_file = tmp_path / "requests.jsonl", tmp_path / "routes.yaml"
    write_log(log, Truth(), 10)
    routes_file.write_text(json.dumps(routes()))
    assert report.main([str(log), "--ramp", str(routes_file)]) == 2
    assert "no `ramp` block to replay" in capsys.readouterr().err


def test_the_demo_ramp_file_is_valid_and_starts_at_its_first_step() -> None:
    config = load_config(Path(__file__).resolve().parent.parent / "routes.ramp.yaml")
    assert config.ramp["speculative"].steps == [25, 50]
    assert first_steps(config).routing.split == {"baseline": 75, "speculative": 25}


# --- the controller, without a server -------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def controller(config: Config, clock: Clock, tmp_path: Path) -> tuple[RampController, list[str]]:
    verdict = LiveVerdict(first_steps(config), "v")
    health = HealthBoard(config, lambda name, state: None)
    log = AccessLog(None, stdout=False)
    ramps = RampController(config, verdict, health, log, clock)
    applied: list[str] = []

    def apply() -> str:
        applied.append(str(ramps.effective().routing.split))
        return "v2"

    ramps.bind(apply, lambda: "v")
    return ramps, applied


def test_the_rule_runs_every_so_many_requests_or_each_second_not_on_every_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    ramps, _ = controller(ramp_config(min_requests=10), clock, tmp_path)
    looks: list[float] = []
    monkeypatch.setattr(ramps, "evaluate", lambda now=None: looks.append(now) or [])
    for _ in range(EVERY_REQUESTS * 3):
        ramps.tick()
    assert len(looks) == 3
    ramps.tick()
    clock.now += EVERY_SECONDS
    ramps.tick()
    assert len(looks) == 4


def test_a_reload_keeps_an_unchanged_ramp_and_restarts_a_changed_one(tmp_path: Path) -> None:
    clock = Clock()
    ramps, applied = controller(ramp_config(min_requests=10), clock, tmp_path)
    assert ramps.effective().routing.split == {"baseline": 95, "speculative": 5}
    ramps.arms["speculative"].rolled_back = True
    other_split = parse_config(
        routes({"speculative": {"steps": [5, 25, 50], "min_requests": 10}},
               routing={"split": {"baseline": 30, "speculative": 70}})
    )  # fmt: skip
    assert ramps.follow(other_split) == []  # the block is the same: kept, rolled back
    assert ramps.effective().routing.split == {"baseline": 100, "speculative": 0}
    assert ramps.follow(ramp_config(min_requests=11)) == ["speculative"]
    assert ramps.arms["speculative"].state == "ramping"
    assert ramps.follow(parse_config(routes())) == []  # the ramp removed: the file's split
    assert ramps.arms == {} and ramps.effective().routing.split == {
        "baseline": 50,
        "speculative": 50,
    }
    assert applied == []  # follow changes nothing by itself: the reload applies it


def test_with_split_gives_the_baseline_the_rest_and_leaves_other_arms_alone() -> None:
    config = parse_config(
        routes(
            backends={name: {"url": f"http://127.0.0.1:{i}"} for i, name in
                      enumerate(("baseline", "speculative", "other"), start=1)},
            routing={"split": {"baseline": 40, "speculative": 40, "other": 20}},
        )
    )  # fmt: skip
    split = with_split(config, {"speculative": 5}).routing.split
    assert split == {"baseline": 75, "speculative": 5, "other": 20}
    assert config.routing.split["speculative"] == 40  # a copy: the file's config is unchanged


def test_a_dry_run_promotion_moves_the_step_and_its_experiment_but_no_split(
    tmp_path: Path,
) -> None:
    ramps, applied = controller(ramp_config(min_requests=10, dry_run=True), Clock(), tmp_path)
    verdict = ramps._verdict
    verdict.states.update(filled(Truth(decode=1.3), 100, 100))
    [decision] = ramps.evaluate()
    assert (decision.action, decision.split) == (Action.PROMOTE, 25)
    assert ramps.arms["speculative"].step == 1 and applied == []
    assert ramps.effective().routing.split == {"baseline": 50, "speculative": 50}
    assert verdict.states["speculative"].requests == 0  # the next step counts afresh
    assert verdict.reason == "ramp dry run: speculative promoted"
    assert ramps.decisions["speculative", "promote"] == 1


def test_a_step_moves_sticky_sessions_only_to_the_arm_and_a_rollback_all_back() -> None:
    config = parse_config(routes(routing={"split": {"baseline": 50, "speculative": 50},
                                          "sticky_header": "X-Session"}))  # fmt: skip
    rng = random.Random(0)

    def on_arm(pct: float) -> set[int]:
        split = with_split(config, {"speculative": pct})
        router = Router.build(split.weights(), "x-backend", "x-session")
        return {
            i
            for i in range(2000)
            if choose(router, {"x-session": f"user-{i}"}, rng).backend == "speculative"
        }

    first, second = on_arm(5), on_arm(25)
    assert first < second  # promoted: those already on the arm stay, others join
    assert 0.03 < len(first) / 2000 < 0.07 and 0.22 < len(second) / 2000 < 0.28
    assert on_arm(0) == set()


def test_the_reset_endpoint_is_admin_only(
    fake: FakeBackend, fake2: FakeBackend, serve_proxy: Any, tmp_path: Path
) -> None:
    proxy: RunningProxy = serve_proxy(
        make_config(
            tmp_path,
            {"baseline": fake.url, "speculative": fake2.url},
            auth={"admin_token": "adm-secret"},
            ramp={"speculative": {"steps": [10, 20]}},
        )
    )
    url = proxy.url + "/admin/ramp/reset"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert httpx.post(url, headers=headers, timeout=5).status_code == 401
    assert proxy.events("ramp_reset") == []
    answer = httpx.post(url, headers={"Authorization": "Bearer adm-secret"}, timeout=5)
    assert answer.status_code == 200 and answer.json()["backends"] == ["speculative"]
    assert answer.json()["ramp"]["speculative"]["split_applied"] == 10


def test_a_rollback_on_a_time_waits_for_min_requests_and_one_on_errors_does_not() -> None:
    """Intervals on times, with an estimated variance, are too narrow on a handful of
    requests: identical arms were rolled back in 7 of these 150 seeded runs without the
    wait, 2 with it. The error rate's variance has a floor: it needs no wait."""
    slow = filled(Truth(decode=0.5), 20, 20)
    assert rule(ramp_of(min_requests=10), slow).action is Action.ROLLBACK
    held = rule(ramp_of(min_requests=50), slow)
    assert held.action is Action.HOLD, held
    failing = filled(Truth(errors=0.5), 100, 100)
    decision = rule(ramp_of(min_requests=200), failing)
    assert decision.action is Action.ROLLBACK and decision.evidence is not None
    assert decision.evidence.metric == "error_rate"


def test_the_controller_rolls_back_an_arm_all_of_whose_replicas_were_ejected_past_a_step(
    tmp_path: Path,
) -> None:
    """The health board holds each replica's health; the arm is ejected only when all its
    replicas are, and counts as a failed step once that outlasts `max_step_minutes`."""
    clock = Clock()
    config = ramp_config(min_requests=10, max_step_minutes=1)
    ramps, applied = controller(config, clock, tmp_path)
    health = ramps._health  # the board the controller reads, as the runtime's
    (replica,) = health.backends["speculative"].values()
    replica.failed(REFUSED, clock.now)  # a refusal ejects at once
    clock.now += 30
    assert ramps.evaluate() == []  # ejected, but not for a whole step: a hold
    last = ramps.arms["speculative"].last
    assert last is not None and last.action is Action.HOLD
    clock.now += 31
    (decision,) = ramps.evaluate()
    assert decision.action is Action.ROLLBACK and "ejected" in decision.reason
    assert ramps.effective().routing.split == {"baseline": 100, "speculative": 0}
    assert len(applied) == 1  # applied as a new split

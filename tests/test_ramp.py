"""Ramp and rollback: the config block, the decision rule in seeded simulations, and the
controller on a running proxy against fake backends paced apart."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import Config, PromoteWhen, RampGuardrail, parse_config
from proxy.errors import ConfigError


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

"""Which backend a request gets, and why: precedence, stickiness, proportions."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import pytest

from proxy.errors import UnknownBackendError
from proxy.routing import Router, choose, sticky_point

WEIGHTS = [("baseline", 70.0), ("spec2", 20.0), ("spec3", 10.0), ("drained", 0.0)]


def router(sticky: str | None = "X-Session-Id") -> Router:
    return Router.build(WEIGHTS, "X-Backend", sticky)


def test_header_wins_over_sticky_and_split() -> None:
    headers = {"x-backend": "spec3", "x-session-id": "abc"}
    decision = choose(router(), headers, random.Random(0))
    assert (decision.backend, decision.reason) == ("spec3", "header")


def test_header_may_force_a_drained_backend() -> None:
    assert choose(router(), {"x-backend": "drained"}, random.Random(0)).backend == "drained"


def test_unknown_header_value_lists_valid_backends() -> None:
    with pytest.raises(UnknownBackendError) as info:
        choose(router(), {"x-backend": "nope"}, random.Random(0))
    assert "'nope'" in info.value.message
    assert "baseline, drained, spec2, spec3" in info.value.message
    assert info.value.status == 400


def test_sticky_header_beats_split() -> None:
    decision = choose(router(), {"x-session-id": "user-42"}, random.Random(0))
    assert decision.reason == "sticky"


def test_empty_sticky_value_falls_back_to_split() -> None:
    assert choose(router(), {"x-session-id": ""}, random.Random(0)).reason == "split"


def test_no_sticky_header_configured_means_split() -> None:
    decision = choose(router(sticky=None), {"x-session-id": "user-42"}, random.Random(0))
    assert decision.reason == "split"


def test_same_sticky_value_same_backend_with_any_random_source() -> None:
    picks = {
        choose(router(), {"x-session-id": "user-42"}, random.Random(seed)).backend
        for seed in range(50)
    }
    assert len(picks) == 1


def test_sticky_choice_is_the_same_in_another_process() -> None:
    """Python's hash() is salted per process; the sticky hash must not be."""
    keys = [f"session-{i}" for i in range(200)]
    here = [router().pick(sticky_point(key)) for key in keys]
    code = (
        "from proxy.routing import Router, sticky_point\n"
        f"r = Router.build({WEIGHTS!r}, 'X-Backend', 'X-Session-Id')\n"
        f"print(','.join(r.pick(sticky_point(k)) for k in {keys!r}))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    assert other.split(",") == here
    assert len(set(here)) == 3  # and the keys really spread over the weighted backends


def test_sticky_keys_spread_in_proportion_to_the_split() -> None:
    counts = Counter(router().pick(sticky_point(f"user-{i}")) for i in range(20_000))
    assert counts["drained"] == 0
    assert abs(counts["baseline"] / 20_000 - 0.70) < 0.02
    assert abs(counts["spec3"] / 20_000 - 0.10) < 0.02


def test_split_proportions_match_percentages() -> None:
    rng = random.Random(1234)
    draws = 50_000
    counts = Counter(choose(router(), {}, rng).backend for _ in range(draws))
    for name, weight in WEIGHTS:
        p = weight / 100
        # 5 standard deviations of a binomial: fails by chance about once in 3 million runs
        tolerance = 5 * (p * (1 - p) / draws) ** 0.5
        assert abs(counts[name] / draws - p) <= tolerance, (name, counts)


def test_zero_weight_never_chosen_by_split() -> None:
    rng = random.Random(7)
    assert all(choose(router(), {}, rng).backend != "drained" for _ in range(20_000))


def test_split_extremes_of_the_random_source_stay_in_range() -> None:
    class Edge(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    assert choose(router(), {}, Edge(0.0)).backend == "baseline"
    assert choose(router(), {}, Edge(0.999999999999)).backend == "spec3"

"""Concurrency slots and the wait queue (proxy/limits.py), the pure failover decisions, and
what slots and health keep across reloads and restarts."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import failover
from proxy.accesslog import AccessLog
from proxy.config import Backend, load_config, parse_config
from proxy.errors import (
    BackendRefusedError,
    BackendStatusError,
    BackendTimeoutError,
    BackendUnavailableError,
)
from proxy.health import HealthBoard, probe_forever
from proxy.limits import Full, Limiter
from proxy.routing import Decision
from proxy.runtime import ActiveConfig, Runtime

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def limiter(**fields: Any) -> Limiter:
    return Limiter(Backend(url="http://127.0.0.1:1", **fields))


async def test_no_limit_never_waits() -> None:
    slots = limiter()
    assert [await slots.acquire() for _ in range(100)] == [0.0] * 100
    assert slots.active == 100


async def test_full_queue_raises_at_once() -> None:
    slots = limiter(max_in_flight=1, max_queue=0)
    await slots.acquire()
    with pytest.raises(Full, match="limit 1"):
        await slots.acquire()


async def test_waiters_get_slots_in_order_and_report_their_wait() -> None:
    slots = limiter(max_in_flight=1, max_queue=2)
    await slots.acquire()
    order: list[int] = []

    async def wait(i: int) -> float:
        waited = await slots.acquire()
        order.append(i)
        return waited

    first = asyncio.ensure_future(wait(1))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(wait(2))
    await asyncio.sleep(0.05)
    assert slots.queued == 2
    with pytest.raises(Full):  # the queue holds two
        await slots.acquire()
    slots.release()
    assert await first >= 0.04
    slots.release()
    await second
    assert order == [1, 2] and slots.active == 1


async def test_a_newcomer_cannot_overtake_a_woken_waiter() -> None:
    slots = limiter(max_in_flight=1, max_queue=1, queue_timeout=0.05)
    await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # the slot is handed to the waiter, not left free
    with pytest.raises(Full, match="within"):
        await slots.acquire()  # the queue has room, but the slot is the waiter's
    await waiter
    assert slots.active == 1


async def test_wait_times_out() -> None:
    slots = limiter(max_in_flight=1, max_queue=1, queue_timeout=0.05)
    await slots.acquire()
    with pytest.raises(Full, match=r"within 0\.05 s") as caught:
        await slots.acquire()
    assert caught.value.retry_after == 1 and slots.queued == 0 and slots.active == 1


async def test_a_cancelled_waiter_leaves_the_queue_and_loses_no_slot() -> None:
    slots = limiter(max_in_flight=1, max_queue=1)
    await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert slots.queued == 0
    slots.release()
    assert slots.active == 0
    await slots.acquire()  # the slot is free again


async def test_a_slot_handed_over_as_the_waiter_is_cancelled_is_passed_on() -> None:
    slots = limiter(max_in_flight=1, max_queue=1)
    await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # handed to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(waiter, return_exceptions=True)
    assert slots.active == 0


async def test_raising_the_limit_wakes_waiters() -> None:
    slots = limiter(max_in_flight=1, max_queue=1)
    await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    slots.update(Backend(url="http://127.0.0.1:1", max_in_flight=2))
    await asyncio.wait_for(waiter, 1)
    assert slots.active == 2


# --- the pure decisions ---------------------------------------------------------------
FALLBACKS = {"speculative": "baseline", "other": "baseline", "baseline": None}


def fallback_of(name: str) -> str | None:
    return FALLBACKS[name]


def healthy_except(*down: str) -> Any:
    return lambda name: name not in down


def test_steer_moves_split_and_sticky_traffic_off_an_unhealthy_backend() -> None:
    for reason in ("split", "sticky"):
        moved = failover.steer(
            Decision("speculative", reason), healthy_except("speculative"), fallback_of
        )
        assert moved == Decision("baseline", "fallback", "speculative", "unhealthy")
    kept = Decision("speculative", "split")
    assert failover.steer(kept, healthy_except(), fallback_of) is kept


def test_steer_refuses_a_forced_request_to_an_unhealthy_backend() -> None:
    with pytest.raises(BackendUnavailableError, match="'speculative' is unhealthy"):
        failover.steer(
            Decision("speculative", "header"), healthy_except("speculative"), fallback_of
        )


def test_steer_keeps_the_choice_when_there_is_nowhere_better() -> None:
    both_down = healthy_except("speculative", "baseline")
    decision = Decision("speculative", "split")
    assert failover.steer(decision, both_down, fallback_of) is decision
    base = Decision("baseline", "split")
    assert failover.steer(base, healthy_except("baseline"), fallback_of) is base


def test_overflow_moves_once_and_never_a_forced_request() -> None:
    moved = failover.overflow(Decision("speculative", "split"), fallback_of)
    assert moved == Decision("baseline", "fallback", "speculative", "full")
    assert moved is not None and failover.overflow(moved, fallback_of) is None
    assert failover.overflow(Decision("speculative", "header"), fallback_of) is None
    assert failover.overflow(Decision("baseline", "split"), fallback_of) is None


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (BackendRefusedError("refused"), True),
        (BackendTimeoutError("slow"), True),
        (BackendStatusError(503, b"{}", "speculative"), True),
        (BackendStatusError(400, b"{}", "speculative"), False),
    ],
)
def test_retry_only_for_backend_failures(error: Any, retried: bool) -> None:
    again = failover.retry(Decision("speculative", "split"), error, healthy_except(), fallback_of)
    assert (again == Decision("baseline", "fallback", "speculative", "failed")) is retried
    assert (again is None) is not retried


def test_retry_happens_once_never_for_forced_requests_nor_to_an_ejected_fallback() -> None:
    error = BackendRefusedError("refused")
    retried = Decision("baseline", "fallback", "speculative", "failed")
    assert failover.retry(retried, error, healthy_except(), fallback_of) is None
    assert (
        failover.retry(Decision("speculative", "header"), error, healthy_except(), fallback_of)
        is None
    )
    split = Decision("speculative", "split")
    assert failover.retry(split, error, healthy_except("baseline"), fallback_of) is None
    # moved for being unhealthy, then failed on the fallback: the baseline has no fallback
    moved = Decision("baseline", "fallback", "speculative", "unhealthy")
    assert failover.retry(moved, error, healthy_except(), fallback_of) is None


def test_retry_never_makes_a_second_hop() -> None:
    chain = {"speculative": "baseline", "baseline": "spare", "spare": None}
    error = BackendRefusedError("refused")
    for cause in ("unhealthy", "full"):
        moved = Decision("baseline", "fallback", "speculative", cause)
        assert failover.retry(moved, error, healthy_except(), chain.get) is None


# --- what a reload keeps --------------------------------------------------------------
def routes_file(path: Path, backends: dict[str, Any]) -> Path:
    data = {
        "model": "m",
        "backends": backends,
        "routing": {"split": {"baseline": 100}},
        "logging": {"path": None, "stdout": False},
    }
    path.write_text(json.dumps(data))
    return path


async def test_a_backend_removed_and_added_again_keeps_its_slots_counted(tmp_path: Path) -> None:
    both = {
        "baseline": {"url": "http://127.0.0.1:1"},
        "speculative": {"url": "http://127.0.0.1:2", "max_in_flight": 1, "max_queue": 0},
    }
    path = routes_file(tmp_path / "routes.yaml", both)
    transport = httpx.MockTransport(lambda request: httpx.Response(200))
    runtime = Runtime(
        ActiveConfig.build(load_config(path)), transport, AccessLog(None, stdout=False),
        random.Random(0), config_path=path,
    )  # fmt: skip
    held = runtime.fleets["speculative"].replicas[0].limiter
    await held.acquire()  # a long stream holds the one slot
    routes_file(path, {"baseline": both["baseline"]})
    await runtime.reload("test")
    routes_file(path, both)
    await runtime.reload("test")
    assert runtime.fleets["speculative"].replicas[0].limiter is held and held.active == 1
    with pytest.raises(Full):  # still one at a time
        await held.acquire()
    held.release()
    assert held.active == 0


def test_health_from_an_old_address_is_ignored() -> None:
    def config(url: str) -> Any:
        return parse_config(
            {"model": "m", "backends": {"b": {"url": url}}, "routing": {"split": {"b": 100}}}
        )

    changes: list[str] = []
    board = HealthBoard(config("http://127.0.0.1:1"), lambda name, state: changes.append(name))
    board.update(config("http://127.0.0.1:2"))  # a reload fixed the address
    board.failure("b", "http://127.0.0.1:1", "refused")  # a request routed before it
    assert board.healthy("b") and changes == []
    board.failure("b", "http://127.0.0.1:2", "refused")
    assert not board.healthy("b") and changes == ["b"]


async def test_a_launched_backend_that_is_loading_fails_its_probes() -> None:
    config = parse_config(
        {
            "model": "m",
            "backends": {"b": {"url": "http://127.0.0.1:1", "health": {"eject_after": 2}}},
            "routing": {"split": {"b": 100}},
        }
    )
    board = HealthBoard(config, lambda name, state: None)
    answered = httpx.MockTransport(lambda request: httpx.Response(200))  # /health says ok
    rules = config.backends["b"].health
    replicas = [("b", "http://127.0.0.1:1", rules)]
    loading = lambda name, url: True  # noqa: E731
    probes = asyncio.ensure_future(probe_forever(board, answered, lambda: replicas, loading))
    await asyncio.sleep(0.05)
    probes.cancel()
    await asyncio.gather(probes, return_exceptions=True)
    state = board.backends["b"]["http://127.0.0.1:1"]
    assert state.failures >= 1 and state.last_error == "loading"

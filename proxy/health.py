"""Which backends are healthy: outlier ejection from request outcomes, readmission by probes.

All of it is per replica (a backend of one server is a fleet of one): a backend is
unhealthy only when every one of its replicas is ejected.

A backend is ejected after `health.eject_after` consecutive failures (a refused connection
counts as all of them at once: nothing listens there). Failures are connection errors,
timeouts, 5xx answers and broken streams, from real requests or from the active probe of
`GET /health` that runs every `health.probe_interval` for every backend. An ejected backend
stays out for at least `health.min_eject` seconds; after that, the first passing probe
readmits it. While it is out, its split and sticky traffic goes to its fallback (see
failover.py, whose decisions are pure functions of this table).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

from proxy.config import Config, Health
from proxy.errors import BackendRefusedError, BackendStatusError, BackendTimeoutError
from proxy.upstream import Transport, UpstreamRequest, UpstreamTimeouts

REFUSED = "refused"  # a failure kind that ejects at once


@dataclass(slots=True)
class BackendHealth:
    url: str
    rules: Health
    healthy: bool = True
    failures: int = 0  # consecutive
    last_error: str | None = None
    ejected_at: float | None = None  # time.monotonic()
    ejections: int = 0

    def failed(self, kind: str, now: float) -> bool:
        """Count a failure; True when it ejects the backend."""
        self.failures = self.rules.eject_after if kind == REFUSED else self.failures + 1
        self.last_error = kind
        if self.healthy and self.failures >= self.rules.eject_after:
            self.healthy, self.ejected_at = False, now
            self.ejections += 1
            return True
        return False

    def succeeded(self, now: float, *, probe: bool) -> bool:
        """Count a success; True when it readmits the backend.

        A request that got through resets the failure count. A passing probe does not: a
        backend can answer /health and still break every stream. Only a probe readmits,
        and only after `min_eject`: a request that got through proves less than a probe.
        """
        if self.healthy:
            if not probe:
                self.failures = 0
            return False
        assert self.ejected_at is not None
        if probe and now - self.ejected_at >= self.rules.min_eject:
            self.healthy, self.ejected_at, self.failures = True, None, 0
            return True
        return False


class HealthBoard:
    """Every replica's health, by backend and URL (a backend of one server has one). Kept
    across config reloads for replicas whose URL stays; a backend is healthy while any of
    its replicas is."""

    def __init__(self, config: Config, on_change: Callable[[str, BackendHealth], None]):
        self.backends: dict[str, dict[str, BackendHealth]] = {}
        self._on_change = on_change
        self.update(config)

    def update(self, config: Config) -> None:
        old = self.backends
        self.backends = {}
        for name, backend in config.backends.items():
            kept, states = old.get(name, {}), {}
            for url in backend.urls:
                state = kept.get(url)
                if state is None:
                    state = BackendHealth(url, backend.health)
                state.rules = backend.health
                states[url] = state
            self.backends[name] = states

    def healthy(self, name: str) -> bool:
        states = self.backends.get(name)  # gone after a reload: no news is good news
        if states is None:
            return True
        for state in states.values():  # noqa: SIM110 - any() and its generator cost more
            if state.healthy:
                return True
        return False

    def failure(self, name: str, url: str, kind: str) -> None:
        state = self._state(name, url)
        if state is not None and state.failed(kind, time.monotonic()):
            self._on_change(name, state)

    def success(self, name: str, url: str, *, probe: bool = False) -> None:
        state = self._state(name, url)
        if state is not None and state.succeeded(time.monotonic(), probe=probe):
            self._on_change(name, state)

    def _state(self, name: str, url: str) -> BackendHealth | None:
        """The health of `name`'s replica at `url`, if it is still one. A request routed
        before a reload moved the backend (or removed it) says nothing about the new one."""
        return self.backends.get(name, {}).get(url)


def failure_kind(exc: BaseException) -> str:
    """The health table's name for what went wrong (an httpx or a proxy error)."""
    if isinstance(exc, httpx.ConnectError | BackendRefusedError):
        return REFUSED
    if isinstance(exc, httpx.TimeoutException | BackendTimeoutError):
        return "timeout"
    if isinstance(exc, BackendStatusError):
        return f"http_{exc.status}"
    return "broken"


async def probe_forever(
    board: HealthBoard,
    transport: Transport,
    backends: Callable[[], Iterable[tuple[str, str, Health]]],
    loading: Callable[[str, str], bool] = lambda name, url: False,
) -> None:
    """Probe every replica's `/health` on its interval, until cancelled. A replica the
    proxy launched and is (re)starting fails its probe without one: mlx_lm.server answers
    /health before its model is loaded, and requests sent then would wait for the load."""
    next_at: dict[tuple[str, str], float] = {}
    while True:
        now = time.monotonic()
        due = [b for b in backends() if next_at.get((b[0], b[1]), 0.0) <= now]
        for name, url, rules in due:
            next_at[name, url] = now + rules.probe_interval
        await asyncio.gather(*(_probe(board, transport, *b, loading) for b in due))
        await asyncio.sleep(0.1)  # a tick: intervals are seconds, so 100 ms is exact enough


async def _probe(
    board: HealthBoard,
    transport: Transport,
    name: str,
    url: str,
    rules: Health,
    loading: Callable[[str, str], bool],
) -> None:
    if loading(name, url):
        board.failure(name, url, "loading")
        return
    ok, detail = await probe(transport, url, rules.probe_timeout)
    if ok:
        board.success(name, url, probe=True)
    else:
        board.failure(name, url, detail)


async def probe(transport: Transport, url: str, timeout: float) -> tuple[bool, str]:
    """GET the backend's /health: whether it passed, and what was seen. A 5xx fails
    (mlx_lm.server answers 503 when its generation thread died); a 404 passes, since a
    server without /health is still up."""
    request = UpstreamRequest.get(url + "/health", UpstreamTimeouts.each(timeout))
    try:
        response = await transport.send(request)
        try:
            await response.read_all()
        finally:
            await response.aclose()
    except httpx.HTTPError as exc:
        return False, failure_kind(exc)
    return response.status < 500, f"http_{response.status}"

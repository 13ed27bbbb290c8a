"""What a running proxy shares between requests.

`ActiveConfig` is everything derived from one config. A reload builds a new one and swaps
it in whole: each request reads `runtime.active` once, so it is routed, limited and logged under
one consistent config version from start to end, while in-flight requests finish under
the one they started with. `Runtime` holds what outlives a config: the connection pool,
the log, live counters and verdict, each backend's health and concurrency slots.

The app's lifespan owns the runtime and hands it to every request through the ASGI
scope's state: no globals.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy.accesslog import AccessLog, RequestIds
from proxy.auth import Keys, resolve_keys
from proxy.config import Config, load_config
from proxy.config import Timeouts as BackendTimeouts
from proxy.errors import ConfigError
from proxy.health import BackendHealth, HealthBoard
from proxy.launch import Supervisor
from proxy.livestats import LiveStats
from proxy.liveverdict import LiveVerdict
from proxy.metrics import BackendGauges, Metrics
from proxy.payload import NOT_FORWARDED
from proxy.relay import WriteWatch
from proxy.replicas import Fleet
from proxy.routing import Router
from proxy.sessions import SessionHasher
from proxy.shadow import Shadower
from proxy.upstream import Endpoint, Transport, UpstreamTimeouts


@dataclass(frozen=True)
class ActiveConfig:
    """One config, with what the per-request path derives from it, built once."""

    config: Config
    version: str
    router: Router
    keys: Keys
    # Per backend, its timeouts as the upstream requests carry them: see `_upstream_timeouts`.
    upstream_timeouts: dict[str, UpstreamTimeouts]
    # Hop-by-hop headers, and those that steer the proxy itself: not forwarded to backends.
    not_forwarded: frozenset[bytes]
    # The headers the proxy itself reads (routing, request id, body size): only these are
    # decoded, of the dozen or so a client like the openai SDK sends.
    read_headers: frozenset[bytes]
    _endpoints: dict[tuple[str, str], Endpoint] = field(default_factory=dict)

    @classmethod
    def build(cls, config: Config, environ: Mapping[str, str] = os.environ) -> ActiveConfig:
        routing = config.routing
        keys = resolve_keys(config.auth, environ)
        private = {routing.header.lower().encode(), b"x-request-id"}
        if keys.client:  # the key was for the proxy: the backends need not see it
            private.add(b"authorization")
        return cls(
            config=config,
            version=config.version(),
            router=Router.build(config.weights(), routing.header, routing.sticky_header),
            keys=keys,
            upstream_timeouts={
                name: _upstream_timeouts(b.timeouts) for name, b in config.backends.items()
            },
            not_forwarded=NOT_FORWARDED | private,
            read_headers=frozenset(
                name.lower().encode("latin-1")
                for name in (routing.header, routing.sticky_header, "x-request-id")
                if name
            )
            | {b"content-length"},
        )

    def endpoint(self, replica: str, path: str) -> Endpoint:
        """A replica's URL (see replicas.py) for `path`, parsed once per path."""
        endpoint = self._endpoints.get((replica, path))
        if endpoint is None:
            endpoint = self._endpoints[replica, path] = Endpoint.parse(replica + path)
        return endpoint


def _upstream_timeouts(timeouts: BackendTimeouts) -> UpstreamTimeouts:
    """A backend's configured timeouts as the upstream pool takes them: `first_byte`, to
    the answer's head, is `first_token` (the head of a non-stream answer comes with the
    whole of it); `idle` bounds each later read."""
    return UpstreamTimeouts(timeouts.connect, timeouts.first_token, timeouts.idle)


@dataclass
class Runtime:
    active: ActiveConfig  # the config in effect: read it once per request
    transport: Transport
    log: AccessLog
    rng: random.Random
    supervisor: Supervisor | None = None  # the backends this proxy launched, if any
    config_path: Path | None = None  # what a reload reads
    sessions: SessionHasher = field(default_factory=SessionHasher)  # default: a random key
    in_flight: Counter[str] = field(default_factory=Counter)  # by backend, shadows too
    stats: LiveStats = field(default_factory=LiveStats)
    ids: RequestIds = field(default_factory=RequestIds)
    # The loop it serves on, created with it: `asyncio.current_task(loop)` then needs no
    # `get_running_loop()`, a system call (getpid) each time on Python 3.11.
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    writes: WriteWatch = field(default_factory=WriteWatch)  # clients that stopped reading
    health: HealthBoard = field(init=False)
    fleets: dict[str, Fleet] = field(init=False)  # each backend's replicas: slots, load
    shadower: Shadower = field(init=False)
    metrics: Metrics = field(init=False)
    verdict: LiveVerdict = field(init=False)
    _reloading: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        config = self.active.config
        self.log.bind(config_version=self.active.version)
        self.ids.max_length = config.limits.max_request_id_length
        self.health = HealthBoard(config, self._health_changed)
        self.fleets = {}
        self._update_fleets(config)
        self.verdict = LiveVerdict(config, self.active.version)
        self.metrics = Metrics(self._gauges, self.verdict.snapshot)
        self.shadower = Shadower(self.transport, self.in_flight, self.log, self.stats, self.metrics)

    @property
    def config(self) -> Config:
        return self.active.config

    async def reload(self, source: str) -> ActiveConfig:
        """Re-read the config file and apply it to new requests; raise `ConfigError` (the
        old config stays) when it is invalid or changes what only a restart can change."""
        async with self._reloading:
            try:
                if self.config_path is None:
                    raise ConfigError("no config file to reload: the proxy was built in code")
                config = await asyncio.to_thread(load_config, self.config_path)
                fixed = needs_restart(self.config, config)
                if fixed:
                    raise ConfigError(
                        f"{self.config_path}: {', '.join(fixed)}: changes need a restart;"
                        " nothing was applied"
                    )
                active = ActiveConfig.build(config)
            except ConfigError as exc:
                self.metrics.reload("rejected")
                self.log.event("config_rejected", source=source, error=str(exc))
                raise
            previous, self.active = self.active, active
            self._apply(config)
            self.metrics.reload("applied")
            self.log.bind(config_version=active.version)
            self.log.event(
                "config_reloaded",
                source=source,
                previous=previous.version,
                changed=previous.version != active.version,
            )
            if self.verdict.follow(config, active.version):  # a new split: a new experiment
                self.log.event("verdict_reset", reason=self.verdict.reason)
            return active

    def _apply(self, config: Config) -> None:
        """Carry health and slots over to the new config, by backend name and replica URL.
        Fleets are never dropped: requests in flight give their slots back to the limiter
        they took them from, and a backend (or replica) removed and added again finds its
        slots still counted."""
        self.ids.max_length = config.limits.max_request_id_length
        self.health.update(config)
        self._update_fleets(config)

    def _update_fleets(self, config: Config) -> None:
        for name, backend in config.backends.items():
            fleet = self.fleets.get(name)
            if fleet is None:
                self.fleets[name] = Fleet(name, backend, self.health.backends[name])
            else:
                fleet.update(backend, self.health.backends[name])

    def _gauges(self) -> tuple[str, Iterator[BackendGauges]]:
        """Each replica's state at scrape time (metrics.py sums a backend's)."""

        def each() -> Iterator[BackendGauges]:
            for name in self.health.backends:
                fleet = self.fleets.get(name)
                for replica in fleet.replicas if fleet is not None else ():
                    state = replica.health
                    yield BackendGauges(
                        name,
                        replica.url,
                        replica.in_flight,
                        replica.limiter.queued,
                        state.healthy,
                        state.ejections,
                    )

        return self.active.version, each()

    def _health_changed(self, name: str, state: BackendHealth) -> None:
        self.log.event(
            "backend_healthy" if state.healthy else "backend_ejected",
            backend=name,
            replica=state.url,
            last_error=state.last_error,
            ejections=state.ejections,
        )


# The connection pool's limits: it is built once, with the app (see app.py).
# Limits given to the pool and the server when they are built, at start.
START_LIMITS = (
    "max_connections_per_backend",
    "max_response_head_bytes",
    "max_response_body_bytes",
    "body_timeout",
)


def needs_restart(old: Config, new: Config) -> list[str]:
    """The keys whose change a reload cannot apply: the listening socket, the log file, the
    launched processes, the shutdown deadline and the pool's and the server's limits are set
    up once, at start."""
    changed = [
        key for key in ("listen", "logging", "shutdown") if getattr(old, key) != getattr(new, key)
    ]
    changed += [
        f"limits.{key}"
        for key in START_LIMITS
        if getattr(old.limits, key) != getattr(new.limits, key)
    ]
    for name in sorted(set(old.backends) | set(new.backends)):
        before, after = old.backends.get(name), new.backends.get(name)
        launch_before = before.launch if before else None
        launch_after = after.launch if after else None
        moved = before and after and before.launch and before.urls != after.urls
        if launch_before != launch_after or moved:
            changed.append(f"backends.{name}.launch")
    return changed

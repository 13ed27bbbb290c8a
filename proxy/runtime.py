"""What a running proxy shares between requests, built once from the config.

The app's lifespan owns it (and the upstream transport in it) and hands it to every request through
the ASGI scope's state: no globals.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import httpx

from proxy.accesslog import AccessLog
from proxy.config import Config
from proxy.launch import Supervisor
from proxy.livestats import LiveStats
from proxy.payload import NOT_FORWARDED
from proxy.routing import Router
from proxy.shadow import Shadower


@dataclass
class Runtime:
    config: Config
    transport: httpx.AsyncBaseTransport
    log: AccessLog
    rng: random.Random
    supervisor: Supervisor | None = None  # the backends this proxy launched, if any
    router: Router = field(init=False)
    timeouts: dict[str, dict[str, float | None]] = field(init=False)  # httpx's "timeout" extension
    # Hop-by-hop headers, and those that steer the proxy itself: not forwarded to backends.
    not_forwarded: frozenset[bytes] = field(init=False)
    in_flight: Counter[str] = field(default_factory=Counter)
    stats: LiveStats = field(default_factory=LiveStats)
    shadower: Shadower | None = field(init=False)
    _urls: dict[tuple[str, str], httpx.URL] = field(default_factory=dict)

    def __post_init__(self) -> None:
        routing = self.config.routing
        self.router = Router.build(self.config.weights(), routing.header, routing.sticky_header)
        self.timeouts = {
            name: httpx.Timeout(
                connect=backend.timeouts.connect,
                read=backend.timeouts.read,
                write=backend.timeouts.read,
                pool=backend.timeouts.connect,
            ).as_dict()
            for name, backend in self.config.backends.items()
        }
        private = {routing.header.lower().encode(), b"x-request-id"}
        self.not_forwarded = NOT_FORWARDED | private
        self.shadower = None
        if self.config.shadow is not None:
            self.shadower = Shadower(
                self.config.shadow, self.transport, self.in_flight, self.log, self.stats
            )

    def upstream_url(self, backend: str, path: str) -> httpx.URL:
        """The backend's URL for `path`, parsed once: httpx's URL parsing is not cheap."""
        url = self._urls.get((backend, path))
        if url is None:
            url = self._urls[backend, path] = httpx.URL(self.config.backends[backend].url + path)
        return url

"""Which replica of a backend serves a request. The choice is pure: no I/O, randomness injected.

A backend, an arm of the experiment, is a fleet of one or more servers (`replicas:`, or
`launch.replicas`). Routing (routing.py, failover.py) chooses the arm; this module chooses
the server within it: the healthy replica with the fewest requests on it (in flight, and
waiting for one of its slots), ties broken at random. With one replica, that one.

Everything that protects a server is per replica: its health (health.py), its slots and
queue (`max_in_flight`, `max_queue`: limits.py). A request that fails on a replica before
any byte reached the client is tried on one other healthy replica of the same arm
(`ATTEMPTS_PER_ARM`), and only then moved to the arm's fallback (chat.py `_serve`).

A replica is known by its URL: in the log (`replica`), /healthz, /stats and /metrics. A URL
is stable across reloads and reorderings, the same in every proxy with the same routes
file, and says which machine to look at; an index or a generated name would be none of
these.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from proxy.config import Backend
from proxy.health import BackendHealth
from proxy.limits import Limiter

# Replicas of one arm a request may be tried on: the first, and one more if the first
# failed before answering. Bounded, as each try may cost a whole timeout.
ATTEMPTS_PER_ARM = 2


@dataclass(slots=True, eq=False)
class Replica:
    """One server of a backend, at run time."""

    backend: str
    url: str
    limiter: Limiter  # its slots and queue
    health: BackendHealth  # the health board's entry for it
    in_flight: int = 0  # requests being answered by it


def choose(
    replicas: Sequence[Replica], rng: random.Random, tried: Collection[Replica] = ()
) -> Replica | None:
    """The replica for a request: the least loaded, ties at random; None when every one
    has been tried.

    Healthy replicas only; when none is (the arm is ejected, yet the request stays: it
    was forced by the header, or its fallback is down too), any: the health table may be
    stale. A retry (`tried` not empty) goes to a healthy replica only, else to the fallback.
    """
    if len(replicas) == 1 and not tried:
        return replicas[0]
    chosen = _least_loaded(replicas, rng, tried, healthy_only=True)
    if chosen is None and not tried:
        chosen = _least_loaded(replicas, rng, tried, healthy_only=False)
    return chosen


def _least_loaded(
    replicas: Sequence[Replica],
    rng: random.Random,
    tried: Collection[Replica],
    *,
    healthy_only: bool,
) -> Replica | None:
    """One pass (this runs on every request): the fewest requests, among equals one at
    random."""
    ties: list[Replica] = []
    least = 0
    for replica in replicas:
        if (healthy_only and not replica.health.healthy) or replica in tried:
            continue
        load = replica.in_flight + replica.limiter.queued  # answered, or waiting for a slot
        if not ties or load < least:
            ties, least = [replica], load
        elif load == least:
            ties.append(replica)
    if len(ties) < 2:
        return ties[0] if ties else None
    return ties[int(rng.random() * len(ties))]


class Fleet:
    """One backend's replicas at run time. A reload updates it in place: a replica whose
    URL stays keeps its slots and counts (requests in flight give their slot back to the
    limiter they took it from), and one removed and listed again finds them still counted."""

    def __init__(self, name: str, backend: Backend, health: dict[str, BackendHealth]):
        self.name = name
        self.replicas: tuple[Replica, ...] = ()
        self._known: dict[str, Replica] = {}
        self.update(backend, health)

    def update(self, backend: Backend, health: dict[str, BackendHealth]) -> None:
        replicas = []
        for url in backend.urls:
            replica = self._known.get(url)
            if replica is None:
                replica = self._known[url] = Replica(self.name, url, Limiter(backend), health[url])
            else:
                replica.limiter.update(backend)
                replica.health = health[url]
            replicas.append(replica)
        self.replicas = tuple(replicas)

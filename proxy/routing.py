"""Which backend serves a request, and why. Pure: no I/O, randomness is injected.

Precedence:
1. the routing header names a backend          -> that backend, reason "header"
2. the sticky header is present                -> hash of its value, reason "sticky"
3. otherwise                                   -> weighted random by the split, reason "split"

The sticky choice uses BLAKE2b, not Python's `hash()` (salted per process), so one session
id maps to one backend across restarts and across several proxy processes with no shared
state. It maps the id to a point in [0, 100) and picks the backend whose slice of the split
holds that point, so sticky traffic follows the split's proportions too.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from proxy.errors import UnknownBackendError


class Reason(StrEnum):
    """Why a request went to its backend: the log's `reason`."""

    HEADER = "header"  # the client named the backend
    STICKY = "sticky"  # the hash of its session id
    SPLIT = "split"  # the weighted random draw
    FALLBACK = "fallback"  # moved off the backend first chosen: see failover.py

    @property
    def is_experiment(self) -> bool:
        """Whether the backend was drawn at random, so the request is A/B data: chosen by
        the client or moved by a failure, it says nothing fair about the backend. The live
        stats and the report's selection both ask this, so a new reason is decided here."""
        return self in _EXPERIMENT


_EXPERIMENT = frozenset({Reason.SPLIT, Reason.STICKY})
# For `choose`: on Python 3.11 each `Reason.X` is a descriptor call (50 ns), per request.
_HEADER, _STICKY, _SPLIT = Reason.HEADER, Reason.STICKY, Reason.SPLIT


class FallbackCause(StrEnum):
    """Why a request was moved to the fallback: the log's `fallback_cause`."""

    UNHEALTHY = "unhealthy"  # its backend is ejected
    FAILED = "failed"  # its backend failed before any byte reached the client
    FULL = "full"  # its backend's concurrency limit and wait queue are full


@dataclass(frozen=True, slots=True)
class Decision:
    backend: str
    reason: Reason
    # Set when the request was moved off the backend first chosen (see health and limits).
    fallback_from: str | None = None
    fallback_cause: FallbackCause | None = None

    def moved_to(self, backend: str, cause: FallbackCause) -> Decision:
        """This request sent to `backend` instead, logged as a fallback."""
        return Decision(backend, Reason.FALLBACK, self.fallback_from or self.backend, cause)


@dataclass(frozen=True)
class Router:
    """The routing rules of a config, pre-computed once for the per-request path."""

    header: str  # lower-case, as ASGI headers are
    sticky_header: str | None
    names: tuple[str, ...]  # backends with a weight above zero, in config order
    bounds: tuple[float, ...]  # cumulative percentages, the last one 100
    all_names: frozenset[str]

    @classmethod
    def build(
        cls, weights: Sequence[tuple[str, float]], header: str, sticky_header: str | None
    ) -> Router:
        positive = [(name, weight) for name, weight in weights if weight > 0]
        bounds = list(itertools.accumulate(weight for _, weight in positive))
        bounds[-1] = 100.0  # so that float rounding never leaves a gap at the top
        return cls(
            header=header.lower(),
            sticky_header=sticky_header.lower() if sticky_header else None,
            names=tuple(name for name, _ in positive),
            bounds=tuple(bounds),
            all_names=frozenset(name for name, _ in weights),
        )

    def pick(self, point: float) -> str:
        """The backend whose slice of [0, 100) holds `point`."""
        return self.names[bisect.bisect_right(self.bounds, point)]


def choose(router: Router, headers: Mapping[str, str], rng: random.Random) -> Decision:
    """Decide the backend for one request. `headers` has lower-case names."""
    forced = headers.get(router.header)
    if forced is not None:
        forced = forced.strip()
        if forced not in router.all_names:
            valid = ", ".join(sorted(router.all_names))
            raise UnknownBackendError(
                f"unknown backend {forced!r} in header {router.header}; valid backends: {valid}",
                param=router.header,
            )
        return Decision(forced, _HEADER)
    if router.sticky_header is not None:
        key = headers.get(router.sticky_header)
        if key:
            return Decision(router.pick(sticky_point(key)), _STICKY)
    return Decision(router.pick(rng.random() * 100.0), _SPLIT)


def sticky_point(key: str) -> float:
    """A stable, uniformly spread point in [0, 100) for a sticky key."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100.0

"""Where a request goes when its backend cannot serve it. Pure decisions, no I/O.

Three causes, each logged as `reason: "fallback"` with `fallback_from` and `fallback_cause`:
- "unhealthy": the chosen backend is ejected (see health.py): its split and sticky traffic
  goes to its fallback before any attempt;
- "full": its concurrency limit and wait queue are full (see limits.py);
- "failed": it failed before any byte reached the client, so the request is retried, once,
  on the fallback. Never after bytes reached the client: they cannot be taken back.

Header-forced requests are never moved: the client asked for that backend, so it gets the
error (503 unhealthy, 429 full, or the failure itself). A fallback's own fallback is never
followed: one hop, so a request can never bounce around.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.errors import (
    BackendStatusError,
    BackendTimeoutError,
    BackendUnavailableError,
    BackendUnreachableError,
    ProxyError,
)
from proxy.routing import Decision, FallbackCause, Reason

Healthy = Callable[[str], bool]
FallbackOf = Callable[[str], str | None]


def steer(decision: Decision, healthy: Healthy, fallback_of: FallbackOf) -> Decision:
    """Move a routed request off an unhealthy backend. When its fallback is down too, the
    request stays: the health table may be stale, and an answer is still possible."""
    if healthy(decision.backend):
        return decision
    if decision.reason == Reason.HEADER:
        raise BackendUnavailableError(
            f"backend {decision.backend!r} is unhealthy (ejected after repeated failures);"
            " retry later or send the request without the routing header"
        )
    other = fallback_of(decision.backend)
    if other is None or not healthy(other):
        return decision
    return decision.moved_to(other, FallbackCause.UNHEALTHY)


def overflow(decision: Decision, fallback_of: FallbackOf) -> Decision | None:
    """Where a request goes when its backend is full, or None (then: 429)."""
    if decision.reason == Reason.HEADER or decision.fallback_from is not None:
        return None  # forced, or already moved once
    other = fallback_of(decision.backend)
    return None if other is None else decision.moved_to(other, FallbackCause.FULL)


def retry(
    decision: Decision, error: ProxyError, healthy: Healthy, fallback_of: FallbackOf
) -> Decision | None:
    """Where to retry a request whose backend failed before answering, or None."""
    if decision.reason == Reason.HEADER or decision.fallback_from is not None:
        return None  # forced, or already moved once (for any cause): one hop at most
    if not backend_failed(error):
        return None
    other = fallback_of(decision.backend)
    if other is None or not healthy(other):
        return None
    return decision.moved_to(other, FallbackCause.FAILED)


def backend_failed(error: ProxyError) -> bool:
    """The backend's fault (counts against its health): unreachable, timed out, or 5xx.
    A 4xx is the request's fault, and says the backend is alive."""
    if isinstance(error, BackendStatusError):
        return error.status >= 500
    return isinstance(error, BackendUnreachableError | BackendTimeoutError)

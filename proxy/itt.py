"""Which request counts for which arm, and as what: the one rule of the live verdict
(`liveverdict.py`) and the report's (`report_verdict.py`), so the two cannot drift.

Intention to treat: a request counts for the arm it was assigned to at random (split or
sticky, `Reason.is_experiment`), whatever happened to it next, and only what that arm's
backend did is its error.

- Moved off its arm by failover (`reason: fallback`, `fallback_from: X`): an error of X,
  whatever the cause (`failed`: X failed before answering; `unhealthy`: X was ejected;
  `full`: X's slots and wait queue were full) and whatever the fallback then did. Dropping
  these would drop exactly the arm's failures. `full` is a capacity refusal, and counts:
  an arm that holds its slots longer (a slower one) fills first under the same traffic,
  so refusing is part of what the arm does; with unequal `max_in_flight`/`max_queue` per
  arm this measures the configuration too, so set them alike for a fair comparison.
  Header-forced requests are never moved out of their arm, so a moved one was always
  assigned at random.
- Served where assigned with an `error` the backend caused (`BACKEND_ERRORS`: unreachable,
  timed out, an error status, a broken or incomplete stream, an error event): an error.
- The client stopped reading (`client_write_timeout`), left, or the proxy cut the request
  at shutdown (`cancelled`): nothing. Neither an error (the backend did not fail) nor a
  timing (clients give up more on the slower arm, so keeping them would flatter it).
- Answered whole (status 200, no error, client there): a success, with its timings.
- Header-forced, behind a shadow check (its timings share the backend with the shadow), or
  rejected before routing: nothing.

A non-stream answer's TTFT is all of it, so the callers take TTFT from streams only.
"""

from __future__ import annotations

from enum import Enum

from proxy.errors import (
    STREAM_ERROR_EVENT,
    STREAM_INCOMPLETE,
    STREAM_INTERRUPTED,
    BackendAnswerTooLargeError,
    BackendStatusError,
    BackendTimeoutError,
    BackendUnreachableError,
)
from proxy.routing import Reason

# The log's `error` values that are the backend's doing (docs/log-schema.md): the kinds of
# the backend's errors (`failover.backend_failed`'s classes, and a 4xx too: whatever the
# request, the arm did not serve it, and random assignment sends the same requests to
# both), and what relay.py names a stream that broke after it started.
BACKEND_ERRORS = frozenset(
    {
        BackendUnreachableError.kind,
        BackendAnswerTooLargeError.kind,
        BackendTimeoutError.kind,
        BackendStatusError.kind,
        STREAM_INTERRUPTED,
        STREAM_INCOMPLETE,
        STREAM_ERROR_EVENT,
    }
)


class Outcome(Enum):
    ANSWERED = "answered"  # error rate 0, and its timings
    FAILED = "failed"  # error rate 1, no timings


def assigned(
    reason: Reason | None,
    backend: str | None,
    fallback_from: str | None,
    *,
    error: str | None,
    status: int | None,
    client_disconnected: bool,
    behind_shadow: bool,
) -> tuple[str, Outcome] | None:
    """The arm a request line counts for and how, or None when it counts for nothing."""
    if fallback_from is not None or reason is Reason.FALLBACK:
        return (fallback_from, Outcome.FAILED) if fallback_from is not None else None
    if reason is None or not reason.is_experiment or backend is None or behind_shadow:
        return None
    if error is not None:
        return (backend, Outcome.FAILED) if error in BACKEND_ERRORS else None
    if client_disconnected or status is None:
        return None
    return backend, Outcome.ANSWERED if status == 200 else Outcome.FAILED

"""The per-request clock: what is measured, and how the logged figures derive from it.

All marks are `time.perf_counter()` seconds; the figures are milliseconds (or tokens/s).
- received: when the proxy's server had parsed the request head (`RECEIVED_AT` in the
           scope's extensions), so a wait inside the proxy before the request's handler
           ran counts; under another ASGI server (uvicorn), when the handler started.
- ttft:    received -> first chunk with generated content (stream), or -> the backend's
           response headers (non-stream).
- latency: received -> last byte sent to the client.
- decode:  (completion_tokens - 1) / (last content chunk - first content chunk), streams
           only: it leaves prefill out, which is what a draft model cannot speed up.
- queue:   the waits for a concurrency slot (see limits.py), summed over the attempts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Clock:
    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    end: float | None = None
    queue: float | None = None  # seconds; None: never waited for a slot (refused before)

    def queued(self, seconds: float) -> None:
        """A wait for a concurrency slot is over (or gave up) after `seconds`."""
        self.queue = (self.queue or 0.0) + seconds

    def token(self) -> None:
        """A chunk carrying generated content has just arrived."""
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        self.last_token = now

    def headers(self) -> None:
        """The backend's response headers arrived: TTFT for a non-stream answer."""
        self.first_token = time.perf_counter()

    def finish(self) -> None:
        """The last byte went out (the first call counts; later ones change nothing)."""
        if self.end is None:
            self.end = time.perf_counter()

    def ttft_ms(self) -> float | None:
        return _ms(self.first_token - self.start) if self.first_token is not None else None

    def latency_ms(self) -> float | None:
        return _ms(self.end - self.start) if self.end is not None else None

    def queue_ms(self) -> float | None:
        return _ms(self.queue) if self.queue is not None else None

    def decode_tps(self, completion_tokens: int | None) -> float | None:
        if completion_tokens is None or completion_tokens < 2:
            return None
        if self.first_token is None or self.last_token is None:
            return None
        elapsed = self.last_token - self.first_token
        if elapsed <= 0:
            return None
        return round((completion_tokens - 1) / elapsed, 3)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)

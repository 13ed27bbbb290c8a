"""Per-backend concurrency limits: at most `max_in_flight` requests, then a bounded queue.

A request takes a slot at once when one is free. Otherwise it waits in a FIFO queue of at
most `max_queue` requests, for at most `queue_timeout` seconds. A full queue, or a wait that
times out, raises `Full`; the caller decides what that means (overflow to the fallback, or
429). The queue is fair: a freed slot goes to the longest waiter, never to a newcomer.

A config reload changes the limits in place, so requests already holding a slot or
waiting keep their place.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from proxy.config import Backend


class Full(Exception):
    """No slot: the queue is full, or the wait for a slot timed out (after `waited` s)."""

    def __init__(self, message: str, retry_after: int, waited: float = 0.0):
        super().__init__(message)
        self.retry_after = retry_after
        self.waited = waited


class _Expired(Exception):
    pass


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(_Expired())


class Limiter:
    def __init__(self, backend: Backend) -> None:
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.update(backend)

    def update(self, backend: Backend) -> None:
        self.limit = backend.max_in_flight  # None: no limit
        self.max_queue = backend.max_queue
        self.timeout = backend.queue_timeout
        self._wake()  # a higher limit frees slots for those waiting

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> float:
        """Take a slot; the seconds spent waiting for it."""
        if self.limit is None or (self.active < self.limit and not self._waiters):
            self.active += 1
            return 0.0
        if len(self._waiters) >= self.max_queue:
            raise Full(
                f"{self.active} requests in flight (limit {self.limit})"
                f" and {len(self._waiters)} waiting (limit {self.max_queue})",
                retry_after=1,
            )
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        # A timer rather than `wait_for`: a slot handed over just as the wait times out
        # must not be lost, and here the waiter is either given a slot or expired, not both.
        timer = loop.call_later(self.timeout, _expire, waiter)
        try:
            await waiter
        except _Expired:
            raise Full(
                f"no free slot within {self.timeout:g} s (limit {self.limit})",
                retry_after=math.ceil(self.timeout),
                waited=time.perf_counter() - started,
            ) from None
        except BaseException:  # cancelled (the client left): pass on a slot given meanwhile
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()
            raise
        finally:
            timer.cancel()
            if waiter in self._waiters:  # expired or cancelled: not popped by `_wake`
                self._waiters.remove(waiter)
        return time.perf_counter() - started

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def _wake(self) -> None:
        """Hand free slots to the longest waiters. The slot is taken here, on their behalf,
        so a newcomer cannot take it between the wake-up and the waiter running."""
        while self._waiters and (self.limit is None or self.active < self.limit):
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)

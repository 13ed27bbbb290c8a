"""The shadow check: does the other backend give the same greedy answer?

For a sampled share of greedy requests served by `shadow.from`, the proxy sends the same
request to `shadow.to` once the client has its whole answer, in the background, and logs
one `event: "shadow"` line comparing the two completions and their latencies (a fully
paired latency sample). It never delays or alters the client's answer, and never queues:
when the target already has `max_in_flight` requests (real ones included), the shadow is
dropped (`event: "shadow_dropped"`). Shadow requests are not request lines, so they never
enter the A/B figures.

Speculative decoding in mlx-lm is known to change some greedy outputs even with the model
as its own draft (a batched verify pass flips near-ties), so a mismatch is information.
"""

from __future__ import annotations

import asyncio
import difflib
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from proxy.accesslog import AccessLog
from proxy.config import Shadow
from proxy.livestats import LiveStats
from proxy.metrics import Metrics
from proxy.payload import ChatRequest
from proxy.sse import EventSplitter, Kind, classify, generated, split_events
from proxy.upstream import Transport, UpstreamRequest, UpstreamResponse

# difflib's ratio is quadratic at worst: compare at most this much of each text.
SIMILARITY_CHARS = 4000


def is_greedy(body: dict[str, Any]) -> bool:
    """Temperature 0, or unset (mlx_lm.server's default is greedy), and one choice."""
    return body.get("temperature") in (None, 0) and body.get("n") in (None, 1)


def comparable(body: dict[str, Any]) -> bool:
    """Only the text is compared: tool calls and their arguments are not (yet)."""
    return not body.get("tools") and not body.get("functions")


def wants_shadow(
    shadow: Shadow | None, request: ChatRequest, backend: str, rng: random.Random
) -> bool:
    """Whether this request, about to go to `backend`, gets a shadow (pure)."""
    if shadow is None or backend != shadow.source:
        return False
    if not is_greedy(request.body) or not comparable(request.body):
        return False
    return rng.random() < shadow.sample


def common_prefix(a: str, b: str) -> int:
    """How many characters the two texts share before they first differ."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return min(len(a), len(b))


def compare(primary: str, other: str) -> dict[str, Any]:
    return {
        "match": primary == other,
        "common_prefix_chars": common_prefix(primary, other),
        "similarity": round(
            difflib.SequenceMatcher(
                None, primary[:SIMILARITY_CHARS], other[:SIMILARITY_CHARS], autojunk=False
            ).ratio(),
            4,
        ),
        "from_chars": len(primary),
        "to_chars": len(other),
    }


@dataclass(frozen=True)
class Mirror:
    """A finished request to send again to the shadow target."""

    request: UpstreamRequest  # to the target
    stream: bool
    request_id: str
    primary: str  # the text the client received
    primary_latency_ms: float | None


class Shadower:
    def __init__(
        self,
        transport: Transport,
        in_flight: Counter[str],
        log: AccessLog,
        stats: LiveStats,
        metrics: Metrics,
    ):
        self._transport = transport
        self._in_flight = in_flight
        self._log = log
        self._stats = stats
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self.running: Counter[str] = Counter()  # shadows in flight, by target

    def submit(self, shadow: Shadow, mirror: Mirror) -> None:
        """Start the shadow in the background, or drop it if the target is busy. `shadow`
        is the config that chose the request (a reload may have changed it since)."""
        target = shadow.target
        if self._in_flight[target] >= shadow.max_in_flight:
            self._metrics.shadow("dropped")
            self._log.event(
                "shadow_dropped",
                request_id=mirror.request_id,
                **{"from": shadow.source},
                to=target,
                in_flight=self._in_flight[target],
            )
            return
        self._in_flight[target] += 1  # at once: the next request already sees it busy
        self.running[target] += 1
        task = asyncio.ensure_future(self._run(shadow, mirror))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, shadow: Shadow, mirror: Mirror) -> None:
        fields: dict[str, Any] = {
            "request_id": mirror.request_id,
            "from": shadow.source,
            "to": shadow.target,
            "from_latency_ms": mirror.primary_latency_ms,
        }
        started = time.perf_counter()
        try:
            other = await _completion_text(self._transport, mirror.request, mirror.stream)
        except (httpx.HTTPError, ShadowError) as exc:
            fields.update(error=type(exc).__name__, to_latency_ms=None)
            self._metrics.shadow("failed")
        else:
            fields.update(compare(mirror.primary, other), error=None)
            fields["to_latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
            self._stats.observe_shadow(shadow.source, fields["match"])
            self._metrics.shadow("match" if fields["match"] else "mismatch")
        finally:
            self._in_flight[shadow.target] -= 1
            self.running[shadow.target] -= 1
        self._log.event("shadow", **fields)


class ShadowError(Exception):
    """The shadow target answered, but not with a usable completion."""


async def _completion_text(transport: Transport, request: UpstreamRequest, stream: bool) -> str:
    response = await transport.send(request)
    try:
        if response.status != 200:
            raise ShadowError(f"HTTP {response.status}")
        if stream:
            return await _stream_text(response)
        return _message_text(await response.read_all())
    finally:
        await response.aclose()


async def _stream_text(response: UpstreamResponse) -> str:
    splitter, parts = EventSplitter(), []
    while chunk := await response.body.read():
        for raw in split_events(splitter.feed(chunk)):
            event = classify(raw)
            if event.kind is Kind.CONTENT:
                parts.append(event.text)
            elif event.kind is Kind.ERROR:
                raise ShadowError("error event mid-stream")
            elif event.kind is Kind.DONE:
                return "".join(parts)
    raise ShadowError("the stream ended before [DONE]")


def _message_text(body: bytes) -> str:
    try:
        choice = orjson.loads(body)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ShadowError("not a chat completion") from None
    if not isinstance(choice, dict):
        raise ShadowError("not a chat completion")
    return generated(choice) or ""

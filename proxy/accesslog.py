"""The one JSON log line per request (and the proxy's other events), via structlog.

No global structlog configuration: an `AccessLog` owns its logger, writing each line to
stdout and appending it to the configured file. Besides the request lines it carries the
proxy's other events (`rejected`, `backend_ready`, `backend_exit`, `backend_memory`...).
Lines are flushed as written, so a crash loses nothing and `tail -f` sees each at once.

Two ways to one line, one chain of processors (`_stamp`, `_render`). Events go through
structlog's bound logger. The request line, one per request, runs the same chain itself
(`AccessLog.request`): the bound logger's layers of calls, each copying the fields, cost
2.7 µs more per line (`scripts/bench_app.py`: 6.2 µs against 3.5 µs), a tenth of the
app's own CPU for a non-stream request (25 µs).
"""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import structlog

from proxy.routing import FallbackCause, Reason


class RequestIds:
    """Request ids: the client's if it sent one, else 128 random bits in hex. The bits come
    from a generator seeded once from the OS rather than `os.urandom` each time, which was
    a system call per request; each proxy process has its own seed. Unique, not secret:
    ids correlate lines and answers, and nothing is authorised by one.

    A client's id is echoed, forwarded and written to every line of its request, so one
    longer than `max_length` or with anything but printable ASCII in it is replaced by a
    generated one (as Heroku's router does), rather than refused: the request is fine."""

    def __init__(self, max_length: int = 200) -> None:
        self._bits = random.Random(os.urandom(32)).getrandbits
        self.max_length = max_length  # `limits.max_request_id_length`, set by the runtime

    def __call__(self, given: str | None = None) -> str:
        if given and len(given) <= self.max_length and given.isascii() and given.isprintable():
            return given
        return f"{self._bits(128):032x}"


@dataclass(slots=True)  # slots: a misspelt field is an error, not an extra key in the log
class RequestRecord:
    """The request line (`event: "request"`): the one definition of the log's schema.

    Its fields, in this order, are the line's fields besides `event`, `timestamp` and the
    bound `config_version`; the report's reader (`logread`) takes its field list and types
    from here. Built once, when the request is over (chat.py `_record`): nothing decides
    anything by reading it.
    """

    request_id: str
    config_version: str | None = None  # the routes config that routed it (hot reloads)
    model: str | None = None  # as the client named it; null: rejected before the body parsed
    stream: bool = False
    backend: str | None = None  # where it went last; null: rejected before routing
    replica: str | None = None  # the URL of the backend's server it went to last (replicas.py)
    reason: Reason | None = None  # why it went there
    fallback_from: str | None = None  # the backend first chosen, when it went elsewhere
    fallback_cause: FallbackCause | None = None  # why it was moved
    queue_ms: float | None = None  # wait for a concurrency slot; null: never admitted
    status: int | None = None  # the status sent, or the one it failed with (499: client left)
    ttft_ms: float | None = None  # see timing.py: each figure is defined there
    latency_ms: float | None = None
    prompt_tokens: int | None = None  # the backend's usage
    completion_tokens: int | None = None
    decode_tps: float | None = None  # streams only
    in_flight: int | None = None  # other requests on its replica when it was sent
    error: str | None = None  # what went wrong, by its short name (an error's `kind`)
    client_disconnected: bool = False  # the client left (or stopped reading) before the end
    # A shadow was running on this backend when the request was sent: a speculative
    # mlx_lm.server serves one at a time, so it may have waited. The report leaves it out.
    behind_shadow: bool = False
    # The client sent an x-request-id that was too long or not printable ASCII: `request_id`
    # is a generated one instead (see `RequestIds`).
    request_id_replaced: bool = False
    # The sticky header's session, as a keyed hash (never the value itself): the unit the
    # report's statistics resample when traffic is sticky. Null without a sticky header.
    session: str | None = None


# The request line's fields in order, and one C call that reads them all: not
# dataclasses.asdict, which deep-copies, and this runs once per request.
_RECORD_FIELDS = tuple(f.name for f in fields(RequestRecord))
_read_fields = attrgetter(*_RECORD_FIELDS)


def _stamp(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog's `TimeStamper(fmt="iso", utc=True)`, the same text ("...T12:00:00.500000Z"),
    written by orjson: formatting it in Python was a third of a request line's cost."""
    event_dict["timestamp"] = datetime.now(UTC)
    return event_dict


def _render(_logger: Any, _method: str, event_dict: dict[str, Any]) -> bytes:
    """structlog's `JSONRenderer(serializer=orjson.dumps)`, one layer less: the line as
    bytes, with its newline."""
    return orjson.dumps(event_dict, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_UTC_Z)


class _Sinks:
    """A structlog "logger": `msg(line)` writes the rendered line to every sink, each in
    one unbuffered write (bytes end to end, as structlog's performance notes advise: the
    text layer and its flush were a measurable share of the proxy's CPU)."""

    def __init__(self, sinks: list[BinaryIO]):
        self._sinks = sinks

    def msg(self, line: bytes) -> None:
        for sink in self._sinks:
            sink.write(line)
            sink.flush()  # a no-op on the unbuffered file; stdout may be buffered

    info = warning = error = msg


class AccessLog:
    def __init__(self, path: Path | None, *, stdout: bool = True):
        self._file: BinaryIO | None = None
        sinks: list[BinaryIO] = [sys.stdout.buffer] if stdout else []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("ab", buffering=0)
            sinks.append(self._file)
        self._sinks = _Sinks(sinks)
        self._processors: list[Any] = [_stamp, _render]
        # `.bind()` now: the lazy proxy `wrap_logger` returns would rebuild the bound
        # logger on every call, a third of the cost of a log line.
        self.logger = structlog.wrap_logger(
            self._sinks,
            processors=self._processors,
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        ).bind()
        self._context: dict[str, Any] = {}

    def bind(self, **fields: Any) -> None:
        """Add fields to every later line (the proxy's config_version)."""
        self.logger = self.logger.bind(**fields)
        self._context = dict(structlog.get_context(self.logger))

    def request(self, record: RequestRecord) -> None:
        # The bound logger's own steps (context first, then the processors), without its
        # layers: see the module's docstring.
        line: Any = self._context.copy()
        line.update(zip(_RECORD_FIELDS, _read_fields(record), strict=True))
        line["event"] = "request"
        for processor in self._processors:
            line = processor(self._sinks, "info", line)
        self._sinks.msg(line)

    def rejected(
        self,
        request_id: str,
        status: int | None,
        error: str,
        *,
        method: str | None = None,
        path: str | None = None,
        client: str | None = None,
        detail: str | None = None,
    ) -> None:
        """A request refused before it could be served: bad HTTP (the server), a key or
        token missing (access control), no such route or model. One shape, whoever
        refused it: the fields not known (a request line too broken to read) are null."""
        self.logger.info(
            "rejected",
            request_id=request_id,
            method=method,
            path=path,
            status=status,
            error=error,
            client=client,
            detail=detail,
        )

    def event(self, name: str, **fields: Any) -> None:
        self.logger.info(name, **fields)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

"""Reading the request logs: files, globs or stdin -> counts and plain arrays, one per field.

LOG is a file or a glob (several proxy processes may each write one); `-` or no LOG reads
stdin. DuckDB's JSON reader parses each line once: `event == "request"` lines are requests,
`shadow` and `shadow_dropped` lines the shadow check, other events are counted and ignored;
a line that is not JSON, or JSON without an `event`, is counted as `skipped`, never fatal.
A field of the wrong type reads as missing (so does a timestamp outside years 1-9999);
blank lines are not counted.

Nothing here judges the figures: that is `proxy.report`.
"""

from __future__ import annotations

import dataclasses
import glob
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.int32]


class UsageError(Exception):
    """Bad arguments or unreadable input: exit 2 with this message."""


@dataclass(frozen=True)
class Requests:
    """The request lines, one array entry per line. Missing numbers are NaN; `backend` holds
    an index into `names` (-1: rejected before routing)."""

    names: tuple[str, ...]
    backend: Ints
    split: Bools  # reason == "split"
    sticky: Bools
    header: Bools
    status: Floats
    error: Bools  # error is not null
    client_disconnected: Bools
    stream: Bools
    behind_shadow: Bools  # sent while a shadow ran on its backend
    ttft_ms: Floats
    latency_ms: Floats
    decode_tps: Floats
    completion_tokens: Floats
    in_flight: Floats
    timestamp: Floats  # seconds since the epoch

    def of(self, name: str) -> Bools:
        mask: Bools = self.backend == self.names.index(name)
        return mask

    @property
    def ok(self) -> Bools:
        """Answered whole: a stream the client left is no latency sample (clients give up
        more on the slower arm, so keeping them would flatter it)."""
        mask: Bools = (self.status == 200) & ~self.error & ~self.client_disconnected
        return mask

    @property
    def comparable(self) -> Bools:
        """Randomly routed, successful, and not queued behind a shadow check: the only
        fair A/B sample."""
        return (self.split | self.sticky) & self.ok & ~self.behind_shadow


@dataclass(frozen=True)
class Shadows:
    """The `shadow` and `shadow_dropped` lines."""

    pair: list[tuple[str, str]]  # (from, to) per line
    dropped: Bools
    match: Bools
    error: Bools
    similarity: Floats
    common_prefix_chars: Floats
    from_latency_ms: Floats
    to_latency_ms: Floats


@dataclass(frozen=True)
class LogData:
    files: list[str]
    counts: dict[str, int]  # lines (blank ones aside), skipped (not JSON, or no event)
    events: dict[str, int]  # every event name -> lines
    requests: Requests
    shadows: Shadows


def load_logs(patterns: Sequence[str]) -> LogData:
    """LOG arguments (files, globs, `-`; none is stdin) -> everything `read_logs` finds, with
    the files as named (stdin stays `-`)."""
    files = expand_logs(patterns)
    with stdin_as_file(files) as readable:
        return dataclasses.replace(read_logs(readable), files=files)


def expand_logs(patterns: Sequence[str]) -> list[str]:
    """LOG arguments -> files, globs expanded in order; `-` stays `-` (stdin)."""
    files: list[str] = []
    for pattern in patterns or ["-"]:
        if pattern == "-":
            files.append("-")
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern) if Path(p).is_file())
            if not matches:
                raise UsageError(f"{pattern}: no file matches")
            files.extend(matches)
        elif Path(pattern).is_file():
            files.append(pattern)
        else:
            raise UsageError(f"{pattern}: no such file")
    return list(dict.fromkeys(files))  # a file named twice (a glob and by name) counts once


@contextmanager
def stdin_as_file(files: list[str]) -> Iterator[list[str]]:
    """DuckDB reads files: stdin, if asked for, is copied to a temporary one first."""
    if "-" not in files:
        yield files
        return
    with tempfile.NamedTemporaryFile(prefix="specproxy-stdin-", suffix=".jsonl") as tmp:
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is not None:
            shutil.copyfileobj(buffer, tmp)
        else:  # a text stream without bytes underneath (tests, embedding)
            tmp.write(sys.stdin.read().encode())
        tmp.flush()
        yield [tmp.name if f == "-" else f for f in files]


_FIELDS = {
    "event": "VARCHAR",
    "timestamp": "VARCHAR",
    "backend": "VARCHAR",
    "reason": "VARCHAR",
    "status": "DOUBLE",
    "ttft_ms": "DOUBLE",
    "latency_ms": "DOUBLE",
    "completion_tokens": "DOUBLE",
    "decode_tps": "DOUBLE",
    "in_flight": "DOUBLE",
    "error": "JSON",
    "client_disconnected": "BOOLEAN",
    "stream": "BOOLEAN",
    "behind_shadow": "BOOLEAN",
    "from": "VARCHAR",
    "to": "VARCHAR",
    "match": "BOOLEAN",
    "similarity": "DOUBLE",
    "common_prefix_chars": "DOUBLE",
    "from_latency_ms": "DOUBLE",
    "to_latency_ms": "DOUBLE",
}

# DuckDB's own newline-delimited JSON reader, parallel and about 7x faster than parsing
# lines as text with json_transform. With ignore_errors a line that is not JSON becomes a
# row of NULLs (so does JSON without these keys: both are `skipped`), a field of the wrong
# type reads as NULL, and blank lines are dropped.
_READ = """
CREATE TEMP TABLE log AS
SELECT * FROM read_ndjson(?, columns = {columns}, ignore_errors = true)
"""

# DuckDB parses timestamps far beyond what Python's datetime can show (year 99999 is fine
# to it): those read as missing rather than crash the report's time span.
_REQUESTS = """
SELECT coalesce(list_position(?, backend), 0)::INT - 1 AS backend,
       coalesce(reason = 'split', false) AS split,
       coalesce(reason = 'sticky', false) AS sticky,
       coalesce(reason = 'header', false) AS header,
       coalesce(error IS NOT NULL AND error != 'null', false) AS error,
       coalesce(client_disconnected, false) AS client_disconnected,
       coalesce(stream, false) AS stream,
       coalesce(behind_shadow, false) AS behind_shadow,
       {numbers},
       coalesce(epoch(CASE WHEN ts BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00'
                      THEN ts END), 'nan') AS timestamp
FROM (SELECT *, try_cast(timestamp AS TIMESTAMPTZ) AS ts FROM log WHERE event = 'request')
"""
_REQUEST_NUMBERS = (
    "status", "ttft_ms", "latency_ms", "decode_tps", "completion_tokens", "in_flight"
)  # fmt: skip

_SHADOWS = """
SELECT coalesce("from", '') AS "from", coalesce("to", '') AS "to",
       event = 'shadow_dropped' AS dropped,
       coalesce(match, false) AS match,
       coalesce(error IS NOT NULL AND error != 'null', false) AS error,
       {numbers}
FROM log WHERE event IN ('shadow', 'shadow_dropped')
"""
_SHADOW_NUMBERS = ("similarity", "common_prefix_chars", "from_latency_ms", "to_latency_ms")
_EVENTS = "SELECT event, count(*) FROM log WHERE event IS NOT NULL GROUP BY 1 ORDER BY 1"


def read_logs(files: Sequence[str]) -> LogData:
    """Every line of `files`, counted by event, with the request and shadow lines as arrays."""
    import duckdb

    con = duckdb.connect()
    try:
        columns = "{" + ", ".join(f"'{k}': '{v}'" for k, v in _FIELDS.items()) + "}"
        con.execute(_READ.format(columns=columns), [list(files)])
        lines, skipped = con.execute(
            "SELECT count(*), count(*) FILTER (event IS NULL) FROM log"
        ).fetchone() or (0, 0)
        events = dict(con.execute(_EVENTS).fetchall())
        counts = {"lines": lines, "skipped": skipped}
        return LogData(list(files), counts, events, _requests(con), _shadows(con))
    except duckdb.Error as exc:
        raise UsageError(f"cannot read the logs: {exc}") from None
    finally:
        con.close()


def _numbers(names: Sequence[str]) -> str:
    return ", ".join(f"coalesce({name}::DOUBLE, 'nan') AS {name}" for name in names)


def _requests(con: Any) -> Requests:
    names = [
        row[0]
        for row in con.execute(
            "SELECT DISTINCT backend FROM log WHERE event = 'request' AND backend IS NOT NULL"
            " ORDER BY 1"
        ).fetchall()
    ]
    sql = _REQUESTS.format(numbers=_numbers(_REQUEST_NUMBERS))
    columns = con.execute(sql, [names]).fetchnumpy()
    return Requests(names=tuple(names), **{k: np.asarray(v) for k, v in columns.items()})


def _shadows(con: Any) -> Shadows:
    columns = con.execute(_SHADOWS.format(numbers=_numbers(_SHADOW_NUMBERS))).fetchnumpy()
    arrays = {k: np.asarray(v) for k, v in columns.items()}
    pair = list(zip(arrays.pop("from").tolist(), arrays.pop("to").tolist(), strict=True))
    return Shadows(pair=pair, **arrays)

"""Reading the request logs: files, globs or stdin -> counts and plain arrays, one per field.

LOG is a file or a glob (several proxy processes may each write one); `-` or no LOG reads
stdin. The request line's fields and their types are `RequestRecord`'s (accesslog.py), and
which lines are A/B data is `Reason.is_experiment`'s to say (routing.py): neither is
restated here. DuckDB's JSON reader parses each line once: `event == "request"` lines are requests,
`shadow` and `shadow_dropped` lines the shadow check, `backend_memory` lines each
backend's resident memory, other events are counted and ignored;
a line that is not JSON, or JSON without an `event`, is counted as `skipped`, never fatal.
A field of the wrong type reads as missing (so does a timestamp outside years 1-9999);
blank lines are not counted. Logs written before failover, concurrency limits and hot
reload lack `config_version`, `fallback_from`, `fallback_cause` and `queue_ms`: those read
as missing, and such lines count as one config version, `unknown`.

Nothing here judges the figures: that is `proxy.report`.
"""

from __future__ import annotations

import dataclasses
import glob
import shutil
import sys
import tempfile
import typing
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.accesslog import RequestRecord
from proxy.routing import Reason

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.int32]

UNKNOWN_VERSION = "unknown"  # the config version of lines without one (older logs)


class UsageError(Exception):
    """Bad arguments or unreadable input: exit 2 with this message."""


@dataclass(frozen=True)
class Requests:
    """The request lines, one array entry per line. Missing numbers are NaN. `backend` and
    `fallback_from` hold an index into `names` (-1: rejected before routing, or not moved),
    `fallback_cause` one into `causes` (-1: none given), `error_kind` one into `errors`
    (-1: no error), `config_version` one into `versions` (lines without one are
    `unknown`)."""

    names: tuple[str, ...]  # every backend that served a request or was moved away from
    causes: tuple[str, ...]
    versions: tuple[str, ...]
    errors: tuple[str, ...]
    backend: Ints
    # Each reason excludes `moved`: a line naming the backend it was moved from is a move,
    # whatever its reason says.
    split: Bools  # reason == "split"
    sticky: Bools
    header: Bools
    moved: Bools  # reason == "fallback" (or a fallback_from given): not where it was routed
    experiment: Bools  # a reason that makes A/B data (`Reason.is_experiment`), not moved
    fallback_from: Ints
    fallback_cause: Ints
    config_version: Ints
    status: Floats
    error: Bools  # error is not null
    error_kind: Ints  # which error: the verdict counts only the backend's (itt.py)
    client_disconnected: Bools
    stream: Bools
    behind_shadow: Bools  # sent while a shadow ran on its backend
    ttft_ms: Floats
    latency_ms: Floats
    decode_tps: Floats
    prompt_tokens: Floats
    completion_tokens: Floats
    in_flight: Floats
    queue_ms: Floats  # wait for a concurrency slot
    timestamp: Floats  # seconds since the epoch
    # The sticky session, numbered 0.. in no meaningful order (-1: none). Only which lines
    # share a session matters to the statistics, never its value.
    session: Ints
    # The server of its backend it went to last: an index into `replicas` (-1: none, as in
    # logs written before fleets). Read by report_replicas only.
    replica: Ints
    replicas: tuple[str, ...]

    def of(self, name: str) -> Bools:
        mask: Bools = self.backend == self.names.index(name)
        return mask

    @property
    def served(self) -> tuple[str, ...]:
        """The backends that served at least one of these requests."""
        counts = np.bincount(self.backend[self.backend >= 0], minlength=len(self.names))
        return tuple(name for name, count in zip(self.names, counts, strict=True) if count)

    def in_versions(self, versions: Iterable[str]) -> Bools:
        codes = [self.versions.index(v) for v in versions if v in self.versions]
        mask: Bools = np.isin(self.config_version, codes)
        return mask

    def where(self, mask: Bools) -> Requests:
        """Only the lines `mask` selects; the name tables stay as they are."""
        arrays: dict[str, Any] = {
            field.name: value[mask]
            for field in dataclasses.fields(self)
            if isinstance(value := getattr(self, field.name), np.ndarray)
        }
        return dataclasses.replace(self, **arrays)

    @property
    def ok(self) -> Bools:
        """Answered whole: a stream the client left is no latency sample (clients give up
        more on the slower arm, so keeping them would flatter it)."""
        mask: Bools = (self.status == 200) & ~self.error & ~self.client_disconnected
        return mask

    @property
    def comparable(self) -> Bools:
        """Randomly routed, served where routed (not moved by failover), successful, and not
        queued behind a shadow check: the only fair A/B sample."""
        mask: Bools = self.experiment & self.ok & ~self.behind_shadow
        return mask


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
class Memory:
    """The `backend_memory` lines: one backend's resident memory, every 10 s (launch.py)."""

    backend: list[str]
    rss_mb: Floats
    timestamp: Floats


@dataclass(frozen=True)
class LogData:
    files: list[str]
    counts: dict[str, int]  # lines (blank ones aside), skipped (not JSON, or no event)
    events: dict[str, int]  # every event name -> lines
    requests: Requests
    shadows: Shadows
    memory: Memory = dataclasses.field(
        default_factory=lambda: Memory([], np.array([]), np.array([]))
    )


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


def _column_type(annotation: Any) -> str:
    """The DuckDB type a field of the request line is read as: numbers as DOUBLE (a field
    of the wrong type then reads as missing, whatever its kind), enums as their text."""
    [kind] = [k for k in typing.get_args(annotation) or (annotation,) if k is not type(None)]
    if issubclass(kind, bool):
        return "BOOLEAN"
    if issubclass(kind, int | float):
        return "DOUBLE"
    if issubclass(kind, str):
        return "VARCHAR"
    raise TypeError(f"RequestRecord: no column type for {annotation!r}")


# The request line's fields and their types, from its one definition (`RequestRecord`).
REQUEST_FIELDS: dict[str, str] = {
    name: _column_type(annotation)
    for name, annotation in typing.get_type_hints(RequestRecord).items()
}
# The shadow lines' own fields (their schema is `proxy.shadow`'s).
_SHADOW_FIELDS = {
    "from": "VARCHAR",
    "to": "VARCHAR",
    "match": "BOOLEAN",
    "similarity": "DOUBLE",
    "common_prefix_chars": "DOUBLE",
    "from_latency_ms": "DOUBLE",
    "to_latency_ms": "DOUBLE",
}
_MEMORY_FIELDS = {"rss_mb": "DOUBLE"}  # with `backend` (launch.py's `backend_memory`)
_FIELDS = {
    "event": "VARCHAR",
    "timestamp": "VARCHAR",
    **REQUEST_FIELDS,
    **_SHADOW_FIELDS,
    **_MEMORY_FIELDS,
    # Shadow lines' `error` is not always text: read as JSON, both kinds of line.
    "error": "JSON",
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
SELECT coalesce(list_position($names, backend), 0)::INT - 1 AS backend,
       {by_reason},
       coalesce(reason = '{fallback}' OR fallback_from IS NOT NULL, false) AS moved,
       coalesce(reason IN ({experiment}) AND fallback_from IS NULL, false) AS experiment,
       coalesce(list_position($names, fallback_from), 0)::INT - 1 AS fallback_from,
       coalesce(list_position($causes, fallback_cause), 0)::INT - 1 AS fallback_cause,
       list_position($versions, {version})::INT - 1 AS config_version,
       coalesce(error IS NOT NULL AND error != 'null', false) AS error,
       coalesce(list_position($errors, {error_text}), 0)::INT - 1 AS error_kind,
       coalesce(client_disconnected, false) AS client_disconnected,
       coalesce(stream, false) AS stream,
       coalesce(behind_shadow, false) AS behind_shadow,
       {numbers},
       CASE WHEN session IS NULL THEN NULL ELSE hash(session) END AS session,
       coalesce(epoch(CASE WHEN ts BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 00:00:00+00'
                      THEN ts END), 'nan') AS timestamp,
       coalesce(list_position($replicas, replica), 0)::INT - 1 AS replica
FROM (SELECT *, try_cast(timestamp AS TIMESTAMPTZ) AS ts FROM log WHERE event = 'request')
"""
# The numbers of the request line that the report reads.
_REQUEST_NUMBERS = tuple(
    name
    for name, kind in REQUEST_FIELDS.items()
    if kind == "DOUBLE" and name in {field.name for field in dataclasses.fields(Requests)}
)
# The reasons are the enum's (a column each, but for the fallback, which is `moved`), and
# which of them make A/B data is too (`Reason.is_experiment`), never the SQL's.
_BY_REASON = ",\n       ".join(
    f"coalesce(reason = '{reason}' AND fallback_from IS NULL, false) AS {reason}"
    for reason in Reason
    if reason is not Reason.FALLBACK
)

_ERROR_TEXT = "json_extract_string(error, '$')"  # JSON null reads as NULL
_VERSION = f"coalesce(config_version, '{UNKNOWN_VERSION}')"
_DISTINCT = "SELECT DISTINCT {column} FROM log WHERE event = 'request' AND {column} IS NOT NULL"

_SHADOWS = """
SELECT coalesce("from", '') AS "from", coalesce("to", '') AS "to",
       event = 'shadow_dropped' AS dropped,
       coalesce(match, false) AS match,
       coalesce(error IS NOT NULL AND error != 'null', false) AS error,
       {numbers}
FROM log WHERE event IN ('shadow', 'shadow_dropped')
"""
_MEMORY = """
SELECT coalesce(backend, '') AS backend, coalesce(rss_mb, 'nan') AS rss_mb,
       coalesce(epoch(try_cast(timestamp AS TIMESTAMPTZ)), 'nan') AS timestamp
FROM log WHERE event = 'backend_memory'
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
        return LogData(list(files), counts, events, _requests(con), _shadows(con), _memory(con))
    except duckdb.Error as exc:
        raise UsageError(f"cannot read the logs: {exc}") from None
    finally:
        con.close()


def _numbers(names: Sequence[str]) -> str:
    return ", ".join(f"coalesce({name}::DOUBLE, 'nan') AS {name}" for name in names)


def _requests(con: Any) -> Requests:
    names = _distinct(con, "backend", "fallback_from")
    causes = _distinct(con, "fallback_cause")
    versions = _distinct(con, _VERSION)
    errors = _distinct(con, _ERROR_TEXT)
    replicas = _distinct(con, "replica")
    sql = _REQUESTS.format(
        numbers=_numbers(_REQUEST_NUMBERS),
        version=_VERSION,
        error_text=_ERROR_TEXT,
        by_reason=_BY_REASON,
        fallback=Reason.FALLBACK,
        experiment=", ".join(f"'{reason}'" for reason in Reason if reason.is_experiment),
    )
    params = {
        "names": list(names),
        "causes": list(causes),
        "versions": list(versions),
        "errors": list(errors),
        "replicas": list(replicas),
    }
    columns = con.execute(sql, params).fetchnumpy()
    arrays: dict[str, Any] = {k: np.asarray(v) for k, v in columns.items() if k != "session"}
    arrays["session"] = _session_codes(columns["session"])
    return Requests(
        names=names,
        causes=causes,
        versions=versions,
        errors=errors,
        replicas=replicas,
        **arrays,
    )


def _session_codes(hashes: Any) -> Ints:
    """DuckDB's 64-bit hashes of the session (masked where there is none) -> 0, 1, ... per
    distinct session, -1 for none: numbering a million hashes takes numpy milliseconds,
    where numbering a million strings would take a second."""
    missing = np.ma.getmaskarray(hashes)
    values = np.ma.getdata(hashes).astype(np.uint64)
    codes = np.full(values.size, -1, dtype=np.int32)
    if (~missing).any():
        _, inverse = np.unique(values[~missing], return_inverse=True)
        codes[~missing] = inverse.astype(np.int32)
    return codes


def _distinct(con: Any, *columns: str) -> tuple[str, ...]:
    """The distinct values of these columns over the request lines, sorted."""
    sql = " UNION ".join(_DISTINCT.format(column=column) for column in columns)
    return tuple(sorted(row[0] for row in con.execute(sql).fetchall()))


def _memory(con: Any) -> Memory:
    arrays = {k: np.asarray(v) for k, v in con.execute(_MEMORY).fetchnumpy().items()}
    return Memory(arrays["backend"].tolist(), arrays["rss_mb"], arrays["timestamp"])


def _shadows(con: Any) -> Shadows:
    columns = con.execute(_SHADOWS.format(numbers=_numbers(_SHADOW_NUMBERS))).fetchnumpy()
    arrays = {k: np.asarray(v) for k, v in columns.items()}
    pair = list(zip(arrays.pop("from").tolist(), arrays.pop("to").tolist(), strict=True))
    return Shadows(pair=pair, **arrays)

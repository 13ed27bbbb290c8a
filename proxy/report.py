"""`python -m proxy report LOG [LOG ...]`: the request logs -> does speculative decoding pay?

    python -m proxy report logs/*.jsonl [--baseline baseline]
        [--config routes.yaml | --split baseline=50,speculative=50]
        [--json] [--html FILE] [--seed N] [--boot 2000]

LOG is a file or a glob (several proxy processes may each write one); `-` or no LOG reads
stdin. DuckDB's JSON reader parses each line once: `event == "request"` lines are requests,
`shadow` and `shadow_dropped` lines the shadow check, other events are counted and ignored;
a line that is not JSON, or JSON without an `event`, is counted as `skipped`, never fatal.
A field of the wrong type reads as missing; blank lines are not counted.

Which requests count where:
- per backend: every request line counts for `requests`, `errors` and disconnects; the
  percentiles use the successful ones (status 200, no error), whatever routed them.
- the A/B comparison and its breakdowns use only requests routed by `split` or `sticky`
  with status 200 and no error: a header-forced request is the client's choice, not a random
  one, so those are summarised apart (`forced`).
- the sample ratio check counts `split`-routed requests only (sticky ones move by session).

Speed, measured on this 2-core machine (already loaded by other work) with a synthetic
1,000,000-line log (371 MB: 980,000 requests on two backends, 10,000 other events, 10,000
broken lines): the terminal report takes 4.8-5.6 s end to end, 6.5-7.0 s with `--json
--html`, at about 500 MB resident. The parts, timed in-process over a few runs: importing
duckdb and scipy 1.7 s, reading and parsing (DuckDB) 2.3-2.7 s, the statistics 1.6-2.1 s
(mostly the Mann-Whitney ranks in `proxy.stats`), the plots 1.8-2.6 s.

Exit codes: 0 a report, 1 no request lines in the input, 2 bad arguments or unreadable input.

`--json` prints every figure; the schema (`"schema": 1`) is stable, keys are only added:

    {"schema": 1,
     "input": {"files": [str], "lines": int, "skipped": int, "requests": int,
               "unrouted": int, "shadow": int, "other_events": {event: int},
               "first": iso8601 | null, "last": iso8601 | null},
     "baseline": str,
     "backends": {name: {"requests", "errors": int, "error_rate": float,
                         "client_disconnected": int, "ok": int,
                         "ttft_ms" | "latency_ms" | "decode_tps": {"p50" | "p90" | "p99": EST}}},
     "comparison": {name: {"n": int, "n_baseline": int,
                           "decode_tps" | "ttft_ms" | "latency_ms": {
                               "ratio": EST, "p_value": float | null, "higher_is_better": bool,
                               "samples_needed": int | null, "verdict": str}}},
     "forced": {name: {"requests", "ok": int, "median_ttft_ms", "median_latency_ms",
                       "median_decode_tps": float | null}},
     "breakdowns": {"in_flight" | "completion_tokens": [
                       {"bucket": str, "backends": {name: {"n": int,
                           "median_decode_tps", "median_latency_ms": float | null}},
                        "decode_ratio": {name: float | null}}]},
     "sample_ratio": {"source": str | null, "note": str | null, "expected_share",
                      "observed_share": {name: float}, "observed": {name: int},
                      "unexpected": [name], "p_value": float | null, "mismatch": bool},
     "shadow": [{"from", "to": str, "n", "errors", "dropped": int, "exact_match_rate",
                 "similarity_p50": float | null,
                 "mismatch_prefix_chars": {"p10", "p50", "p90": float | null},
                 "latency_ratio_median": float | null}],
     "notes": [str]}

EST is a `proxy.stats.Estimate`: {"value", "low", "high": float | null, "n": int}.
Ratios are backend / baseline (medians). Every missing figure is null, never NaN.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy import stats

SCHEMA = 1
EXIT_NO_REQUESTS = 1
EXIT_USAGE = 2
PERCENTILES = (50, 90, 99)
METRICS = (("decode_tps", True), ("ttft_ms", False), ("latency_ms", False))  # higher is better?
LOAD_BUCKETS = (("0", 0, 0), ("1", 1, 1), ("2-3", 2, 3), ("4+", 4, math.inf))
LENGTH_BUCKETS = (("1-16", 1, 16), ("17-64", 17, 64), ("65-256", 65, 256), ("257+", 257, math.inf))
MIN_BUCKET_SAMPLES = 5  # per backend, before a bucket's decode ratio means anything


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
        mask: Bools = (self.status == 200) & ~self.error
        return mask

    @property
    def comparable(self) -> Bools:
        """Randomly routed and successful: the only fair A/B sample."""
        return (self.split | self.sticky) & self.ok


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


# --- reading -------------------------------------------------------------------------------

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

_REQUESTS = """
SELECT coalesce(list_position(?, backend), 0)::INT - 1 AS backend,
       coalesce(reason = 'split', false) AS split,
       coalesce(reason = 'sticky', false) AS sticky,
       coalesce(reason = 'header', false) AS header,
       coalesce(error IS NOT NULL AND error != 'null', false) AS error,
       coalesce(client_disconnected, false) AS client_disconnected,
       {numbers},
       coalesce(epoch(try_cast(timestamp AS TIMESTAMPTZ)), 'nan') AS timestamp
FROM log WHERE event = 'request'
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
def _stdin_as_file(files: list[str]) -> Iterator[list[str]]:
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


# --- figures -------------------------------------------------------------------------------


def build_report(
    data: LogData,
    *,
    baseline: str,
    split: dict[str, float] | None,
    split_source: str | None,
    rng: np.random.Generator,
    n_boot: int,
) -> dict[str, Any]:
    """Every figure of the report, as the JSON document `--json` prints."""
    req = data.requests
    notes: list[str] = []
    if baseline not in req.names:
        notes.append(f"baseline {baseline!r} served no request: no comparison (--baseline)")
    return {
        "schema": SCHEMA,
        "input": _input_summary(data),
        "baseline": baseline,
        "backends": {name: _backend(req, name, rng, n_boot) for name in _order(req, baseline)},
        "comparison": _comparison(req, baseline, rng, n_boot),
        "forced": {
            name: _forced(req, name)
            for name in _order(req, baseline)
            if (req.of(name) & req.header).any()
        },
        "breakdowns": {
            "in_flight": _breakdown(req, baseline, req.in_flight, LOAD_BUCKETS),
            "completion_tokens": _breakdown(req, baseline, req.completion_tokens, LENGTH_BUCKETS),
        },
        "sample_ratio": sample_ratio_check(req, split, split_source),
        "shadow": shadow_summary(data.shadows),
        "notes": notes,
    }


def _order(req: Requests, baseline: str) -> list[str]:
    """The baseline first, then the others by name."""
    return sorted(req.names, key=lambda name: (name != baseline, name))


def _input_summary(data: LogData) -> dict[str, Any]:
    times = data.requests.timestamp[np.isfinite(data.requests.timestamp)]
    events = dict(data.events)
    return {
        "files": data.files,
        **data.counts,
        "requests": events.pop("request", 0),
        "unrouted": int((data.requests.backend < 0).sum()),
        "shadow": events.pop("shadow", 0),
        "other_events": events,
        "first": _iso(times.min()) if times.size else None,
        "last": _iso(times.max()) if times.size else None,
    }


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(float(seconds), UTC).isoformat().replace("+00:00", "Z")


def _backend(req: Requests, name: str, rng: np.random.Generator, n_boot: int) -> dict[str, Any]:
    mine = req.of(name)
    ok = mine & req.ok
    count = int(mine.sum())
    errors = int((mine & req.error).sum())
    figures: dict[str, Any] = {
        "requests": count,
        "errors": errors,
        "error_rate": errors / count if count else None,
        "client_disconnected": int((mine & req.client_disconnected).sum()),
        "ok": int(ok.sum()),
    }
    for metric, _ in METRICS:
        samples = _finite(getattr(req, metric)[ok])
        figures[metric] = {
            f"p{q}": _estimate(stats.percentile(samples, q, rng=rng, n_boot=n_boot))
            for q in PERCENTILES
        }
    return figures


def _comparison(
    req: Requests, baseline: str, rng: np.random.Generator, n_boot: int
) -> dict[str, Any]:
    if baseline not in req.names:
        return {}
    fair = req.comparable
    base = fair & req.of(baseline)
    result: dict[str, Any] = {}
    for name in _order(req, baseline)[1:]:
        mine = fair & req.of(name)
        if not mine.any():
            continue
        result[name] = {"n": int(mine.sum()), "n_baseline": int(base.sum())}
        for metric, higher_is_better in METRICS:
            values = getattr(req, metric)
            a, b = _finite(values[mine]), _finite(values[base])
            result[name][metric] = _compare(
                metric, name, baseline, a, b, higher_is_better, rng, n_boot
            )
    return result


def _compare(
    metric: str,
    name: str,
    baseline: str,
    a: Floats,
    b: Floats,
    higher_is_better: bool,
    rng: np.random.Generator,
    n_boot: int,
) -> dict[str, Any]:
    ratio = stats.median_ratio(a, b, rng=rng, n_boot=n_boot)
    p = stats.mann_whitney_p(a, b)
    needed = stats.samples_needed(a, b)
    line = stats.verdict(
        metric, name, baseline, ratio, p, a.size, b.size,
        higher_is_better=higher_is_better, needed=needed,
    )  # fmt: skip
    return {
        "ratio": _estimate(ratio),
        "p_value": _number(p),
        "higher_is_better": higher_is_better,
        "samples_needed": needed,
        "verdict": line,
    }


def _forced(req: Requests, name: str) -> dict[str, Any]:
    mine = req.of(name) & req.header
    ok = mine & req.ok
    return {
        "requests": int(mine.sum()),
        "ok": int(ok.sum()),
        **{f"median_{metric}": _median(getattr(req, metric)[ok]) for metric, _ in METRICS},
    }


def _breakdown(
    req: Requests, baseline: str, key: Floats, buckets: Sequence[tuple[str, float, float]]
) -> list[dict[str, Any]]:
    """Per bucket of `key` (load or length), each backend's medians on the fair sample, and
    the decode ratio to the baseline where both have enough samples to mean anything."""
    fair = req.comparable
    names = _order(req, baseline)
    rows = []
    for label, low, high in buckets:
        inside = fair & (key >= low) & (key <= high)
        per_backend = {}
        decode = {}
        for name in names:
            mine = inside & req.of(name)
            decode[name] = _finite(req.decode_tps[mine])
            per_backend[name] = {
                "n": int(mine.sum()),
                "median_decode_tps": _median(decode[name]),
                "median_latency_ms": _median(req.latency_ms[mine]),
            }
        rows.append({"bucket": label, "backends": per_backend,
                     "decode_ratio": _decode_ratios(decode, baseline)})  # fmt: skip
    return rows


def _decode_ratios(decode: dict[str, Floats], baseline: str) -> dict[str, float | None]:
    base = decode.get(baseline, np.array([]))
    return {
        name: _number(np.median(samples) / np.median(base))
        if min(base.size, samples.size) >= MIN_BUCKET_SAMPLES
        else None
        for name, samples in decode.items()
        if name != baseline
    }


def sample_ratio_check(
    req: Requests, split: dict[str, float] | None, source: str | None
) -> dict[str, Any]:
    """Did the split-routed traffic land in the configured proportions? If not, something
    between client and backends (retries, errors before logging, a stale routes file on one
    proxy) biases the comparison."""
    empty: dict[str, Any] = {
        "source": source, "note": None, "expected_share": {}, "observed_share": {},
        "observed": {}, "unexpected": [], "p_value": None, "mismatch": False,
    }  # fmt: skip
    if split is None:
        return {**empty, "note": "no split given (--split, --config or ./routes.yaml): skipped"}
    observed = {name: int((req.of(name) & req.split).sum()) for name in req.names}
    if not sum(observed.values()):
        return {**empty, "note": "no split-routed requests: skipped"}
    result = stats.sample_ratio(observed, split)
    return {
        **empty,
        "expected_share": result.expected_share,
        "observed_share": result.observed_share,
        "observed": result.observed,
        # Split traffic to a backend the split leaves out is a routing bug, not chance.
        "unexpected": sorted(n for n, c in observed.items() if c and not split.get(n)),
        "p_value": _number(result.p_value),
        "mismatch": result.mismatch,
    }


def shadow_summary(shadows: Shadows) -> list[dict[str, Any]]:
    """Per (from, to) pair: how often the outputs agree, and how far apart they are."""
    rows = []
    pairs = np.array([f"{a}\0{b}" for a, b in shadows.pair], dtype=object)
    for pair in sorted(set(shadows.pair)):
        in_pair = pairs == f"{pair[0]}\0{pair[1]}"
        mine = in_pair & ~shadows.dropped
        good = mine & ~shadows.error
        mismatches = good & ~shadows.match
        prefix = _finite(shadows.common_prefix_chars[mismatches])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = shadows.to_latency_ms[good] / shadows.from_latency_ms[good]
        rows.append({
            "from": pair[0],
            "to": pair[1],
            "n": int(mine.sum()),
            "errors": int((mine & shadows.error).sum()),
            "dropped": int((in_pair & shadows.dropped).sum()),
            "exact_match_rate": float(shadows.match[good].mean()) if good.any() else None,
            "similarity_p50": _median(shadows.similarity[good]),
            "mismatch_prefix_chars": {
                f"p{q}": _number(np.percentile(prefix, q)) if prefix.size else None
                for q in (10, 50, 90)
            },
            "latency_ratio_median": _median(ratio),
        })  # fmt: skip
    return rows


def _finite(values: Floats) -> Floats:
    return values[np.isfinite(values)]


def _median(values: Floats) -> float | None:
    values = _finite(values)
    return float(np.median(values)) if values.size else None


def _number(value: float | np.floating[Any] | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _estimate(estimate: stats.Estimate) -> dict[str, Any]:
    return {
        "value": _number(estimate.value),
        "low": _number(estimate.low),
        "high": _number(estimate.high),
        "n": int(estimate.n),
    }


# --- rendering -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One table of the report, the same for the terminal and the HTML page."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = dataclasses.field(default_factory=list)
    alarm: str | None = None  # shouted, in red on a terminal
    numeric: bool = True  # right-align every column but the first


def sections(report: dict[str, Any]) -> list[Section]:
    return [
        _input_section(report["input"], report["notes"]),
        _backends_section(report["backends"]),
        *(_percentile_section(report["backends"], metric) for metric, _ in METRICS),
        _comparison_section(report["comparison"], report["baseline"], report["sample_ratio"]),
        _forced_section(report["forced"]),
        _breakdown_section("By load (in flight at dispatch)", report, "in_flight"),
        _breakdown_section("By completion length (tokens)", report, "completion_tokens"),
        _sample_ratio_section(report["sample_ratio"]),
        _shadow_section(report["shadow"]),
    ]


def _input_section(data: dict[str, Any], notes: list[str]) -> Section:
    others = sum(data["other_events"].values())
    rows = [
        ["files", ", ".join(data["files"])],
        ["lines", f"{data['lines']:,}"],
        ["requests", f"{data['requests']:,} ({data['unrouted']:,} rejected before routing)"],
        ["shadow checks", f"{data['shadow']:,}"],
        ["other events", f"{others:,} (ignored)"],
        ["skipped", f"{data['skipped']:,} (not JSON, or JSON without an event)"],
        ["time span", f"{data['first'] or '-'} .. {data['last'] or '-'}"],
    ]  # fmt: skip
    return Section("Input", ["", ""], rows, notes, numeric=False)


def _backends_section(backends: dict[str, Any]) -> Section:
    rows = [
        [name, f"{b['requests']:,}", f"{b['ok']:,}", f"{b['errors']:,}",
         _percent(b["error_rate"]), f"{b['client_disconnected']:,}"]
        for name, b in backends.items()
    ]  # fmt: skip
    headers = ["backend", "requests", "ok", "errors", "error rate", "disconnected"]
    return Section("Backends (all requests)", headers, rows)


_UNITS = {"decode_tps": "decode tokens/s", "ttft_ms": "TTFT ms", "latency_ms": "latency ms"}


def _percentile_section(backends: dict[str, Any], metric: str) -> Section:
    rows = [
        [name, f"{b[metric]['p50']['n']:,}", *(_est(b[metric][f"p{q}"]) for q in PERCENTILES)]
        for name, b in backends.items()
    ]
    headers = ["backend", "n", *(f"p{q} [95% CI]" for q in PERCENTILES)]
    return Section(f"{_UNITS[metric]} (status 200, no error)", headers, rows)


def _comparison_section(
    comparison: dict[str, Any], baseline: str, check: dict[str, Any]
) -> Section:
    rows, verdicts = [], []
    for name, c in comparison.items():
        for metric, _ in METRICS:
            m = c[metric]
            rows.append([f"{name} / {baseline}", _UNITS[metric], f"{m['ratio']['n']:,}",
                         _est(m["ratio"], "x"), _p(m["p_value"]),
                         _count(m["samples_needed"])])  # fmt: skip
            verdicts.append(m["verdict"])
    headers = ["backends", "metric", "n (smaller)", "median ratio [95% CI]", "p", "n needed"]
    if not comparison:
        verdicts.append("no backend to compare with the baseline")
    title = "A/B comparison (split or sticky routing, status 200, no error)"
    alarm = _MISMATCH if check["mismatch"] else None
    return Section(title, headers, rows, verdicts, alarm)


def _forced_section(forced: dict[str, Any]) -> Section:
    rows = [
        [name, f"{f['requests']:,}", f"{f['ok']:,}",
         *(_fmt(f[f"median_{metric}"]) for metric, _ in METRICS)]
        for name, f in forced.items()
    ]  # fmt: skip
    headers = ["backend", "requests", "ok", *(f"median {_UNITS[m]}" for m, _ in METRICS)]
    notes = ["the client chose the backend: not part of the comparison"] if forced else ["none"]
    return Section("Header-forced requests", headers, rows, notes)


def _breakdown_section(title: str, report: dict[str, Any], key: str) -> Section:
    baseline = report["baseline"]
    buckets = report["breakdowns"][key]
    names = list(buckets[0]["backends"]) if buckets else []
    others = [name for name in names if name != baseline]
    headers = ["bucket"]
    for name in names:
        headers += [f"{name} n", f"{name} tok/s", f"{name} ms"]
    headers += [f"{name}/{baseline} tok/s" for name in others]
    rows = []
    for bucket in buckets:
        row = [bucket["bucket"]]
        for name in names:
            b = bucket["backends"][name]
            row += [f"{b['n']:,}", _fmt(b["median_decode_tps"]), _fmt(b["median_latency_ms"])]
        row += [_fmt(bucket["decode_ratio"].get(name), "x") for name in others]
        rows.append(row)
    note = f"medians of the comparison sample; ratios need {MIN_BUCKET_SAMPLES}+ samples each"
    return Section(title, headers, rows, [note])


_MISMATCH = (
    "SAMPLE RATIO MISMATCH: the split traffic does not match the configured split, so the"
    " comparison may be biased (retries, lost log lines, proxies with another split)"
)


def _sample_ratio_section(check: dict[str, Any]) -> Section:
    title = "Sample ratio (split-routed requests vs the configured split)"
    if check["note"]:
        return Section(title, [], [], [check["note"]])
    rows = [
        [name, _percent(share), f"{check['observed'].get(name, 0):,}",
         _percent(check["observed_share"].get(name))]
        for name, share in check["expected_share"].items()
    ]  # fmt: skip
    rows += [
        [name, "-", f"{check['observed'][name]:,}", _percent(check["observed_share"][name])]
        for name in check["unexpected"]
    ]
    notes = [f"split from {check['source']}; chi-square p = {_p(check['p_value'])}"]
    alarm = _MISMATCH if check["mismatch"] else None
    return Section(title, ["backend", "expected", "observed", "observed share"], rows, notes, alarm)


def _shadow_section(shadow: list[dict[str, Any]]) -> Section:
    rows = [
        [f"{s['from']} -> {s['to']}", f"{s['n']:,}", f"{s['errors']:,}", f"{s['dropped']:,}",
         _percent(s["exact_match_rate"]), _fmt(s["similarity_p50"]),
         " / ".join(_fmt(s["mismatch_prefix_chars"][f"p{q}"]) for q in (10, 50, 90)),
         _fmt(s["latency_ratio_median"], "x")]
        for s in shadow
    ]  # fmt: skip
    headers = ["pair", "n", "errors", "dropped", "exact match", "similarity p50",
               "mismatch prefix chars p10/p50/p90", "latency to/from"]  # fmt: skip
    notes = [] if shadow else ["no shadow checks in the logs"]
    return Section("Shadow checks", headers, rows, notes)


def _fmt(value: float | None, suffix: str = "") -> str:
    if value is None:
        return "-"
    size = abs(value)
    digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 or size == 0 else 3
    return f"{value:,.{digits}f}{suffix}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _est(estimate: dict[str, Any], suffix: str = "") -> str:
    if estimate["value"] is None:
        return "-"
    value = _fmt(estimate["value"], suffix)
    if estimate["low"] is None or estimate["high"] is None:
        return value
    return f"{value} [{_fmt(estimate['low'])}, {_fmt(estimate['high'])}]"


def _p(p: float | None) -> str:
    return "-" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def render_text(report: dict[str, Any], *, colour: bool = False) -> str:
    """The report as aligned plain-text tables."""
    out = [f"specproxy report: baseline {report['baseline']}"]
    for section in sections(report):
        out += ["", section.title, "-" * len(section.title)]
        if section.alarm:
            out.append(f"\033[1;31m!! {section.alarm}\033[0m" if colour else f"!! {section.alarm}")
        out += _align(section.headers, section.rows, numeric=section.numeric)
        out += [f"  {note}" for note in section.notes]
    return "\n".join(out) + "\n"


def _align(headers: list[str], rows: list[list[str]], *, numeric: bool) -> list[str]:
    if not rows:
        return []
    table = ([headers] if any(headers) else []) + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) if numeric else cell.ljust(width)
            for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        return "  " + "  ".join(cells).rstrip()

    return [line(row) for row in table]


def render_html(report: dict[str, Any], figures: list[tuple[str, str]]) -> str:
    """One self-contained page: the tables, then the figures as inline SVG."""
    body = [f"<h1>specproxy report: baseline {escape(report['baseline'])}</h1>"]
    for section in sections(report):
        body.append(f"<h2>{escape(section.title)}</h2>")
        if section.alarm:
            body.append(f'<p class="alarm">{escape(section.alarm)}</p>')
        if section.rows:
            head = "".join(f"<th>{escape(h)}</th>" for h in section.headers)
            head = f"<tr>{head}</tr>" if any(section.headers) else ""
            rows = "".join(
                "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                for row in section.rows
            )
            kind = "" if section.numeric else ' class="text"'
            body.append(f"<table{kind}>{head}{rows}</table>")
        body += [f"<p>{escape(note)}</p>" for note in section.notes]
    for caption, svg in figures:
        body.append(f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>")
    return _PAGE.format(body="\n".join(body))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>specproxy report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 80em; }}
table {{ border-collapse: collapse; font-variant-numeric: tabular-nums; }}
th, td {{ padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child, td:first-child, .text td {{ text-align: left; }}
.alarm {{ color: #b00; font-weight: bold; }}
figure {{ margin: 1em 0; }} svg {{ max-width: 100%; height: auto; }}
</style></head>
<body>
{body}
</body></html>
"""


def figures(req: Requests, baseline: str) -> list[tuple[str, str]]:
    """The HTML page's plots: CDFs of latency and decode speed, and both over time."""
    from proxy import plots  # matplotlib only when a page is asked for

    names = _order(req, baseline)
    ok = {name: req.of(name) & req.ok for name in names}
    latency = {name: req.latency_ms[mask] for name, mask in ok.items()}
    decode = {name: req.decode_tps[mask] for name, mask in ok.items()}
    times = {name: req.timestamp[mask] for name, mask in ok.items()}
    return [
        ("Latency, CDF (status 200, no error)", plots.cdf_svg(latency, "latency ms", log_x=True)),
        ("Decode tokens/s, CDF (streams)", plots.cdf_svg(decode, "decode tokens/s")),
        ("Latency over time, rolling median", plots.timeline_svg(times, latency, "latency ms")),
        ("Decode tokens/s over time, rolling median",
         plots.timeline_svg(times, decode, "decode tokens/s")),
    ]  # fmt: skip


# --- command line --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage and the problem
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        split, split_source = _expected_split(args)
        files = expand_logs(args.logs)
        with _stdin_as_file(files) as readable:
            data = dataclasses.replace(read_logs(readable), files=files)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not data.requests.backend.size:
        counts = data.counts
        print(
            f'error: no request lines (event "request") in {", ".join(files)}: '
            f"{counts['lines']:,} lines, {counts['skipped']:,} skipped (not JSON, or JSON"
            f" without an event), {sum(data.events.values()):,} other events",
            file=sys.stderr,
        )
        return EXIT_NO_REQUESTS
    rng = np.random.default_rng(args.seed)
    report = build_report(
        data, baseline=args.baseline, split=split, split_source=split_source,
        rng=rng, n_boot=args.boot,
    )  # fmt: skip
    if args.html:
        page = render_html(report, figures(data.requests, args.baseline))
        Path(args.html).write_text(page, encoding="utf-8")
        print(f"specproxy: wrote {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
        if report["sample_ratio"]["mismatch"]:
            print(f"warning: {_MISMATCH}", file=sys.stderr)
    else:
        sys.stdout.write(render_text(report, colour=sys.stdout.isatty()))
    return 0


def _expected_split(args: argparse.Namespace) -> tuple[dict[str, float] | None, str | None]:
    """The configured split, from --split, --config, or ./routes.yaml if it exists."""
    if args.split is not None:
        return args.split, "--split"
    path = args.config or ("routes.yaml" if Path("routes.yaml").is_file() else None)
    if path is None:
        return None, None
    from proxy.config import load_config
    from proxy.errors import ConfigError

    try:
        config = load_config(path)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return dict(config.weights()), str(path)


def parse_split(text: str) -> dict[str, float]:
    """`baseline=50,speculative=50` -> {"baseline": 50.0, "speculative": 50.0}."""
    split: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name.strip() or not math.isfinite(weight) or weight < 0:
            raise argparse.ArgumentTypeError(f"{part!r} is not name=percentage")
        split[name.strip()] = weight
    if not math.isclose(sum(split.values()), 100.0, abs_tol=1e-6):
        raise argparse.ArgumentTypeError(f"percentages add up to {sum(split.values()):g}, not 100")
    return split


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m proxy report",
        description="Read request logs and report whether the speculative backend pays off.",
    )
    parser.add_argument("logs", nargs="*", metavar="LOG", help="log files or globs; - is stdin")
    parser.add_argument("--baseline", default="baseline", help="backend to compare against")
    expected = parser.add_mutually_exclusive_group()
    expected.add_argument("--config", help="routes file whose routing.split is expected")
    expected.add_argument("--split", type=parse_split, help="expected split: a=50,b=50")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap random seed (0)")
    parser.add_argument("--boot", type=_positive, default=2000, help="bootstrap resamples")
    return parser


if __name__ == "__main__":
    sys.exit(main())

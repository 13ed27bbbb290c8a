"""How the traffic was routed, as the report sees it: config versions, failover, queueing,
and whether the split delivered its proportions (the sample ratio check).

Each part is a pure function of the request arrays (`proxy.logread.Requests`) that returns
its piece of the report's JSON document (the schema is in `proxy.report`).

A hot reload can change the split while the logs are written, and then the same backend
was chosen with two different probabilities: pooled, the observed split matches neither,
so the sample ratio check runs on one config version's lines only, or not at all.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from proxy import stats
from proxy.logread import Bools, Requests, UsageError
from proxy.report_values import finite, number, quantile, time_span
from proxy.routing import FallbackCause

CAUSES = tuple(cause.value for cause in FallbackCause)  # why a request was moved, always listed
UNKNOWN_CAUSE = "unknown"  # a moved line that gives no cause
QUEUE_PERCENTILES = (50, 95)


# --- config versions -----------------------------------------------------------------------


def parse_versions(text: str) -> list[str]:
    """An argparse type: `a1b2c3d4e5f6,0f9e8d7c6b5a` -> the versions, in order."""
    versions = [part.strip() for part in text.split(",") if part.strip()]
    if not versions:
        raise argparse.ArgumentTypeError(f"{text!r} names no config version")
    return versions


def select_versions(req: Requests, wanted: Sequence[str] | None) -> Requests:
    """Only the request lines of these config versions (all of them when none is given)."""
    if not wanted:
        return req
    missing = [version for version in wanted if version not in req.versions]
    if missing:
        found = ", ".join(req.versions) or "none"
        raise UsageError(f"--config-version {', '.join(missing)}: not in the logs (found: {found})")
    return req.where(req.in_versions(wanted))


def config_versions(every: Requests, selected: Sequence[str] | None) -> dict[str, Any]:
    """Each config version of the request lines (all of them, selected or not), in order of
    first appearance, and whether the lines analysed mix several."""
    rows = [_version(every, code, name) for code, name in enumerate(every.versions)]
    rows.sort(key=lambda row: (row["first"] is None, row["first"] or "", row["version"]))
    kept = set(selected or every.versions)
    for row in rows:
        row["selected"] = row["version"] in kept
    analysed = [row for row in rows if row["selected"]]
    return {
        "mixed": len(analysed) > 1,
        "selected": list(dict.fromkeys(selected)) if selected else None,
        "requests": sum(row["requests"] for row in analysed),
        "versions": rows,
    }


def _version(req: Requests, code: int, name: str) -> dict[str, Any]:
    mine = req.config_version == code
    split = mine & req.split
    counts = {backend: int((split & req.of(backend)).sum()) for backend in req.names}
    counts = {backend: count for backend, count in counts.items() if count}
    total = sum(counts.values())
    first, last = time_span(req.timestamp[mine])
    return {
        "version": name,
        "requests": int(mine.sum()),
        "first": first,
        "last": last,
        "split_observed": counts,
        "split_share": {backend: count / total for backend, count in counts.items()},
    }


def mixed_versions_note(versions: dict[str, Any]) -> str:
    """The loud note for a report whose request lines come from several config versions."""
    rows = [row for row in versions["versions"] if row["selected"]]
    listed = "; ".join(
        f"{row['version']} ({row['requests']:,} requests, {row['first'] or '-'} .. "
        f"{row['last'] or '-'}, split {describe_split(row['split_share'])})"
        for row in rows
    )
    return (
        f"MIXED CONFIG VERSIONS: the requests come from {len(rows)} routes configs, which may"
        " split differently: the comparison pools them and the sample ratio check is skipped"
        f" (--config-version V keeps one): {listed}"
    )


def describe_split(shares: dict[str, float]) -> str:
    """{"baseline": 0.5, ...} -> "baseline 50.0% / ..." (or that there was no split)."""
    if not shares:
        return "none (no split-routed requests)"
    return " / ".join(f"{name} {100 * share:.1f}%" for name, share in shares.items())


# --- failover and queueing -----------------------------------------------------------------


def failover(req: Requests, names: Sequence[str]) -> dict[str, Any]:
    """Per backend, the requests moved away from it (by cause) and those it took instead."""
    backends = {}
    for name in names:
        code = req.names.index(name)
        away = req.fallback_from == code
        received = req.moved & (req.backend == code)
        backends[name] = {
            "moved_away": int(away.sum()),
            "moved_away_by_cause": _by_cause(req, away),
            "received": int(received.sum()),
            "received_by_cause": _by_cause(req, received),
        }
    return {"moved": int(req.moved.sum()), "backends": backends}


def _by_cause(req: Requests, mask: Bools) -> dict[str, int]:
    """The known causes always (0 or more), then any other cause the lines give."""
    counts = np.bincount(req.fallback_cause[mask] + 1, minlength=len(req.causes) + 1)
    result = dict.fromkeys(CAUSES, 0)
    for label, count in zip((UNKNOWN_CAUSE, *req.causes), counts.tolist(), strict=True):
        if count:
            result[label] = result.get(label, 0) + count
    return result


def queue_wait(req: Requests, mask: Bools) -> dict[str, Any]:
    """The wait for a concurrency slot, over the lines that log one (0: a slot was free)."""
    waits = finite(req.queue_ms[mask])
    return {
        "n": int(waits.size),
        "waited": int((waits > 0).sum()),
        **{f"p{q}": quantile(waits, q) for q in QUEUE_PERCENTILES},
    }


# --- the sample ratio check ----------------------------------------------------------------


def sample_ratio_check(
    req: Requests,
    split: dict[str, float] | None,
    source: str | None,
    versions: dict[str, Any],
) -> dict[str, Any]:
    """Did the traffic land in the configured proportions? If not, something between
    client and backends (retries, errors before logging, failover, a stale routes file on
    one proxy, a sticky key too coarse) biases the comparison. Counted by unit of
    assignment: split-routed requests (the top-level keys), and the distinct sessions of
    sticky-routed requests (`sessions`, the same keys): sticky routing assigns sessions, so
    720 against 180 requests from 20 and 20 sessions is no mismatch, and 36 against 9
    sessions is one whatever their requests. `mismatch` is either. Only ever on one config
    version's lines."""
    analysed = [row["version"] for row in versions["versions"] if row["selected"]]
    empty = _empty_check()
    if versions["mixed"]:
        note = _mixed_skip_note(analysed, versions["selected"])
        return {**empty, "source": source, "note": note, "sessions": {**empty, "note": note}}
    empty["config_version"] = analysed[0] if analysed else None
    empty["source"] = source
    if split is None:
        note = "no split given (--split, --config or ./routes.yaml): skipped"
        return {**empty, "note": note, "sessions": {**empty, "note": note}}
    requests = {name: int((req.of(name) & req.split).sum()) for name in req.names}
    sessions = {
        name: int(np.unique(req.session[req.of(name) & req.sticky & (req.session >= 0)]).size)
        for name in req.names
    }
    by_requests = _check(requests, split, empty, "no split-routed requests: skipped")
    by_sessions = _check(sessions, split, empty, "no sticky sessions: skipped")
    mismatch = by_requests["mismatch"] or by_sessions["mismatch"]
    return {**by_requests, "mismatch": mismatch, "sessions": by_sessions}


def _empty_check() -> dict[str, Any]:
    return {
        "source": None, "note": None, "config_version": None, "expected_share": {},
        "observed_share": {}, "observed": {}, "unexpected": [], "p_value": None,
        "mismatch": False,
    }  # fmt: skip


def _check(
    observed: dict[str, int], split: dict[str, float], empty: dict[str, Any], none: str
) -> dict[str, Any]:
    if not sum(observed.values()):
        return {**empty, "note": none}
    result = stats.sample_ratio(observed, split)
    return {
        **empty,
        "expected_share": result.expected_share,
        "observed_share": result.observed_share,
        "observed": result.observed,
        # Traffic to a backend the split leaves out is a routing bug, not chance.
        "unexpected": sorted(n for n, c in observed.items() if c and not split.get(n)),
        "p_value": number(result.p_value),
        "mismatch": result.mismatch,
    }


def _mixed_skip_note(analysed: list[str], selected: list[str] | None) -> str:
    which = "the selected request lines" if selected else "the request lines"
    return (
        f"skipped: {which} come from {len(analysed)} config versions ({', '.join(analysed)}),"
        " each with possibly its own split, so no one expected split applies;"
        f" check one at a time with --config-version {analysed[-1]}"
    )

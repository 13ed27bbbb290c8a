"""The report's answer: the always-valid verdict per arm, memory, and the cost line.

The verdict is `proxy.sequential`'s, fed from the log's arrays: each arm's requests by
intention to treat (`proxy.itt`, the live verdict's rule too: assigned at random, moved
off the arm by failover counting as its error, only the backend's errors counting), in
time order. The answered-whole ones give decode tokens/s and latency; TTFT only from
streams, since a non-stream answer's "TTFT" is all of it.
Requests of one sticky session are one unit (`session`). A million requests go through
numpy in a few passes (`sequential.MeanStream.of`), not one Python call each.

Memory is the `backend_memory` lines (launch.py, every 10 s per launched backend): per
backend, the median and maximum resident set over the log's span. The cost line puts
speed, memory and outputs side by side for each arm, for example

    speculative: decode 1.42x faster (95% CI 1.31-1.55), +128 MB resident (+51%),
    outputs identical in 204 of 212 shadow checks

Each function returns its piece of the report's JSON document (`proxy.report`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from proxy import itt, sequential
from proxy.logread import Bools, Ints, Memory, Requests
from proxy.report_values import median, number, time_span
from proxy.routing import Reason
from proxy.sequential import ArmState, MeanStream, Metric, Primary, Verdict
from proxy.verdict_json import verdict_json

PRIMARY_CHOICES = tuple(metric.value for metric in sequential.TIMES)
DEFAULT_MARGIN = 0.05
DEFAULT_ALPHA = 0.05


def assignment(req: Requests) -> tuple[Ints, Bools, Bools]:
    """Per line: the arm it counts for (an index into `req.names`, -1: none), whether it
    counts as that arm's error, and whether as an answer with timings: `itt.assigned`'s
    rule, applied once per distinct combination of its inputs (a handful), not per line.
    The inputs are packed into one integer per line (mixed radix), so finding the
    combinations is one 1-D `np.unique`: a million lines in a fraction of a second."""
    reason = np.full(req.backend.size, -1, dtype=np.int64)
    for code, kind in enumerate(_REASONS):
        reason[req.moved if kind is Reason.FALLBACK else getattr(req, kind.value)] = code
    finite = np.isfinite(req.status)
    status = np.where(finite, np.clip(np.nan_to_num(req.status), 0, _STATUSES - 2), -1)
    digits: list[tuple[np.ndarray, int, int]] = [  # (value, offset, radix)
        (reason, 1, len(_REASONS) + 1),  # codes from -1 (none): offset 1
        (req.backend, 1, len(req.names) + 1),
        (req.fallback_from, 1, len(req.names) + 1),
        (req.error_kind, 1, len(req.errors) + 1),
        (status.astype(np.int64), 1, _STATUSES),
        (req.client_disconnected, 0, 2),
        (req.behind_shadow, 0, 2),
    ]
    key = np.zeros(req.backend.size, dtype=np.int64)
    for value, offset, radix in digits:
        key = key * radix + value.astype(np.int64) + offset
    combos, inverse = np.unique(key, return_inverse=True)
    arm = np.full(combos.size, -1, dtype=np.int32)
    outcome = np.zeros(combos.size, dtype=np.int8)  # 0 nothing, 1 failed, 2 answered
    for i, packed in enumerate(combos.tolist()):
        values = []
        for _, offset, radix in reversed(digits):
            packed, digit = divmod(packed, radix)
            values.append(digit - offset)
        shadow, left, code, error, moved_from, backend, r = values
        counted = itt.assigned(
            _REASONS[r] if r >= 0 else None,
            req.names[backend] if backend >= 0 else None,
            req.names[moved_from] if moved_from >= 0 else None,
            error=req.errors[error] if error >= 0 else None,
            status=code if code >= 0 else None,
            client_disconnected=bool(left),
            behind_shadow=bool(shadow),
        )
        if counted is not None:
            arm[i] = req.names.index(counted[0])
            outcome[i] = 2 if counted[1] is itt.Outcome.ANSWERED else 1
    per_line = outcome[inverse.reshape(-1)]
    return arm[inverse.reshape(-1)], per_line == 1, per_line == 2


_STATUSES = 1001  # status codes 0-999 and none: a digit of the packed key
_REASONS = tuple(Reason)


def arm_states(req: Requests, names: Sequence[str]) -> dict[str, ArmState]:
    """Each backend's `ArmState`, as observing its requests (`itt.assigned`) in time order
    would leave it (but with every session remembered: the log is all there). Backends
    without A/B requests are left out."""
    arm, failed, answered = assignment(req)
    states = {}
    for name in names:
        if name not in req.names:
            continue
        mine = np.flatnonzero(arm == req.names.index(name))
        if not mine.size:
            continue
        mine = mine[np.argsort(req.timestamp[mine], kind="stable")]
        states[name] = _state(req, mine, failed[mine], answered[mine])
    return states


def _state(req: Requests, rows: np.ndarray, error: Bools, ok: Bools) -> ArmState:
    session = req.session[rows]
    streams = {Metric.ERROR_RATE: MeanStream.of(error.astype(np.float64), session)}
    for metric in sequential.TIMES:
        values = getattr(req, metric.value)[rows]
        usable = ok & np.isfinite(values) & (values > 0)
        if metric is Metric.TTFT_MS:
            usable &= req.stream[rows]
        streams[metric] = MeanStream.of(np.log(values[usable]), session[usable])
    grouped = session >= 0
    return ArmState(
        requests=int(rows.size),
        split_requests=int((~grouped).sum()),
        sessions=int(np.unique(session[grouped]).size),
        streams=streams,
    )


def decide(
    states: dict[str, ArmState], baseline: str, *, alpha: float, primary: str, margin: float
) -> Verdict | None:
    """`sequential.decide`, or None when the baseline or every other arm has no A/B data."""
    if baseline not in states or len(states) < 2:
        return None
    return sequential.decide(states, baseline, alpha=alpha, primary=Metric(primary), margin=margin)


def verdict_section(verdict: Verdict | None, *, alpha: float, margin: float) -> dict[str, Any]:
    """The `verdict` key of the report: the options, then `verdict_json`'s shape."""
    body = verdict_json(verdict) if verdict is not None else None
    return {"kind": "always-valid", "alpha": alpha, "margin": margin, "result": body}


# --- memory and the cost line ----------------------------------------------------------------


def memory_summary(memory: Memory, names: Sequence[str]) -> dict[str, Any]:
    """Per backend with readings: how many, the median and maximum rss_mb, and when."""
    result = {}
    for name in names:
        mine = np.array([b == name for b in memory.backend], dtype=bool)
        rss = memory.rss_mb[mine] if mine.size else np.array([])
        rss = rss[np.isfinite(rss)]
        if not rss.size:
            continue
        first, last = time_span(memory.timestamp[mine])
        result[name] = {
            "readings": int(rss.size),
            "median_mb": median(rss),
            "max_mb": number(rss.max()),
            "first": first,
            "last": last,
        }
    return result


def cost(
    verdict: Verdict | None,
    memory: dict[str, Any],
    shadow: list[dict[str, Any]],
    baseline: str,
) -> dict[str, Any]:
    """Per arm: the primary result, the memory it costs over the baseline, how often its
    outputs matched the baseline's, and the three as one line."""
    result: dict[str, Any] = {}
    if verdict is None:
        return result
    base_mb = (memory.get(baseline) or {}).get("median_mb")
    for name, arm in verdict.arms.items():
        mb = (memory.get(name) or {}).get("median_mb")
        extra = mb - base_mb if mb is not None and base_mb is not None else None
        matches = _shadow_matches(shadow, baseline, name)
        entry: dict[str, Any] = {
            "primary": arm.primary.outcome.value,
            "memory_mb": mb,
            "memory_extra_mb": extra,
            "memory_extra_share": extra / base_mb if extra is not None and base_mb else None,
            "shadow_checks": matches[1] if matches else None,
            "shadow_identical": matches[0] if matches else None,
            "guardrail_harm": sorted(m.value for m, g in arm.guardrails.items()
                                     if g.outcome is sequential.Guardrail.HARM),
        }  # fmt: skip
        entry["line"] = cost_line(name, arm, entry, alpha=arm.primary.interval.alpha)
        result[name] = entry
    return result


def _shadow_matches(shadow: list[dict[str, Any]], a: str, b: str) -> tuple[int, int] | None:
    """(identical, compared) over the shadow checks between the two, either way round."""
    identical = compared = 0
    for row in shadow:
        if {row["from"], row["to"]} == {a, b} and row["exact_match_rate"] is not None:
            compared += row["compared"]
            identical += row["identical"]
    return (identical, compared) if compared else None


_LABELS = {Metric.DECODE_TPS: "decode", Metric.TTFT_MS: "TTFT", Metric.LATENCY_MS: "latency"}


def cost_line(name: str, arm: sequential.ArmVerdict, entry: dict[str, Any], *, alpha: float) -> str:
    """`speculative: decode 1.42x faster (97.5% CI 1.31-1.55, always-valid), +128 MB
    resident (+51%), outputs identical in 204 of 212 shadow checks`."""
    parts = [f"{name}: {primary_phrase(arm.primary, alpha)}"]
    extra, share = entry["memory_extra_mb"], entry["memory_extra_share"]
    if extra is None:
        parts.append("memory not logged")
    else:
        of = f" ({share:+.0%})" if share is not None else ""
        parts.append(f"{extra:+,.0f} MB resident{of}")
    if entry["shadow_checks"]:
        parts.append(
            f"outputs identical in {entry['shadow_identical']:,} of"
            f" {entry['shadow_checks']:,} shadow checks"
        )
    else:
        parts.append("outputs not compared (no shadow checks)")
    if entry["guardrail_harm"]:
        parts.append("HARM on " + ", ".join(entry["guardrail_harm"]))
    return ", ".join(parts)


def primary_phrase(primary: sequential.PrimaryVerdict, alpha: float) -> str:
    """`decode 1.42x faster (97.5% CI 1.31-1.55)`, `latency 2.16x, longer (...)`."""
    interval = primary.interval
    label = _LABELS[interval.metric]
    if interval.value is None or interval.low is None or interval.high is None:
        return f"{label}: not enough data yet (n={interval.units}/{interval.units_baseline})"
    value = interval.value
    if interval.metric is Metric.DECODE_TPS:
        what = f"{value:.2f}x faster" if value >= 1 else f"{value:.2f}x as fast, slower"
    else:
        what = f"{value:.2f}x, {'shorter' if value < 1 else 'longer'}"
    level = f"{100 * (1 - alpha):.3g}%"
    digits = 2 if interval.high - interval.low >= 0.02 else 3  # a narrow one shows its width
    outcome = {
        Primary.BETTER: "",
        Primary.NOT_WORSE: f"; not worse by more than {primary.margin:.0%}",
        Primary.WORSE: "",
        Primary.INCONCLUSIVE: "; inconclusive so far",
    }[primary.outcome]
    ci = f"{interval.low:.{digits}f}-{interval.high:.{digits}f}"
    return f"{label} {what} ({level} CI {ci}{outcome})"

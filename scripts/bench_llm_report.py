"""The LLM-shaped scenario's figures (from the windows `bench_llm.py` measured) and its
report: the tables, the targets of issue 12 and the backend-client decision.

Percentiles are pooled over the rounds; an arm's added latency at p50 / p99 is its
percentile minus the direct arm's (both pooled over the same rounds). CPU per streamed
token is the arm's CPU seconds over (streams completed x tokens per stream): the issue's
figures (25-28 us per event at 1.6-1.8 ms per 64-token stream) divide the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench_llm import Window
    from bench_paced import Pace

TARGET_STREAMS = 256  # where issue 12 sets its targets
TARGET_CPU_US = 15.0
TARGET_VS_NGINX = 2.0
KEEP_POOL_CPU = 1.5  # the pool stays if aiohttp costs at least this much more CPU per token
KEEP_POOL_P99 = 0.5  # or if the pool adds under this share of aiohttp's p99
DECODE_TOLERANCE = 0.02


def pct(values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile (None without values)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * p / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when b is not positive (an added latency at or under zero: noise)."""
    return None if a is None or b is None or b <= 0 else a / b


def arm_figures(windows: list[Window], pace: Pace) -> dict[str, Any]:
    """One arm's figures over its rounds."""
    samples = [s for w in windows for s in w.samples]
    good = [s for s in samples if s.ok]
    steady = [s for w in windows for s in w.samples if s.ok and s.request_id in w.steady]
    ttft = [1000 * t for s in steady if (t := s.ttft()) is not None]
    total = [1000 * t for s in steady if (t := s.total()) is not None]
    seconds = sum(w.seconds for w in windows)
    cpu = sum(w.cpu for w in windows)
    paces = {rid: v for w in windows for rid, v in w.paces.items()}
    logged = {rid: v for w in windows for rid, v in w.logged.items()}
    backend_tps = {rid: (pace.tokens - 1) / v[0] for rid, v in paces.items() if v[0] > 0}
    client_vs_backend = [
        tps / backend_tps[s.request_id]
        for s in good
        if (tps := s.tps()) is not None and s.request_id in backend_tps
    ]
    figures: dict[str, Any] = {
        "streams_ok": len(good),
        "errors": len(samples) - len(good),
        "streams_timed": len(steady),
        "error_kinds": sorted({s.error or f"status {s.status}" for s in samples if not s.ok})[:5],
        "seconds": seconds,
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "total_p50_ms": pct(total, 50),
        "total_p99_ms": pct(total, 99),
        "max_gap_p99_ms": pct([1000 * s.max_gap for s in steady], 99),
        "client_pace_vs_backend_p50": pct(client_vs_backend, 50),
        "cpu_s": cpu,
        "cpu_share_of_a_core": cpu / seconds if seconds else None,
        "cpu_ms_per_stream": 1000 * cpu / len(good) if good else None,
        "cpu_us_per_token": 1e6 * cpu / (len(good) * pace.tokens) if good else None,
        "rss_peak_mb": max(w.rss_peak for w in windows) / 2**20,
        "backend_cpu_share": sum(w.backend_cpu for w in windows) / seconds if seconds else None,
        "client_cpu_share": sum(w.client_cpu for w in windows) / seconds if seconds else None,
        "backend_late_p99_ms": pct([1000 * v[1] for v in paces.values()], 99),
        "backend_tps_p50": pct(list(backend_tps.values()), 50),
        "load_min": min(min(w.load) for w in windows),
        "load_max": max(max(w.load) for w in windows),
        "per_round_ttft_p99_ms": [_round_p99(w) for w in windows],
        "per_round_cpu_us_per_token": [
            1e6 * w.cpu / max(1, sum(s.ok for s in w.samples) * pace.tokens) for w in windows
        ],
    }
    if any(w.logged for w in windows) or logged:
        figures |= _logged_figures(good, logged, backend_tps)
    return figures


def _round_p99(w: Window) -> float | None:
    return pct(
        [1000 * t for s in w.samples if s.ok and s.request_id in w.steady and (t := s.ttft())], 99
    )


def _logged_figures(
    good: list[Any], logged: dict[str, dict[str, Any]], backend_tps: dict[str, float]
) -> dict[str, Any]:
    """The proxy's own TTFT and decode_tps against the client's and the backend's."""
    gaps = [
        1000 * t - line["ttft_ms"]
        for s in good
        if (line := logged.get(s.request_id))
        and line.get("ttft_ms") is not None
        and (t := s.ttft()) is not None
    ]
    deviations = [
        line["decode_tps"] / backend_tps[rid] - 1
        for rid, line in logged.items()
        if line.get("decode_tps") and rid in backend_tps
    ]
    within = [abs(d) <= DECODE_TOLERANCE for d in deviations]
    return {
        "log_lines_missing": len(good) - sum(s.request_id in logged for s in good),
        "ttft_gap_p50_ms": pct(gaps, 50),
        "ttft_gap_p95_ms": pct(gaps, 95),
        "decode_tps_dev_p50": pct(deviations, 50),
        "decode_tps_absdev_p95": pct([abs(d) for d in deviations], 95),
        "decode_tps_within_2pct": sum(within) / len(within) if within else None,
    }


def figures(windows: dict[str, list[Window]], pace: Pace) -> dict[str, Any]:
    """Every arm's figures at one number of streams, with what each adds over direct."""
    arms = {name: arm_figures(ws, pace) for name, ws in windows.items()}
    direct = arms["direct"]
    for f in arms.values():
        for key in ("ttft_p50_ms", "ttft_p99_ms", "total_p50_ms", "total_p99_ms"):
            f[f"added_{key}"] = _sub(f[key], direct[key])
    return {"arms": arms, "harness": _harness(direct, pace)}


def _harness(direct: dict[str, Any], pace: Pace) -> dict[str, Any]:
    """Whether the backend and the load generator kept up, judged on the direct arm: the
    pace the client saw, its TTFT, their own CPU, and how late the backend's timers ran
    (each stream's worst tick; under a token gap late, the pace is kept)."""
    reasons = []
    keeps = direct["client_pace_vs_backend_p50"]
    if keeps is not None and keeps < 1 - DECODE_TOLERANCE:
        reasons.append(f"client saw {keeps:.1%} of the backend's pace")
    ttft = direct["ttft_p99_ms"]
    if ttft is not None and ttft > 1000 * (pace.ttft + pace.gap):
        reasons.append(f"direct TTFT p99 {ttft:.1f} ms, over {1000 * pace.ttft:g} + one gap")
    if (share := direct["client_cpu_share"]) is not None and share > 0.85:
        reasons.append(f"load generator at {share:.0%} of a core")
    if (share := direct["backend_cpu_share"]) is not None and share > 0.85:
        reasons.append(f"backend at {share:.0%} of a core")
    late = direct["backend_late_p99_ms"]
    if late is not None and late > pace.gap * 1000:
        reasons.append(f"backend timers late by {late:.1f} ms at p99")
    return {"behind": bool(reasons), "reasons": reasons}


def verdicts(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets (at 256 streams) and the client decision, at each N measured."""
    out: dict[str, Any] = {}
    for n, result in results.items():
        arms = result["arms"]
        proxy, nginx, aio = arms.get("proxy"), arms.get("nginx"), arms.get("aiohttp")
        entry: dict[str, Any] = {}
        if proxy is not None and nginx is not None:
            for key in ("added_ttft_p99_ms", "added_total_p99_ms"):
                entry[f"{key}_vs_nginx"] = _ratio(proxy[key], nginx[key])
                bound = TARGET_VS_NGINX * max(nginx[key] or 0.0, 0.0)
                entry[f"{key}_target_met"] = proxy[key] is not None and proxy[key] <= bound
        if proxy is not None:
            us = proxy["cpu_us_per_token"]
            entry["cpu_us_per_token_target_met"] = us is not None and us < TARGET_CPU_US
        if proxy is not None and aio is not None:
            cpu_ratio = _ratio(aio["cpu_us_per_token"], proxy["cpu_us_per_token"])
            ttft = _ratio(proxy["added_ttft_p99_ms"], aio["added_ttft_p99_ms"])
            total = _ratio(proxy["added_total_p99_ms"], aio["added_total_p99_ms"])
            entry["aiohttp_vs_pool_cpu_per_token"] = cpu_ratio
            entry["pool_vs_aiohttp_added_ttft_p99"] = ttft
            entry["pool_vs_aiohttp_added_total_p99"] = total
            p99_ahead = all(
                _under_half(proxy[key], aio[key])
                for key in ("added_ttft_p99_ms", "added_total_p99_ms")
            )
            entry["keep_pool"] = bool(
                (cpu_ratio is not None and cpu_ratio >= KEEP_POOL_CPU) or p99_ahead
            )
        out[str(n)] = entry
    return out


def _under_half(pool: float | None, aio: float | None) -> bool:
    """The pool adds under KEEP_POOL_P99 of what aiohttp adds (which must add something)."""
    return pool is not None and aio is not None and aio > 0 and pool < KEEP_POOL_P99 * aio


# ---------------------------------------------------------------- printing


def _f(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


LATENCY_COLUMNS = (  # (heading, key, format)
    ("ok", "streams_ok", "d"),
    ("timed", "streams_timed", "d"),
    ("err", "errors", "d"),
    ("TTFT p50", "ttft_p50_ms", ".1f"),
    ("p99", "ttft_p99_ms", ".1f"),
    ("+p50", "added_ttft_p50_ms", "+.1f"),
    ("+p99", "added_ttft_p99_ms", "+.1f"),
    ("total p50", "total_p50_ms", ".0f"),
    ("p99", "total_p99_ms", ".0f"),
    ("+p50", "added_total_p50_ms", "+.1f"),
    ("+p99", "added_total_p99_ms", "+.1f"),
    ("gap p99", "max_gap_p99_ms", ".1f"),
)
COST_COLUMNS = (
    ("CPU %core", "cpu_share_of_a_core", ".0%"),
    ("ms/stream", "cpu_ms_per_stream", ".2f"),
    ("us/token", "cpu_us_per_token", ".1f"),
    ("RSS MB", "rss_peak_mb", ".0f"),
    ("ttftgap p50", "ttft_gap_p50_ms", ".2f"),
    ("p95", "ttft_gap_p95_ms", ".2f"),
    ("tps dev p50", "decode_tps_dev_p50", "+.2%"),
    ("|dev| p95", "decode_tps_absdev_p95", ".2%"),
    ("within 2%", "decode_tps_within_2pct", ".0%"),
    ("load", "load_max", ".2f"),
)


def _table(arms: dict[str, dict[str, Any]], columns: tuple[tuple[str, str, str], ...]) -> None:
    widths = [max(len(h), 7) + 2 for h, _, _ in columns]
    first = max(9, *(len(name) + 1 for name in arms))
    headings = (h for h, _, _ in columns)
    print(f"{'arm':<{first}}" + "".join(f"{h:>{w}}" for h, w in zip(headings, widths, strict=True)))
    for name, f in arms.items():
        cells = (_f(f.get(key), spec) for _, key, spec in columns)
        print(f"{name:<{first}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))


def print_llm(report: dict[str, Any]) -> None:
    meta = report["meta"]
    print(
        f"\nLLM-shaped streams: {meta['tokens']} tokens, {meta['ttft_ms']:g} ms to the first,"
        f" {meta['gap_ms']:g} ms apart; {meta['rounds']} rounds x {meta['per_connection']}"
        f" streams per connection; {meta['nproc']} CPUs ({meta['cpu']}), Python {meta['python']}"
    )
    for n, result in report["results"].items():
        arms = result["arms"]
        print(f"\n=== N = {n} concurrent streams (ms; + = added over direct, same rounds)")
        _table(arms, LATENCY_COLUMNS)
        print()
        _table(arms, COST_COLUMNS)
        print(
            "per round, TTFT p99 ms | CPU us/token: "
            + "; ".join(
                f"{name} {'/'.join(_f(v) for v in f['per_round_ttft_p99_ms'])}"
                f" | {'/'.join(_f(v) for v in f['per_round_cpu_us_per_token'])}"
                for name, f in arms.items()
            )
        )
        d = arms["direct"]
        print(
            f"harness: backend {_f(d['backend_cpu_share'], '.0%')} of a core, timers late"
            f" {_f(d['backend_late_p99_ms'], '.2f')} ms p99, pace kept {_f(d['backend_tps_p50'])}"
            f" tok/s; load generator {_f(d['client_cpu_share'], '.0%')} of a core, saw"
            f" {_f(d['client_pace_vs_backend_p50'], '.2%')} of the backend's pace"
        )
        harness = result["harness"]
        if harness["behind"]:
            print("  FELL BEHIND: " + "; ".join(harness["reasons"]))
    report["verdicts"] = verdicts(report["results"])
    print("\ntargets (issue 12, at 256 streams) and the backend client, per N:")
    for n, v in report["verdicts"].items():
        parts = []
        if "added_ttft_p99_ms_vs_nginx" in v:
            parts.append(
                f"proxy/nginx added p99: TTFT {_f(v['added_ttft_p99_ms_vs_nginx'], '.2f')}x"
                f" ({_f(v['added_ttft_p99_ms_target_met'])}),"
                f" total {_f(v['added_total_p99_ms_vs_nginx'], '.2f')}x"
                f" ({_f(v['added_total_p99_ms_target_met'])})"
            )
        if "cpu_us_per_token_target_met" in v:
            parts.append(
                f"CPU/token < {TARGET_CPU_US:g} us: {_f(v['cpu_us_per_token_target_met'])}"
            )
        if "keep_pool" in v:
            parts.append(
                f"aiohttp/pool CPU per token {_f(v['aiohttp_vs_pool_cpu_per_token'], '.2f')}x,"
                f" pool/aiohttp added p99 TTFT {_f(v['pool_vs_aiohttp_added_ttft_p99'], '.2f')}x"
                f" total {_f(v['pool_vs_aiohttp_added_total_p99'], '.2f')}x"
                f" -> {'keep the pool' if v['keep_pool'] else 'move to aiohttp'}"
            )
        print(f"  N={n}: " + "; ".join(parts))
    for note in report["notes"]:
        print(f"note: {note}")
    print(
        "\nttftgap: the client's TTFT minus the proxy's logged ttft_ms, same request id."
        " tps dev: logged decode_tps / the pace the backend kept - 1."
    )

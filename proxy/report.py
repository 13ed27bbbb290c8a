"""`python -m proxy report LOG [LOG ...]`: the request logs -> does speculative decoding pay?

Reading the logs is `proxy.logread`; drawing the tables and the page is `proxy.render`.
This module computes the figures as one JSON document (`--json`), with
`proxy.report_verdict` for the answer (the always-valid verdict per arm, memory, the cost
line), `proxy.report_routing` for the parts about routing itself (config versions,
failover, queueing, the sample ratio check) and `proxy.stats` for the fixed-horizon
statistics beside the verdict.

docs/report.md is the reference: the options, which requests count where, the statistics,
how to read a verdict, and the JSON schema (`"schema": 1`: keys are only ever added).
Exit codes: 0 a report, 1 no request lines in the input, 2 bad arguments or unreadable input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy import report_verdict, stats
from proxy.logread import Bools, Floats, LogData, Requests, Shadows, UsageError, load_logs
from proxy.render import MISMATCH, figures, forest, render_html, render_text
from proxy.report_replicas import replica_table
from proxy.report_routing import (
    config_versions,
    failover,
    mixed_versions_note,
    parse_versions,
    queue_wait,
    sample_ratio_check,
    select_versions,
)
from proxy.report_values import estimate, finite, median, number, time_span
from proxy.report_verdict import DEFAULT_ALPHA, DEFAULT_MARGIN, PRIMARY_CHOICES

SCHEMA = 1
EXIT_NO_REQUESTS = 1
EXIT_USAGE = 2
PERCENTILES = (50, 90, 99)
METRICS = (("decode_tps", True), ("ttft_ms", False), ("latency_ms", False))  # higher is better?
# A non-stream request's TTFT is the time to its whole answer: compared on streams only.
STREAMS_ONLY = frozenset({"ttft_ms"})
LOAD_BUCKETS = (("0", 0, 0), ("1", 1, 1), ("2-3", 2, 3), ("4+", 4, math.inf))
LENGTH_BUCKETS = (("1-16", 1, 16), ("17-64", 17, 64), ("65-256", 65, 256), ("257+", 257, math.inf))
PROMPT_BUCKETS = (
    ("1-64", 1, 64), ("65-256", 65, 256), ("257-1024", 257, 1024), ("1025+", 1025, math.inf),
)  # fmt: skip
STREAM_BUCKETS = (("stream", 1, 1), ("not stream", 0, 0))
MIN_BUCKET_SAMPLES = 5  # per backend, before a bucket's ratio is given
FIXED_HORIZON = "fixed-horizon (valid at one look)"


# --- figures -------------------------------------------------------------------------------


def build_report(
    data: LogData,
    *,
    baseline: str,
    split: dict[str, float] | None,
    split_source: str | None,
    rng: np.random.Generator,
    n_boot: int,
    versions: Sequence[str] | None = None,
    alpha: float = DEFAULT_ALPHA,
    primary: str = "decode_tps",
    margin: float = DEFAULT_MARGIN,
) -> dict[str, Any]:
    """Every figure of the report, as the JSON document `--json` prints; `versions` keeps
    only the request lines of those config versions."""
    req = select_versions(data.requests, versions)
    versions_seen = config_versions(data.requests, versions)
    notes = [mixed_versions_note(versions_seen)] if versions_seen["mixed"] else []
    if baseline not in req.served:
        notes.append(f"baseline {baseline!r} served no request: no comparison (--baseline)")
    # every backend named: an arm that failed everything it was assigned appears only as
    # the backend its requests were moved from, and its verdict is that (intention to treat)
    states = report_verdict.arm_states(req, _order(req, baseline, every=True))
    verdict = report_verdict.decide(states, baseline, alpha=alpha, primary=primary, margin=margin)
    memory = report_verdict.memory_summary(data.memory, _order(req, baseline, every=True))
    shadow = shadow_summary(data.shadows)
    return {
        "schema": SCHEMA,
        "verdict": report_verdict.verdict_section(verdict, alpha=alpha, margin=margin),
        "cost": report_verdict.cost(verdict, memory, shadow, baseline),
        "memory": memory,
        "input": _input_summary(data),
        "baseline": baseline,
        "config_versions": versions_seen,
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
            "prompt_tokens": _breakdown(
                req, baseline, req.prompt_tokens, PROMPT_BUCKETS, rng=rng, n_boot=n_boot
            ),
            "stream": _breakdown(
                req,
                baseline,
                req.stream.astype(np.float64),
                STREAM_BUCKETS,
                rng=rng,
                n_boot=n_boot,
            ),
        },
        "failover": failover(req, _order(req, baseline, every=True)),
        "sample_ratio": sample_ratio_check(req, split, split_source, versions_seen),
        "shadow": shadow,
        "replicas": replica_table(req, _order(req, baseline), rng, n_boot),
        "notes": notes,
    }


def _order(req: Requests, baseline: str, *, every: bool = False) -> list[str]:
    """The baseline first, then the others by name: those that served a request, or
    `every` backend named (one may only appear as the backend a request was moved from)."""
    names = req.names if every else req.served
    return sorted(names, key=lambda name: (name != baseline, name))


def _input_summary(data: LogData) -> dict[str, Any]:
    events = dict(data.events)
    first, last = time_span(data.requests.timestamp)
    return {
        "files": data.files,
        **data.counts,
        "requests": events.pop("request", 0),
        "unrouted": int((data.requests.backend < 0).sum()),
        "shadow": events.pop("shadow", 0),
        "other_events": events,
        "first": first,
        "last": last,
    }


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
    figures["traffic"] = {
        "ab": int((mine & req.experiment).sum()),
        "header": int((mine & req.header).sum()),
        "moved": int((mine & req.moved).sum()),
        "other": int((mine & ~req.experiment & ~req.header & ~req.moved).sum()),
    }
    for metric, _ in METRICS:
        kind = req.stream if metric in STREAMS_ONLY else True
        samples = finite(getattr(req, metric)[ok & kind])
        figures[metric] = {
            f"p{q}": estimate(stats.percentile(samples, q, rng=rng, n_boot=n_boot))
            for q in PERCENTILES
        }
    figures["queue_ms"] = queue_wait(req, mine)
    return figures


def _comparison(
    req: Requests, baseline: str, rng: np.random.Generator, n_boot: int
) -> dict[str, Any]:
    if baseline not in req.served:
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
            kind = req.stream if metric in STREAMS_ONLY else np.ones_like(mine)
            result[name][metric] = _compare(
                metric, name, baseline, req, mine & kind, base & kind, higher_is_better,
                rng, n_boot,
            )  # fmt: skip
    return result


def _compare(
    metric: str,
    name: str,
    baseline: str,
    req: Requests,
    mine: Bools,
    base: Bools,
    higher_is_better: bool,
    rng: np.random.Generator,
    n_boot: int,
) -> dict[str, Any]:
    values = getattr(req, metric)
    ratio, p, clustered = _median_ratio(values, req.session, mine, base, rng, n_boot)
    a, b = finite(values[mine]), finite(values[base])
    needed = stats.samples_needed(a, b)
    line = stats.verdict(
        metric, name, baseline, ratio, p, a.size, b.size,
        higher_is_better=higher_is_better, needed=needed,
    )  # fmt: skip
    return {
        "ratio": estimate(ratio),
        "p_value": number(p),
        "higher_is_better": higher_is_better,
        "samples_needed": needed,
        "verdict": line,
        "kind": FIXED_HORIZON,
        "clustered": clustered,
    }


def _median_ratio(
    values: Floats,
    session: npt.NDArray[np.int32],
    mine: Bools,
    base: Bools,
    rng: np.random.Generator,
    n_boot: int,
) -> tuple[stats.Estimate, float | None, bool]:
    """The median ratio with its interval and p-value: resampling sessions (and a bootstrap
    p) when any request of either side has one, else requests (and Mann-Whitney)."""
    a, b = values[mine], values[base]
    if (session[mine | base] >= 0).any():
        ratio, p = stats.cluster_median_ratio(
            a, b, session[mine], session[base], rng=rng, n_boot=n_boot
        )
        return ratio, p, True
    a, b = finite(a), finite(b)
    return stats.median_ratio(a, b, rng=rng, n_boot=n_boot), stats.mann_whitney_p(a, b), False


def _forced(req: Requests, name: str) -> dict[str, Any]:
    mine = req.of(name) & req.header
    ok = mine & req.ok
    return {
        "requests": int(mine.sum()),
        "ok": int(ok.sum()),
        **{f"median_{metric}": median(getattr(req, metric)[ok]) for metric, _ in METRICS},
    }


def _breakdown(
    req: Requests,
    baseline: str,
    key: Floats,
    buckets: Sequence[tuple[str, float, float]],
    *,
    rng: np.random.Generator | None = None,
    n_boot: int = 0,
) -> list[dict[str, Any]]:
    """Per bucket of `key`, each backend's medians on the fair sample, and the decode ratio
    to the baseline where both have enough samples to mean anything. With `rng`, the key is
    one the arm cannot change (prompt length, stream or not), so buckets are like for like:
    each bucket also gets the decode and latency ratios with fixed-horizon intervals
    (`ratios`). Without, the key is an outcome of the arm (load, completion length): the
    medians are descriptive only."""
    fair = req.comparable
    names = _order(req, baseline)
    rows = []
    for label, low, high in buckets:
        inside = fair & (key >= low) & (key <= high)
        per_backend = {}
        decode = {}
        for name in names:
            mine = inside & req.of(name)
            decode[name] = finite(req.decode_tps[mine])
            per_backend[name] = {
                "n": int(mine.sum()),
                "median_decode_tps": median(decode[name]),
                "median_latency_ms": median(req.latency_ms[mine]),
            }
        row = {"bucket": label, "backends": per_backend,
               "decode_ratio": _decode_ratios(decode, baseline)}  # fmt: skip
        if rng is not None and baseline in names:
            row["ratios"] = _bucket_ratios(req, inside, names, baseline, rng, n_boot)
        rows.append(row)
    return rows


def _bucket_ratios(
    req: Requests,
    inside: Bools,
    names: Sequence[str],
    baseline: str,
    rng: np.random.Generator,
    n_boot: int,
) -> dict[str, dict[str, Any]]:
    """Per arm in the bucket: decode and latency median ratios with their intervals, null
    where a side has fewer than MIN_BUCKET_SAMPLES."""
    base = inside & req.of(baseline)
    result: dict[str, dict[str, Any]] = {}
    for name in names[1:]:
        mine = inside & req.of(name)
        result[name] = {}
        for metric in ("decode_tps", "latency_ms"):
            values = getattr(req, metric)
            a, b = mine & np.isfinite(values), base & np.isfinite(values)
            if min(a.sum(), b.sum()) < MIN_BUCKET_SAMPLES:
                result[name][metric] = None
                continue
            ratio, _, _ = _median_ratio(values, req.session, a, b, rng, n_boot)
            result[name][metric] = estimate(ratio)
    return result


def _decode_ratios(decode: dict[str, Floats], baseline: str) -> dict[str, float | None]:
    base = decode.get(baseline, np.array([]))
    return {
        name: number(np.median(samples) / np.median(base))
        if min(base.size, samples.size) >= MIN_BUCKET_SAMPLES
        else None
        for name, samples in decode.items()
        if name != baseline
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
        prefix = finite(shadows.common_prefix_chars[mismatches])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = shadows.to_latency_ms[good] / shadows.from_latency_ms[good]
        rows.append({
            "from": pair[0],
            "to": pair[1],
            "n": int(mine.sum()),
            "errors": int((mine & shadows.error).sum()),
            "dropped": int((in_pair & shadows.dropped).sum()),
            "exact_match_rate": float(shadows.match[good].mean()) if good.any() else None,
            "compared": int(good.sum()),
            "identical": int((good & shadows.match).sum()),
            "similarity_p50": median(shadows.similarity[good]),
            "mismatch_prefix_chars": {
                f"p{q}": number(np.percentile(prefix, q)) if prefix.size else None
                for q in (10, 50, 90)
            },
            "latency_ratio_median": median(ratio),
        })  # fmt: skip
    return rows


# --- command line --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, prog: str = "python -m proxy report") -> int:
    try:
        args = _parser(prog).parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage and the problem
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.ramp:  # another question of the same logs: see ramp_replay.py
        from proxy import ramp_replay

        return ramp_replay.main(args.logs, args.ramp, as_json=args.json, seed=args.seed)
    versions = [v for group in args.config_version or [] for v in group] or None
    try:
        split, split_source, baseline = _expected_split(args)
        data = load_logs(args.logs)
        selected = select_versions(data.requests, versions)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not data.requests.backend.size:
        counts = data.counts
        print(
            f'error: no request lines (event "request") in {", ".join(data.files)}: '
            f"{counts['lines']:,} lines, {counts['skipped']:,} skipped (not JSON, or JSON"
            f" without an event), {sum(data.events.values()):,} other events",
            file=sys.stderr,
        )
        return EXIT_NO_REQUESTS
    rng = np.random.default_rng(args.seed)
    report = build_report(
        data, baseline=baseline, split=split, split_source=split_source,
        rng=rng, n_boot=args.boot, versions=versions,
        alpha=args.alpha, primary=args.primary, margin=args.margin,
    )  # fmt: skip
    if args.html:
        plots = figures(selected, _order(selected, baseline))
        page = render_html(
            report, plots, min_bucket_samples=MIN_BUCKET_SAMPLES, forest=forest(report)
        )
        Path(args.html).write_text(page, encoding="utf-8")
        print(f"specproxy: wrote {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
        if report["sample_ratio"]["mismatch"]:
            print(f"warning: {MISMATCH}", file=sys.stderr)
    else:
        text = render_text(
            report, min_bucket_samples=MIN_BUCKET_SAMPLES, colour=sys.stdout.isatty()
        )
        sys.stdout.write(text)
    return 0


def _expected_split(
    args: argparse.Namespace,
) -> tuple[dict[str, float] | None, str | None, str]:
    """The configured split, from --split, --config, or ./routes.yaml if it exists; where
    it came from; and the baseline: --baseline, else the config's (`routing.baseline`)."""
    if args.split is not None:
        return args.split, "--split", args.baseline or "baseline"
    path = args.config or ("routes.yaml" if Path("routes.yaml").is_file() else None)
    if path is None:
        return None, None, args.baseline or "baseline"
    from proxy.config import load_config
    from proxy.errors import ConfigError

    try:
        config = load_config(path)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return dict(config.weights()), str(path), args.baseline or config.baseline


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


def _whole(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= minimum (numpy takes no negative seed, and no
    bootstrap is made of zero resamples), refused here rather than with a traceback later."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {minimum}")
        return number

    return parse


def _fraction(low: float, high: float, *, closed_low: bool = False) -> Callable[[str], float]:
    """An argparse type: a number in (low, high), or [low, high) when `closed_low`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (low <= value if closed_low else low < value) and value < high
        if not inside:
            bracket = "[" if closed_low else "("
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number in {bracket}{low:g}, {high:g})"
            )
        return value

    return parse


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Read request logs and report whether the speculative backend pays off.",
    )
    parser.add_argument("logs", nargs="*", metavar="LOG", help="log files or globs; - is stdin")
    parser.add_argument(
        "--baseline",
        help="backend to compare against (default: the config's routing.baseline, else baseline)",
    )
    expected = parser.add_mutually_exclusive_group()
    expected.add_argument("--config", help="routes file whose routing.split is expected")
    expected.add_argument("--split", type=parse_split, help="expected split: a=50,b=50")
    parser.add_argument(
        "--config-version", action="append", type=parse_versions, metavar="V[,V...]",
        help="only request lines of these config versions (repeatable; 'unknown': none logged)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print every figure as JSON")
    parser.add_argument(
        "--ramp", metavar="ROUTES", help="replay the logs through ROUTES's ramp rule instead"
    )
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    parser.add_argument(
        "--primary", choices=PRIMARY_CHOICES, default="decode_tps",
        help="the metric the verdict is about; the others are guardrails (decode_tps)",
    )  # fmt: skip
    parser.add_argument(
        "--margin", type=_fraction(0.0, 1.0, closed_low=True), default=DEFAULT_MARGIN,
        help="how much worse the primary may be and still read not_worse (0.05: 5%%)",
    )  # fmt: skip
    parser.add_argument(
        "--alpha", type=_fraction(0.0, 1.0), default=DEFAULT_ALPHA,
        help="chance of any false verdict, over every arm, metric and look (0.05)",
    )  # fmt: skip
    parser.add_argument("--seed", type=_whole(0), default=0, help="bootstrap random seed (0)")
    parser.add_argument("--boot", type=_whole(1), default=2000, help="bootstrap resamples")
    return parser


if __name__ == "__main__":
    sys.exit(main())

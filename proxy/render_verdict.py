"""The top of the report, the answer: the cost line per arm, the always-valid verdict
table, memory, and, on the page, one card per arm and the forest plot of every ratio.

Read from the report document only (`proxy.report`'s JSON), like `proxy.render`.
"""

from __future__ import annotations

from html import escape
from typing import Any

from proxy.tables import Section, fmt, percent

METRIC_LABELS = {
    "decode_tps": "decode tokens/s",
    "ttft_ms": "TTFT (streams)",
    "latency_ms": "latency",
    "error_rate": "error rate",
}
ANSWER_TITLE = "The answer (always-valid: holds however often the report is run)"


def answer_section(report: dict[str, Any]) -> Section:
    """The cost line of each arm: speed, memory and outputs in one line."""
    lines = [entry["line"] for entry in report["cost"].values()]
    if not lines:
        lines = [no_verdict_reason(report)]
    return Section(ANSWER_TITLE, [], [], lines)


def no_verdict_reason(report: dict[str, Any]) -> str:
    baseline = report["baseline"]
    return (
        f"no verdict: the baseline {baseline!r} and at least one other backend need A/B"
        " requests (split or sticky, served where routed)"
    )


def verdict_section(report: dict[str, Any]) -> Section | None:
    """Every interval of the verdict, primary first, with its outcome and alpha share."""
    section = report["verdict"]
    result = section["result"]
    if result is None:
        return None
    rows = []
    for name, arm in result["arms"].items():
        for role, entry in [("primary", arm["primary"]), *(
            ("guardrail", g) for g in arm["guardrails"].values()
        )]:  # fmt: skip
            rows.append([
                name, METRIC_LABELS[entry["metric"]], role, entry["verdict"],
                interval_text(entry), f"{entry['alpha']:.3g}",
                f"{entry['units']:,}/{entry['units_baseline']:,}",
            ])  # fmt: skip
    headers = ["arm", "metric", "role", "verdict", "value [always-valid CI]", "alpha", "units"]
    notes = [
        f"alpha {section['alpha']:g} is split over every arm and metric (Bonferroni); each"
        " interval holds at every look, so re-running the report as traffic comes in is safe",
        f"primary: better, not_worse (loses less than {section['margin']:.0%}), worse, or"
        " inconclusive; guardrails: harm or no_harm_detected",
        "times: ratio of geometric means, arm / baseline; error rate: difference arm - baseline;"
        " units: sessions when requests carry one, else requests",
    ]
    title = f"Verdict per arm against {result['baseline']} (always-valid)"
    return Section(title, headers, rows, notes, numeric=False)


def interval_text(entry: dict[str, Any]) -> str:
    if entry["ratio"] is None:
        return "- (too few)"
    if entry["unit"] == "difference":
        value, low, high = (100 * entry[k] for k in ("ratio", "low", "high"))
        return f"{value:+.2f} pp [{low:+.2f}, {high:+.2f}]"
    return f"{fmt(entry['ratio'], 'x')} [{fmt(entry['low'])}, {fmt(entry['high'])}]"


def memory_section(report: dict[str, Any]) -> Section:
    rows = [
        [name, f"{m['readings']:,}", fmt(m["median_mb"]), fmt(m["max_mb"])]
        for name, m in report["memory"].items()
    ]
    notes = [] if rows else ["no backend_memory lines (only backends the proxy launches log it)"]
    return Section(
        "Resident memory (MB, backend_memory lines)",
        ["backend", "readings", "median", "max"],
        rows,
        notes,
    )


# --- the page ----------------------------------------------------------------------------------

_CLASS = {
    "better": "good",
    "not_worse": "good",
    "worse": "bad",
    "inconclusive": "wait",
    "harm": "bad",
    "no_harm_detected": "good",
}


def cards_html(report: dict[str, Any]) -> str:
    """One card per arm: the primary result, guardrails, memory, output match rate."""
    result = report["verdict"]["result"]
    if result is None:
        return f'<p class="alarm">{escape(no_verdict_reason(report))}</p>'
    cards = [_card(name, arm, report) for name, arm in result["arms"].items()]
    return '<div class="cards">' + "".join(cards) + "</div>"


def _card(name: str, arm: dict[str, Any], report: dict[str, Any]) -> str:
    primary = arm["primary"]
    cost = report["cost"].get(name, {})
    guards = "".join(
        f'<li class="{_CLASS[g["verdict"]]}">{escape(METRIC_LABELS[metric])}:'
        f" {escape(g['verdict'].replace('_', ' '))} <span>{escape(interval_text(g))}</span></li>"
        for metric, g in arm["guardrails"].items()
    )
    memory = cost.get("memory_extra_mb")
    share = cost.get("memory_extra_share")
    memory_text = (
        "not logged"
        if memory is None
        else f"{memory:+,.0f} MB resident" + (f" ({share:+.0%})" if share is not None else "")
    )
    checks = cost.get("shadow_checks")
    outputs = (
        f"identical in {cost['shadow_identical']:,} of {checks:,} shadow checks"
        f" ({percent(cost['shadow_identical'] / checks)})"
        if checks
        else "not compared (no shadow checks)"
    )
    level = f"{100 * (1 - primary['alpha']):.3g}%"
    return (
        f'<section class="card {_CLASS[primary["verdict"]]}">'
        f"<h2>{escape(name)}</h2>"
        f'<p class="outcome">{escape(primary["verdict"].replace("_", " "))}</p>'
        f'<p class="big">{escape(METRIC_LABELS[primary["metric"]])}'
        f" {escape(interval_text(primary))}</p>"
        f'<p class="small">{level} always-valid interval, vs {escape(report["baseline"])};'
        f" {primary['units']:,}/{primary['units_baseline']:,} units</p>"
        f"<h3>Guardrails</h3><ul>{guards}</ul>"
        f"<h3>Memory</h3><p>{escape(memory_text)}</p>"
        f"<h3>Outputs</h3><p>{escape(outputs)}</p>"
        "</section>"
    )


def forest_rows(report: dict[str, Any]) -> list[tuple[str, float, float, float, str]]:
    """Every ratio of the report with its interval: (label, value, low, high, kind)."""
    rows: list[tuple[str, float, float, float, str]] = []
    result = report["verdict"]["result"]
    for name, arm in (result or {"arms": {}})["arms"].items():
        for entry in [arm["primary"], *arm["guardrails"].values()]:
            if entry["unit"] == "ratio" and entry["low"] is not None:
                label = f"{name}: {METRIC_LABELS[entry['metric']]}"
                rows.append((label, entry["ratio"], entry["low"], entry["high"], "always-valid"))
    for name, comparison in report["comparison"].items():
        for metric in ("decode_tps", "ttft_ms", "latency_ms"):
            ratio = comparison[metric]["ratio"]
            if ratio["low"] is not None:
                label = f"{name}: {METRIC_LABELS[metric]}, median"
                rows.append((label, ratio["value"], ratio["low"], ratio["high"], "fixed-horizon"))
    for key, title in (("prompt_tokens", "prompt"), ("stream", "")):
        for bucket in report["breakdowns"][key]:
            for name, ratios in bucket.get("ratios", {}).items():
                for metric, est in ratios.items():
                    if est is not None and est["low"] is not None:
                        where = f"{title} {bucket['bucket']}".strip()
                        label = f"{name}: {METRIC_LABELS[metric]}, {where}"
                        rows.append((label, est["value"], est["low"], est["high"], "bucket"))
    return rows

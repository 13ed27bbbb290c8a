"""The report document (`proxy.report`'s JSON) as aligned terminal tables or one HTML page.

Everything is read from the document, whose schema is stable: this module knows the schema,
not the code that computes it. The page's plots come from `proxy.plots`, drawn from the
request arrays (`proxy.logread`). Sections about things that may not have happened (several
config versions, failover, queueing) are left out when they did not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from proxy import report_replicas
from proxy.logread import Requests
from proxy.report_routing import CAUSES

# The schema's metrics (in the report's order) and how a table labels them.
_UNITS = {"decode_tps": "decode tokens/s", "ttft_ms": "TTFT ms", "latency_ms": "latency ms"}
_PERCENTILES = (50, 90, 99)  # the schema's p50, p90, p99
_PREFIX_PERCENTILES = (10, 50, 90)  # mismatch_prefix_chars

MISMATCH = (
    "SAMPLE RATIO MISMATCH: the split traffic does not match the configured split, so the"
    " comparison may be biased (retries, failover, lost log lines, proxies with another split)"
)
MIXED_VERSIONS = (
    "MIXED CONFIG VERSIONS: the requests were routed by several routes configs (a reload, or"
    " proxies with different files), so the comparison pools what may be different splits;"
    " --config-version V keeps one"
)


@dataclass(frozen=True)
class Section:
    """One table of the report, the same for the terminal and the HTML page."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = dataclasses.field(default_factory=list)
    alarm: str | None = None  # shouted, in red on a terminal
    numeric: bool = True  # right-align every column but the first


def render_text(report: dict[str, Any], *, min_bucket_samples: int, colour: bool = False) -> str:
    """The report as aligned plain-text tables."""
    out = [f"specproxy report (baseline: {report['baseline']})"]
    for section in sections(report, min_bucket_samples=min_bucket_samples):
        out += ["", section.title, "-" * len(section.title)]
        if section.alarm:
            out.append(f"\033[1;31m!! {section.alarm}\033[0m" if colour else f"!! {section.alarm}")
        out += _align(section.headers, section.rows, numeric=section.numeric)
        out += [f"  {note}" for note in section.notes]
    return "\n".join(out) + "\n"


def render_html(
    report: dict[str, Any], figures: list[tuple[str, str]], *, min_bucket_samples: int
) -> str:
    """One self-contained page: the tables, then the figures as inline SVG."""
    body = [f"<h1>specproxy report (baseline: {escape(report['baseline'])})</h1>"]
    for section in sections(report, min_bucket_samples=min_bucket_samples):
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


def figures(req: Requests, names: Sequence[str]) -> list[tuple[str, str]]:
    """The HTML page's plots, one line per backend in `names`: CDFs of latency and decode
    speed, and both over time."""
    from proxy import plots  # matplotlib only when a page is asked for

    ok = {name: req.of(name) & req.ok for name in names}
    latency = {name: req.latency_ms[mask] for name, mask in ok.items()}
    decode = {name: req.decode_tps[mask] for name, mask in ok.items()}
    times = {name: req.timestamp[mask] for name, mask in ok.items()}
    return [
        ("Latency, CDF (answered whole, all routing reasons)",
         plots.cdf_svg(latency, "latency ms", log_x=True)),
        ("Decode tokens/s, CDF (streams, all routing reasons)",
         plots.cdf_svg(decode, "decode tokens/s")),
        ("Latency over time, median of consecutive windows",
         plots.timeline_svg(times, latency, "latency ms")),
        ("Decode tokens/s over time, median of consecutive windows",
         plots.timeline_svg(times, decode, "decode tokens/s")),
    ]  # fmt: skip


def sections(report: dict[str, Any], *, min_bucket_samples: int) -> list[Section]:
    """The report's tables, in order; `min_bucket_samples` is only quoted in a note."""
    optional = [
        _input_section(report["input"], report["notes"]),
        _versions_section(report["config_versions"]),
        _backends_section(report["backends"]),
        _failover_section(report["failover"], report["baseline"]),
        _queue_section(report["backends"]),
        *(_percentile_section(report["backends"], metric) for metric in _UNITS),
        _comparison_section(report),
        _forced_section(report["forced"]),
        _breakdown_section(
            "By load (in flight at dispatch)", report, "in_flight", min_bucket_samples
        ),
        _breakdown_section(
            "By completion length (tokens)", report, "completion_tokens", min_bucket_samples
        ),
        _sample_ratio_section(report["sample_ratio"]),
        _shadow_section(report["shadow"]),
        _replicas_section(report),
    ]
    return [section for section in optional if section is not None]


def _replicas_section(report: dict[str, Any]) -> Section | None:
    shown = report_replicas.rows(report.get("replicas"))  # absent from older documents
    return None if shown is None else Section(*shown)


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


def _versions_section(versions: dict[str, Any]) -> Section | None:
    """Shown when the input has several config versions, or only some were kept."""
    if len(versions["versions"]) < 2 and not versions["selected"]:
        return None
    rows = [
        [v["version"], f"{v['requests']:,}", v["first"] or "-", v["last"] or "-",
         _split(v["split_observed"], v["split_share"]), "yes" if v["selected"] else "no"]
        for v in versions["versions"]
    ]  # fmt: skip
    headers = ["version", "requests", "first", "last", "split observed", "analysed"]
    notes = []
    if any(v["version"] == "unknown" for v in versions["versions"]):
        notes.append("unknown: lines that log no config_version (written before hot reload)")
    if versions["selected"]:
        kept = ", ".join(versions["selected"])
        notes.append(f"--config-version {kept}: {versions['requests']:,} request lines kept")
    alarm = MIXED_VERSIONS if versions["mixed"] else None
    return Section("Config versions (request lines)", headers, rows, notes, alarm, numeric=False)


def _split(observed: dict[str, int], shares: dict[str, float]) -> str:
    if not observed:
        return "- (no split-routed requests)"
    return " / ".join(f"{name} {_percent(shares[name])}" for name in observed) + (
        f" (n={sum(observed.values()):,})"
    )


def _backends_section(backends: dict[str, Any]) -> Section:
    rows = [
        [name, f"{b['requests']:,}", f"{b['ok']:,}", f"{b['errors']:,}",
         _percent(b["error_rate"]), f"{b['client_disconnected']:,}"]
        for name, b in backends.items()
    ]  # fmt: skip
    headers = ["backend", "requests", "ok", "errors", "error rate", "disconnected"]
    return Section("Backends (all requests)", headers, rows)


def _failover_section(failover: dict[str, Any], baseline: str) -> Section | None:
    """Shown when requests were moved off the backend first chosen."""
    if not failover["moved"]:
        return None
    backends = failover["backends"]
    causes = list(CAUSES)  # the schema's fallback causes, always present
    for b in backends.values():
        causes += [c for c in b["moved_away_by_cause"] if c not in causes]
    rows = [
        [name, f"{b['moved_away']:,}",
         *(f"{b['moved_away_by_cause'].get(c, 0):,}" for c in causes), f"{b['received']:,}"]
        for name, b in backends.items()
    ]  # fmt: skip
    headers = ["backend", "moved away", *causes, "received as fallback"]
    notes = [
        f"{failover['moved']:,} requests were served by another backend than the one routed"
        " to: they count in the per-backend figures, never in the A/B comparison",
        *(
            f"{name}: the comparison lacks its {b['moved_away']:,} requests moved away"
            " (while it was ejected, failing or full): it sees it only when it could serve,"
            " and the sample ratio check counts them as lost"
            for name, b in backends.items()
            if b["moved_away"] and name != baseline
        ),
    ]
    return Section("Failover (moved away from a backend, by cause)", headers, rows, notes)


def _queue_section(backends: dict[str, Any]) -> Section | None:
    """Shown when any request logged a wait for a concurrency slot."""
    if not any(b["queue_ms"]["n"] for b in backends.values()):
        return None
    waits = {name: b["queue_ms"] for name, b in backends.items()}
    rows = [
        [name, f"{q['n']:,}", f"{q['waited']:,}", _fmt(q["p50"]), _fmt(q["p95"])]
        for name, q in waits.items()
    ]
    headers = ["backend", "n", "waited", "p50 ms", "p95 ms"]
    note = "the wait for a concurrency slot (max_in_flight); it is part of latency and TTFT"
    return Section("Queue wait for a slot (ms)", headers, rows, [note])


def _percentile_section(backends: dict[str, Any], metric: str) -> Section:
    rows = [
        [name, f"{b[metric]['p50']['n']:,}", *(_est(b[metric][f"p{q}"]) for q in _PERCENTILES)]
        for name, b in backends.items()
    ]
    headers = ["backend", "n", *(f"p{q} [95% CI]" for q in _PERCENTILES)]
    return Section(f"{_UNITS[metric]} (status 200, no error)", headers, rows)


def _comparison_section(report: dict[str, Any]) -> Section:
    comparison, baseline = report["comparison"], report["baseline"]
    rows, verdicts = [], []
    for name, c in comparison.items():
        for metric in _UNITS:
            m = c[metric]
            rows.append([f"{name} / {baseline}", _UNITS[metric], f"{m['ratio']['n']:,}",
                         _est(m["ratio"], "x"), _p(m["p_value"]),
                         _count(m["samples_needed"])])  # fmt: skip
            verdicts.append(m["verdict"])
    headers = ["backends", "metric", "n (smaller)", "median ratio [95% CI]", "p", "n needed"]
    if not comparison:
        verdicts.append("no backend to compare with the baseline")
    title = "A/B comparison (split or sticky routing, not moved, status 200, no error)"
    alarm = (
        MISMATCH if report["sample_ratio"]["mismatch"]
        else MIXED_VERSIONS if report["config_versions"]["mixed"]
        else None
    )  # fmt: skip
    return Section(title, headers, rows, verdicts, alarm)


def _forced_section(forced: dict[str, Any]) -> Section:
    rows = [
        [name, f"{f['requests']:,}", f"{f['ok']:,}",
         *(_fmt(f[f"median_{metric}"]) for metric in _UNITS)]
        for name, f in forced.items()
    ]  # fmt: skip
    headers = ["backend", "requests", "ok", *(f"median {_UNITS[m]}" for m in _UNITS)]
    notes = ["the client chose the backend: not part of the comparison"] if forced else ["none"]
    return Section("Header-forced requests", headers, rows, notes)


def _breakdown_section(
    title: str, report: dict[str, Any], key: str, min_bucket_samples: int
) -> Section:
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
    note = f"medians of the comparison sample; ratios need {min_bucket_samples}+ samples each"
    return Section(title, headers, rows, [note])


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
    version = check["config_version"]
    of = f", config version {version}" if version else ""
    notes = [f"split from {check['source']}{of}; test p = {_p(check['p_value'])}"]
    alarm = MISMATCH if check["mismatch"] else None
    return Section(title, ["backend", "expected", "observed", "observed share"], rows, notes, alarm)


def _shadow_section(shadow: list[dict[str, Any]]) -> Section:
    rows = [
        [f"{s['from']} -> {s['to']}", f"{s['n']:,}", f"{s['errors']:,}", f"{s['dropped']:,}",
         _percent(s["exact_match_rate"]), _fmt(s["similarity_p50"]),
         " / ".join(_fmt(s["mismatch_prefix_chars"][f"p{q}"]) for q in _PREFIX_PERCENTILES),
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

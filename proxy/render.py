"""The report document (`proxy.report`'s JSON) as aligned terminal tables or one HTML page.

Everything is read from the document, whose schema is stable: this module knows the schema,
not the code that computes it. The page's plots come from `proxy.plots`, drawn from the
request arrays (`proxy.logread`). Sections about things that may not have happened (several
config versions, failover, queueing) are left out when they did not.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from proxy import render_verdict, report_replicas
from proxy.logread import Requests
from proxy.report_routing import CAUSES
from proxy.tables import Section, align, fmt, percent

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


def render_text(report: dict[str, Any], *, min_bucket_samples: int, colour: bool = False) -> str:
    """The report as aligned plain-text tables, the answer first."""
    out = [f"specproxy report (baseline: {report['baseline']})"]
    answer = [render_verdict.answer_section(report)]
    for section in answer + sections(report, min_bucket_samples=min_bucket_samples):
        out += ["", section.title, "-" * len(section.title)]
        if section.alarm:
            out.append(f"\033[1;31m!! {section.alarm}\033[0m" if colour else f"!! {section.alarm}")
        out += align(section.headers, section.rows, numeric=section.numeric)
        out += [f"  {note}" for note in section.notes]
    return "\n".join(out) + "\n"


def render_html(
    report: dict[str, Any],
    figures: list[tuple[str, str]],
    *,
    min_bucket_samples: int,
    forest: str | None = None,
) -> str:
    """One self-contained page that leads with the answer: a card per arm, the cost lines,
    the forest plot of every ratio (`forest`, SVG), then the tables and the other figures."""
    body = [
        f"<h1>specproxy report (baseline: {escape(report['baseline'])})</h1>",
        render_verdict.cards_html(report),
        *(f'<p class="cost">{escape(note)}</p>' for note in
          render_verdict.answer_section(report).notes),
    ]  # fmt: skip
    if forest is not None:
        caption = (
            "Every ratio with its interval, arm / baseline (log scale; 1 = no difference):"
            " always-valid (the verdict), fixed-horizon medians (valid at one look), and"
            " like-for-like buckets (fixed-horizon)"
        )
        body.append(f'<figure class="forest">{forest}<figcaption>{escape(caption)}'
                    "</figcaption></figure>")  # fmt: skip
    body.append('<h2 class="details">Details</h2>')
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
    body.append("<h2>Distributions</h2>")
    for caption, svg in figures:
        body.append(f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>")
    return _PAGE.format(body="\n".join(body))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>specproxy report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 80em; }}
table {{ border-collapse: collapse; font-variant-numeric: tabular-nums; }}
th, td {{ padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child, td:first-child, .text td, .text th {{ text-align: left; }}
.alarm {{ color: #b00; font-weight: bold; }}
figure {{ margin: 1em 0; }} svg {{ max-width: 100%; height: auto; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 1em; }}
.card {{ border: 2px solid #999; border-radius: 8px; padding: 0.8em 1.2em; min-width: 22em;
         max-width: 36em; flex: 1; }}
.card h2 {{ margin: 0; }} .card h3 {{ margin: 0.6em 0 0.2em; font-size: 1em; color: #555; }}
.card p {{ margin: 0.2em 0; }} .card ul {{ margin: 0; padding-left: 1.2em; }}
.card .outcome {{ font-size: 1.6em; font-weight: bold; text-transform: uppercase; }}
.card .big {{ font-size: 1.3em; }} .card .small {{ color: #555; font-size: 0.9em; }}
.card li span {{ color: #555; }}
.good {{ border-color: #2a7; }} .card.good .outcome, li.good {{ color: #176; }}
.bad {{ border-color: #c33; }} .card.bad .outcome, li.bad {{ color: #b00; }}
.wait {{ border-color: #d90; }} .card.wait .outcome {{ color: #a60; }}
.cost {{ font-family: ui-monospace, monospace; }}
h2.details {{ border-top: 1px solid #999; padding-top: 1em; }}
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


def forest(report: dict[str, Any]) -> str | None:
    """The page's forest plot of every ratio in the report (None: no ratio has one)."""
    from proxy import plots

    rows = render_verdict.forest_rows(report)
    return plots.forest_svg(rows) if rows else None


def sections(report: dict[str, Any], *, min_bucket_samples: int) -> list[Section]:
    """The report's tables, in order; `min_bucket_samples` is only quoted in a note."""
    optional = [
        render_verdict.verdict_section(report),
        render_verdict.memory_section(report),
        _input_section(report["input"], report["notes"]),
        _versions_section(report["config_versions"]),
        _backends_section(report["backends"]),
        _failover_section(report["failover"], report["baseline"]),
        _queue_section(report["backends"]),
        *(_percentile_section(report["backends"], metric) for metric in _UNITS),
        _comparison_section(report),
        _forced_section(report["forced"]),
        _like_for_like_section("By prompt length (tokens)", report, "prompt_tokens"),
        _like_for_like_section("Stream or not", report, "stream"),
        _breakdown_section(
            "By load (in flight at dispatch; descriptive)",
            report,
            "in_flight",
            min_bucket_samples,
        ),
        _breakdown_section(
            "By completion length (tokens; descriptive)",
            report,
            "completion_tokens",
            min_bucket_samples,
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
    return " / ".join(f"{name} {percent(shares[name])}" for name in observed) + (
        f" (n={sum(observed.values()):,})"
    )


def _backends_section(backends: dict[str, Any]) -> Section:
    rows = [
        [name, f"{b['requests']:,}", f"{b['traffic']['ab']:,}", f"{b['traffic']['header']:,}",
         f"{b['traffic']['moved']:,}", f"{b['ok']:,}", f"{b['errors']:,}",
         percent(b["error_rate"]), f"{b['client_disconnected']:,}"]
        for name, b in backends.items()
    ]  # fmt: skip
    headers = ["backend", "requests", "A/B", "header-forced", "moved", "ok", "errors",
               "error rate", "disconnected"]  # fmt: skip
    note = (
        "A/B: split or sticky, served where routed; header-forced: the client chose;"
        " moved: failover sent it here. The percentile tables below mix all three"
    )
    return Section("Backends (all requests)", headers, rows, [note])


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
        [name, f"{q['n']:,}", f"{q['waited']:,}", fmt(q["p50"]), fmt(q["p95"])]
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
    which = "streams answered whole" if metric == "ttft_ms" else "answered whole"
    title = f"{_UNITS[metric]} per backend ({which}; A/B, header-forced and moved together)"
    return Section(title, headers, rows)


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
    if any(m["clustered"] for c in comparison.values() for m in c.values() if isinstance(m, dict)):
        verdicts.append(
            "sessions: intervals and p-values resample whole sessions (cluster bootstrap);"
            " n (smaller) counts sessions"
        )
    title = (
        "A/B comparison, fixed-horizon (valid at one look: for repeated looks read the verdict"
        " above); split or sticky routing, not moved, answered whole"
    )
    alarm = (
        MISMATCH if report["sample_ratio"]["mismatch"]
        else MIXED_VERSIONS if report["config_versions"]["mixed"]
        else None
    )  # fmt: skip
    return Section(title, headers, rows, verdicts, alarm)


def _forced_section(forced: dict[str, Any]) -> Section:
    rows = [
        [name, f"{f['requests']:,}", f"{f['ok']:,}",
         *(fmt(f[f"median_{metric}"]) for metric in _UNITS)]
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
            row += [f"{b['n']:,}", fmt(b["median_decode_tps"]), fmt(b["median_latency_ms"])]
        row += [fmt(bucket["decode_ratio"].get(name), "x") for name in others]
        rows.append(row)
    note = (
        f"medians of the comparison sample; ratios need {min_bucket_samples}+ samples each;"
        " descriptive: the arm changes this key itself (a slower arm has more in flight),"
        " so its buckets are not like for like and have no interval"
    )
    return Section(title, headers, rows, [note])


def _like_for_like_section(title: str, report: dict[str, Any], key: str) -> Section:
    """A breakdown by what the arm cannot change: each bucket's ratios with intervals."""
    baseline = report["baseline"]
    rows = []
    for bucket in report["breakdowns"][key]:
        counts = bucket["backends"]
        for name, ratios in bucket.get("ratios", {}).items():
            n = f"{counts[name]['n']:,} / {counts[baseline]['n']:,}"
            cells = [
                _est(r, "x") if r else "-" for r in (ratios["decode_tps"], ratios["latency_ms"])
            ]
            rows.append([bucket["bucket"], f"{name} / {baseline}", n, *cells])
    headers = ["bucket", "backends", "n", "decode median ratio [95% CI]", "latency ratio [95% CI]"]
    note = (
        "like for like: the arm cannot change this key; fixed-horizon intervals (valid at one"
        " look), sessions resampled when present; - where a side has fewer than 5"
    )
    return Section(f"{title}, like for like", headers, rows, [note])


def _sample_ratio_section(check: dict[str, Any]) -> Section:
    """Split-routed requests, then sticky sessions, each against the configured split."""
    title = "Sample ratio (split requests and sticky sessions vs the configured split)"
    rows: list[list[str]] = []
    notes = []
    for unit, part in (("split requests", check), ("sticky sessions", check["sessions"])):
        if part["note"]:
            notes.append(f"{unit}: {part['note']}")
            continue
        rows += [
            [unit, name, percent(share), f"{part['observed'].get(name, 0):,}",
             percent(part["observed_share"].get(name))]
            for name, share in part["expected_share"].items()
        ]  # fmt: skip
        rows += [
            [unit, name, "-", f"{part['observed'][name]:,}", percent(part["observed_share"][name])]
            for name in part["unexpected"]
        ]
        flag = " MISMATCH" if part["mismatch"] else ""
        notes.append(f"{unit}: test p = {_p(part['p_value'])}{flag}")
    if rows:
        version = check["config_version"]
        of = f", config version {version}" if version else ""
        notes.insert(0, f"split from {check['source']}{of}")
    alarm = MISMATCH if check["mismatch"] else None
    headers = ["unit", "backend", "expected", "observed", "observed share"]
    return Section(title, headers, rows, notes, alarm, numeric=True)


def _shadow_section(shadow: list[dict[str, Any]]) -> Section:
    rows = [
        [f"{s['from']} -> {s['to']}", f"{s['n']:,}", f"{s['errors']:,}", f"{s['dropped']:,}",
         percent(s["exact_match_rate"]), fmt(s["similarity_p50"]),
         " / ".join(fmt(s["mismatch_prefix_chars"][f"p{q}"]) for q in _PREFIX_PERCENTILES),
         fmt(s["latency_ratio_median"], "x")]
        for s in shadow
    ]  # fmt: skip
    headers = ["pair", "n", "errors", "dropped", "exact match", "similarity p50",
               "mismatch prefix chars p10/p50/p90", "latency to/from"]  # fmt: skip
    notes = [] if shadow else ["no shadow checks in the logs"]
    return Section("Shadow checks", headers, rows, notes)


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _est(estimate: dict[str, Any], suffix: str = "") -> str:
    if estimate["value"] is None:
        return "-"
    value = fmt(estimate["value"], suffix)
    if estimate["low"] is None or estimate["high"] is None:
        return value
    return f"{value} [{fmt(estimate['low'])}, {fmt(estimate['high'])}]"


def _p(p: float | None) -> str:
    return "-" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"

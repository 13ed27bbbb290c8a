"""The report's per-replica table: each server of each arm, and any that is out of line.

An arm's figures pool its replicas, so one slow machine drags them all down unseen. Here
each replica (by URL: the request line's `replica`) gets its own counts and medians, and
the primary metric, decode speed, is compared with the rest of its arm: the ratio of
medians, replica over the others pooled (`stats.median_ratio`, a bootstrap interval). A
replica is flagged an outlier when

- that interval excludes 1, at a family level of 95% over the arm's replicas (Bonferroni:
  each interval at 1 - 0.05 / m, for m replicas), so an arm of eight identical servers
  flags none 95% of the time, not 66%; and
- its median differs from the rest's by at least `stats.DEFAULT_EFFECT` (10%): with
  thousands of requests every interval excludes 1, and the healthy replicas of an arm with
  one slow machine differ from a "rest" that includes it by a few percent.

Requests count where they were served (any routing reason), answered whole and not sent
behind a shadow check: what the server did, not what the experiment compares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from proxy import stats
from proxy.logread import Requests
from proxy.report_values import estimate, finite

METRIC = "decode_tps"  # the primary metric: what a draft model changes
FAMILY_LEVEL = 0.95
MIN_EFFECT = stats.DEFAULT_EFFECT


def replica_table(
    req: Requests, names: Sequence[str], rng: np.random.Generator, n_boot: int
) -> dict[str, Any]:
    """The `replicas` key of the report's JSON: for each backend in `names` that logged a
    replica, each replica's figures in the order of their URLs."""
    backends = {}
    for name in names:
        mine = req.of(name) & (req.replica >= 0)
        urls = [req.replicas[i] for i in np.unique(req.replica[mine])]
        if urls:
            backends[name] = _arm(req, mine, urls, rng, n_boot)
    return {
        "metric": METRIC,
        "family_level": FAMILY_LEVEL,
        "min_effect": MIN_EFFECT,
        "backends": backends,
    }


def _arm(
    req: Requests, mine: Any, urls: list[str], rng: np.random.Generator, n_boot: int
) -> dict[str, Any]:
    usable = mine & req.ok & ~req.behind_shadow
    level = 1 - (1 - FAMILY_LEVEL) / len(urls)  # Bonferroni over the arm's replicas
    metric = getattr(req, METRIC)
    arm: dict[str, Any] = {}
    for url in urls:
        this = req.replica == req.replicas.index(url)
        served = mine & this
        count, errors = int(served.sum()), int((served & req.error).sum())
        figures: dict[str, Any] = {
            "requests": count,
            "errors": errors,
            "error_rate": errors / count if count else None,
            "ok": int((served & req.ok).sum()),
            METRIC: estimate(
                stats.percentile(finite(metric[usable & this]), 50, rng=rng, n_boot=n_boot)
            ),
            "ttft_ms": estimate(
                stats.percentile(
                    finite(req.ttft_ms[usable & this & req.stream]), 50, rng=rng, n_boot=n_boot
                )
            ),
            "vs_rest": None,
            "level": level,
            "outlier": False,
        }
        if len(urls) > 1:
            ratio = stats.median_ratio(
                metric[usable & this], metric[usable & ~this], rng=rng, n_boot=n_boot, level=level
            )
            figures["vs_rest"] = estimate(ratio)
            figures["outlier"] = is_outlier(ratio)
        arm[url] = figures
    return arm


def is_outlier(ratio: stats.Estimate) -> bool:
    """Whether a replica's ratio to the rest of its arm is out of line: see the module."""
    if ratio.value is None or ratio.low is None or ratio.high is None:
        return False  # too few samples to say
    beyond = ratio.low > 1 or ratio.high < 1
    return beyond and abs(ratio.value - 1) >= MIN_EFFECT


Shown = tuple[str, list[str], list[list[str]], list[str], str | None]


def rows(table: dict[str, Any] | None) -> Shown | None:
    """The terminal and HTML table (title, headers, rows, notes, alarm: render.Section's
    fields), shown when an arm has several replicas; None otherwise (one server per arm:
    the backends' table says it all)."""
    if table is None or not any(len(arm) > 1 for arm in table["backends"].values()):
        return None
    body, outliers = [], []
    for name, arm in table["backends"].items():
        outliers += [f"{name} {url}" for url, r in arm.items() if r["outlier"]]
        for url, r in arm.items():
            body.append(
                [
                    name,
                    url,
                    f"{r['requests']:,}",
                    f"{r['errors']:,}",
                    _cell(r[METRIC]),
                    _cell(r["ttft_ms"]),
                    "-" if r["vs_rest"] is None else _cell(r["vs_rest"], "x"),
                    "OUTLIER" if r["outlier"] else "",
                ]
            )
    headers = ["backend", "replica", "requests", "errors", "decode tok/s p50", "TTFT ms p50"]
    headers += ["decode vs rest [CI]", ""]
    notes = [
        f"decode speed, each replica against the rest of its arm (median ratio): OUTLIER when"
        f" the interval excludes 1 at a family level of {FAMILY_LEVEL:.0%} per arm"
        f" (Bonferroni) and the medians differ by {MIN_EFFECT:.0%} or more",
    ]
    alarm = f"OUTLIER REPLICA: {', '.join(outliers)}" if outliers else None
    return "Replicas (served there, answered whole)", headers, body, notes, alarm


def _cell(value: dict[str, Any], suffix: str = "") -> str:
    """An estimate as render.py writes one: `value [low, high]`."""
    if value["value"] is None:
        return "-"
    text = _fmt(value["value"]) + suffix
    if value["low"] is None or value["high"] is None:
        return text
    return f"{text} [{_fmt(value['low'])}, {_fmt(value['high'])}]"


def _fmt(value: float) -> str:
    """render.py's rule (which imports this module): three significant digits or so."""
    size = abs(value)
    digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 or size == 0 else 3
    return f"{value:,.{digits}f}"

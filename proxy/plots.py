"""The report's figures, drawn with matplotlib and returned as SVG text for inlining.

No pyplot: each figure is a `matplotlib.figure.Figure` of its own, so nothing global (no
backend choice, no figure registry) is touched. Large samples are reduced before drawing (a
CDF to 500 quantiles, a timeline to 200 windows) so the page stays small at a million lines.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

CDF_POINTS = 500
TIMELINE_WINDOWS = 200
MIN_WINDOW = 5  # requests per window of the rolling median, at least


def cdf_svg(samples: dict[str, np.ndarray], xlabel: str, *, log_x: bool = False) -> str:
    """The empirical CDF of each backend's samples, one line each."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    levels = np.linspace(0.0, 1.0, CDF_POINTS + 1)
    for name, values in samples.items():
        values = values[np.isfinite(values)]
        if values.size:
            ax.step(
                np.quantile(values, levels),
                levels,
                where="post",
                label=f"{name} (n={values.size:,})",
            )
    if log_x and all((v[np.isfinite(v)] > 0).all() for v in samples.values()):
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of requests")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if ax.get_lines():  # none drawn: matplotlib would warn about an empty legend
        ax.legend(loc="lower right")
    return _svg(fig)


def timeline_svg(times: dict[str, np.ndarray], values: dict[str, np.ndarray], ylabel: str) -> str:
    """Each backend's rolling median of `values` against time (seconds since the epoch)."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    for name in values:
        when, median = rolling_median(times[name], values[name])
        if when.size:
            ax.plot(
                when.astype(np.int64).astype("datetime64[ms]"),
                median,
                marker=".",
                markersize=3,
                label=name,
            )
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="best")
    fig.autofmt_xdate()
    return _svg(fig)


def rolling_median(
    times: np.ndarray, values: np.ndarray, windows: int = TIMELINE_WINDOWS
) -> tuple[np.ndarray, np.ndarray]:
    """Medians of consecutive windows of equal count, in time order: (time ms, value)."""
    keep = np.isfinite(times) & np.isfinite(values)
    order = np.argsort(times[keep], kind="stable")
    times, values = times[keep][order], values[keep][order]
    count = max(1, min(windows, times.size // MIN_WINDOW))
    if times.size == 0:
        return np.array([]), np.array([])
    chunks = zip(np.array_split(times, count), np.array_split(values, count), strict=True)
    pairs = [(np.median(t) * 1000, np.median(v)) for t, v in chunks]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


# Ratios near 1 on a log axis: plain numbers, symmetric around 1 (1.25 and 0.8 are as far).
FOREST_TICKS = (0.1, 0.2, 0.33, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
FOREST_TICKS_WIDE = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
FOREST_COLOURS = {"always-valid": "C0", "fixed-horizon": "C1", "bucket": "C2"}


def forest_svg(rows: list[tuple[str, float, float, float, str]]) -> str:
    """One line per ratio, top to bottom: its interval as a bar, its value as a dot, on a
    log axis with 1 (no difference) marked. `rows` are (label, value, low, high, kind)."""
    fig = Figure(figsize=(7, 0.9 + 0.28 * max(len(rows), 1)))
    ax = fig.add_subplot()
    positions = np.arange(len(rows))[::-1]
    seen = set()
    for y, (_, value, low, high, kind) in zip(positions, rows, strict=True):
        colour = FOREST_COLOURS.get(kind, "C3")
        label = kind if kind not in seen else None
        seen.add(kind)
        ax.plot([low, high], [y, y], color=colour, linewidth=2.5, solid_capstyle="butt")
        ax.plot([value], [y], "o", color=colour, markersize=4, label=label)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(positions, [row[0] for row in rows])
    ax.set_ylim(-0.7, max(len(rows), 1) - 0.3)
    if rows and min(row[2] for row in rows) > 0:
        ax.set_xscale("log")
        low, high = ax.get_xlim()
        ladder = FOREST_TICKS if high / low < 4 else FOREST_TICKS_WIDE  # never crowded
        ticks = [t for t in ladder if low <= t <= high]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("ratio arm / baseline (decode: above 1 is faster; times: below 1 is faster)")
    ax.grid(alpha=0.3, axis="x")
    if seen:
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize="small",
                  frameon=False)  # fmt: skip
    return _svg(fig)


def _svg(fig: Figure) -> str:
    buffer = io.StringIO()
    # Text as text: smaller than glyph paths, and searchable in the page.
    with rc_context({"svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE to inline it

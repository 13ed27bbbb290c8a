"""The report's tables, for the terminal and the page alike: a `Section`, how a cell
shows a number, and plain-text alignment. Shared by `proxy.render` and
`proxy.render_verdict`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    """One table of the report, the same for the terminal and the HTML page."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = dataclasses.field(default_factory=list)
    alarm: str | None = None  # shouted, in red on a terminal
    numeric: bool = True  # right-align every column but the first


def fmt(value: float | None, suffix: str = "") -> str:
    if value is None:
        return "-"
    size = abs(value)
    digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 or size == 0 else 3
    return f"{value:,.{digits}f}{suffix}"


def percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def align(headers: list[str], rows: list[list[str]], *, numeric: bool) -> list[str]:
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

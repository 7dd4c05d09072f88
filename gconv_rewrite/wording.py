"""Text shared by the terminal reports (inspect, rewrite, tune): 80 columns, the same warnings."""

from __future__ import annotations

import textwrap
from typing import Iterable


def tail(name: str, width: int) -> str:
    """`name` cut to `width` columns, keeping its informative end (node names have no spaces to wrap at)."""
    return name if len(name) <= width else "..." + name[-(width - 3):]


def warning_lines(computes: Iterable[str], warnings: Iterable[str]) -> list[str]:
    """Summary warnings: emulations that are not grouped convs (from what each candidate computes),
    then the others (e.g. an ignored tune cache), wrapped without breaking paths."""
    lines = []
    wrong = sum("NOT a grouped conv" in text for text in computes)
    if wrong:
        lines.append(f"  warning: {wrong} emulation(s) sum over the multiplier axis: NOT grouped convs")
    lines += [textwrap.fill(f"warning: {w}", 80, initial_indent="  ", subsequent_indent="    ",
                            break_on_hyphens=False, break_long_words=False) for w in warnings]
    return lines

"""Text shared by all reports: the JSON schema ids and versions of every report, and the terminal
reports' helpers (80 columns, the same warnings). Each report's own wording is beside its data:
report.py (rewrite), inspection.py, tune_report.py, verify.py."""

from __future__ import annotations

import textwrap
from typing import Iterable

# The JSON reports (docs/reports.md): schema id and version. Bump a version on any change that is not
# a pure addition of fields.
REWRITE_REPORT = ("gconv-rewrite/rewrite-report", 1)
INSPECT_REPORT = ("gconv-rewrite/inspect-report", 1)
TUNE_REPORT = ("gconv-rewrite/tune-report", 1)
VERIFY_REPORT = ("gconv-rewrite/verify-report", 1)


def schema(report: tuple[str, int]) -> dict:
    """The opening keys of a JSON report: {"schema": id, "version": n}."""
    return {"schema": report[0], "version": report[1]}


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

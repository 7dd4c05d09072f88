"""The tune report: per distinct geometry of a model, every form's measured time, worded for the
terminal (80 columns) and as plain data (`tune --json`)."""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, field

from .geometry import FORMS
from .wording import TUNE_REPORT, schema, tail


@dataclass
class TuneEntry:
    """One distinct conv geometry of a model, as measured (or found in the cache)."""

    probe: str
    nodes: list[str]  # the candidates with this geometry
    times_ms: dict[str, float | None]
    best: str
    cached: bool
    notes: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        """The node(s), then each form's time and the fastest, wrapped to 80 columns."""
        times = ", ".join(f"{f} {self.times_ms[f]:.3f}" for f in FORMS if self.times_ms.get(f) is not None)
        where = self.nodes[0] + (f" (+{len(self.nodes) - 1} more)" if len(self.nodes) > 1 else "")
        native = self.times_ms.get("native")
        gain = f" ({native / self.times_ms[self.best]:.2f}x native)" if native and self.best != "native" else ""
        head = tail(where, 70) + (" [cached]" if self.cached else "")
        return head + "\n" + textwrap.fill(f"measured ms: {times} -> {self.best}{gain}", 80, initial_indent="    ",
                                           subsequent_indent="      ")


@dataclass
class TuneReport:
    """What `tune` measured: per distinct geometry, every form's time on the target."""

    target: str
    cache: str
    entries: list[TuneEntry] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # candidates without a static geometry

    def lines(self) -> list[str]:
        """The terminal report: one line per geometry, a summary, the cache file."""
        lines = [e.line() for e in self.entries]
        measured = sum(not e.cached for e in self.entries)
        wins = {f: sum(e.best == f for e in self.entries) for f in FORMS}
        summary = (f"{len(self.entries)} geometr{'y' if len(self.entries) == 1 else 'ies'}: "
                   f"{measured} measured, {len(self.entries) - measured} from the cache")
        if self.entries:
            summary += "; fastest: " + ", ".join(f"{f} {n}" for f, n in wins.items() if n)
        lines.append(summary)
        lines.append(textwrap.fill(f"on: {self.target}", 80, subsequent_indent="  "))
        if self.skipped:
            lines.append(textwrap.fill(f"not tuned (spatial size not static; give it with --input-shape): "
                                       f"{', '.join(self.skipped)}", 80, subsequent_indent="  "))
        lines.append(f"cache: {self.cache}")
        return lines

    def summary(self) -> str:
        """One line for the main command's report after --tune."""
        measured = sum(not e.cached for e in self.entries)
        text = (f"tuned {len(self.entries)} geometr{'y' if len(self.entries) == 1 else 'ies'} "
                f"({measured} measured, {len(self.entries) - measured} cached)")
        if self.skipped:
            text += f"; {len(self.skipped)} not tuned (spatial size not static)"
        return text

    def to_dict(self) -> dict:
        """Plain data, as `tune --json` prints it (schema gconv-rewrite/tune-report, docs/reports.md)."""
        return schema(TUNE_REPORT) | asdict(self)

"""The rewrite report: one `Decision` per candidate and the `RewriteResult`, worded for the terminal
(the 80-column table, the summary) and as plain data (the JSON report, docs/reports.md). The
schema ids of all reports and the text they share are in wording.py."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from onnx import ModelProto

from . import model_io
from .cost import Prediction
from .geometry import ConvSpec
from .wording import REWRITE_REPORT, schema, tail, warning_lines

if TYPE_CHECKING:  # annotations only: the reports of the later stages, which never import this module
    from .tune_report import TuneReport
    from .verify import VerifyReport


@dataclass
class Decision:
    """What happened to one candidate node, and why."""

    node: str
    kind: str  # "grouped_conv" (a native grouped Conv) | "emulation" (a depthwise Conv + channel sums)
    #            | "split" (Convs on channel slices + Concat) | "dense" (a Conv with block-diagonal weights)
    action: str  # "fused" (to one Conv) | "expanded" (to the depthwise emulation) | "converted" | "kept" | "skipped"
    #              | "reverted" (auto mode: rewritten, but not measurably faster, so undone)
    computes: str  # what the node or region computes
    reason: str
    spec: ConvSpec | None = None
    graph: str = "main"
    nodes_removed: int = 0
    nodes_added: int = 0
    form: str | None = None  # the form afterwards: native | dw | split | dense, or "depthwise" for a wrong
    #                          emulation fused into the plain depthwise Conv it equals (None: skipped)
    prediction: Prediction | None = None  # each form's predicted / measured time on the target provider
    code: str = ""  # skipped: the reason's stable short code (analysis.SKIP_CODES, docs/reports.md)
    was: str | None = None  # the form it arrived in: native | dw | split | dense (None: skipped)

    TABLE_HEADER = f"{'action':<9} {'node':<34} {'form':<9} {'ms before -> after':>24}"

    def row(self) -> str:
        """One row of the 80-column table: action, node, form afterwards, predicted (or tuned) ms."""
        node = self.node if self.graph == "main" else f"{self.node} [{self.graph}]"
        node = tail(node, 34)
        times = ""
        p = self.prediction
        if p is not None and self.form is not None:
            t = {f: v for f, v in (p.measured_ms or p.times_ms).items() if v is not None}
            original = self.was
            if original in t and self.form in t:
                times = f"{t[original]:.3f} -> {t[self.form]:.3f}{' *' if p.basis == 'measured' else ''}"
        return f"{self.action:<9} {node:<34} {self.form or '-':<9} {times:>24}"

    def line(self) -> str:
        """One human-readable line for the terminal."""
        where = "" if self.graph == "main" else f" [{self.graph}]"
        text = f"{self.action:<8} {self.node}{where}: {self.computes}"
        if self.action in ("expanded", "fused", "converted"):
            text += f" ({self.nodes_removed} -> {self.nodes_added} nodes)"
        if self.reason:
            text += f" - {self.reason}" + (f" [{self.code}]" if self.code else "")
        return text


@dataclass
class RewriteResult:
    """The rewritten model, one Decision per candidate, and (when run) the verification report."""

    model: ModelProto
    decisions: list[Decision]
    direction: str
    source: model_io.ModelInfo
    verification: VerifyReport | None = None
    provider: str = "cpu"  # the target the forms were chosen for
    planner: str = ""  # the cost model used, in words (calibrated or not, on which device)
    tuning: TuneReport | None = None  # when tune_first
    warnings: list[str] = field(default_factory=list)  # e.g. an unreadable tune cache

    @property
    def graph(self):
        """The rewritten model as an onnx-graphsurgeon Graph (for pipelines that hold their models as one)."""
        return model_io.to_graphsurgeon(self.model)

    @property
    def changed(self) -> bool:
        """True when any candidate was rewritten (and not reverted)."""
        return any(d.action in ("expanded", "fused", "converted") for d in self.decisions)

    def count(self, action: str) -> int:
        """Number of decisions with `action` (fused, expanded, converted, kept, skipped, reverted)."""
        return sum(d.action == action for d in self.decisions)

    def predicted_ms(self) -> tuple[float, float] | None:
        """Predicted (or tuned) time of the rewritable convs before and after, on the target; None if unknown."""
        before = after = 0.0
        for d in self.decisions:
            if d.form is None or d.prediction is None:
                continue
            times = {f: t for f, t in (d.prediction.measured_ms or d.prediction.times_ms).items() if t is not None}
            original = d.was
            if original not in times or d.form not in times:
                return None
            before += times[original]
            after += times[d.form]
        return (before, after) if before > 0 else None

    def weight_bytes(self) -> tuple[int, int]:
        """Bytes of the main graph's initializers before and after."""
        return self.source.weight_bytes, sum(model_io.tensor_nbytes(t) for t in self.model.graph.initializer)

    def summary(self) -> list[str]:
        """The closing lines of the terminal report (80 columns)."""
        counts = ", ".join(f"{self.count(a)} {a}" for a in ("fused", "expanded", "converted", "kept", "skipped",
                                                              "reverted") if a != "reverted" or self.count(a))
        lines = [f"{len(self.decisions)} candidate(s): {counts}"]
        skipped = sorted({d.reason for d in self.decisions if d.action == "skipped"})
        for reason in skipped[:3]:
            lines.append(textwrap.fill(f"skipped: {reason}", 80, initial_indent="  ", subsequent_indent="    "))
        if len(skipped) > 3:
            lines.append(f"  ... {len(skipped) - 3} other skip reason(s); see the lines above")
        lines += warning_lines((d.computes for d in self.decisions), self.warnings)
        predicted = self.predicted_ms()
        if predicted and self.changed:
            b, a = predicted
            bases = {d.prediction.basis for d in self.decisions if d.prediction is not None}
            label = "tuned/predicted" if "measured" in bases else "predicted"
            if "prior" in bases:
                label += ", uncalibrated"
            elif "similar" in bases:
                label += ", not calibrated here"
            lines.append(f"grouped convs on {self.provider}: {b:.2f} ms -> {a:.2f} ms {label} ({b / a:.2f}x)")
        wb, wa = self.weight_bytes()
        if self.changed:
            lines.append(f"weights: {wb / 2**20:.2f} MiB -> {wa / 2**20:.2f} MiB")
        return lines

    def save(self, path: str | os.PathLike) -> None:
        """Write the model atomically; external data beside it if the input had some or it exceeds 2 GB."""
        model_io.save(self.model, path, external_data=self.source.external_data or None)

    def to_dict(self) -> dict:
        """The report as plain data (wording.REWRITE_REPORT): what --report and --json write."""
        from . import __version__  # noqa: PLC0415 - at module level it would be an import cycle with __init__
        counts = {a: self.count(a) for a in ("fused", "expanded", "converted", "kept", "skipped", "reverted")}
        predicted = self.predicted_ms()
        weights = self.weight_bytes()
        return {
            **schema(REWRITE_REPORT), "tool_version": __version__,
            "input": self.source.path, "direction": self.direction, "provider": self.provider,
            "cost_model": self.planner, "counts": counts,
            "predicted_ms": {"before": predicted[0], "after": predicted[1]} if predicted else None,
            "weight_bytes": {"before": weights[0], "after": weights[1]},
            "decisions": [dataclasses.asdict(d) for d in self.decisions],
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "tuning": self.tuning.to_dict() if self.tuning is not None else None,
            "warnings": self.warnings,
        }

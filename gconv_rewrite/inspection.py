"""`inspect`: every grouped Conv and emulation in a model, what it computes and what it costs; nothing written."""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, field

import numpy as np

from . import basis, model_io, runtime
from .analysis import SKIPPED_WHAT, Composite, Emulation, NativeGrouped, Skip, analyse, planning_spec
from .cost import Prediction
from .geometry import FORMS, ConvSpec
from .graph import GraphIndex, ShapeTable, default_opset, subgraphs
from .tracing import node_label
from .tune_cache import cached_planner
from .wording import INSPECT_REPORT, schema, tail, warning_lines


@dataclass
class Finding:
    """One candidate as found: a native grouped Conv, an emulation, or a near-miss and why."""

    node: str
    graph: str
    kind: str  # "grouped_conv" | "emulation" | "split" | "dense"
    status: str  # "native" | "emulated" | "split" | "dense" | "skipped"
    computes: str
    reason: str = ""
    spec: ConvSpec | None = None
    emulation_nodes: int = 0  # nodes of the emulation region (depthwise Conv included) or of a composite
    intermediate_mb_per_image: float | None = None  # the emulation's Cig-times-larger tensor
    prediction: Prediction | None = None  # each form's predicted (or tuned) time on the target
    code: str = ""  # skipped: the reason's stable short code (docs/reports.md)
    found_as: str = ""  # a grouped conv written with other ops: how (e.g. "Split -> 8 Convs -> Concat")

    def line(self) -> str:
        """The finding for the terminal (several lines of at most ~80 columns)."""
        where = "" if self.graph == "main" else f" [{self.graph}]"
        parts = [self.computes]
        if self.spec is not None:
            geometry = self.spec.describe()
            s = self.spec  # the next line says the geometry; the first need not repeat it
            for said in (" " + geometry, f" G={s.group} (Cig={s.cig}, Cog={s.cog})"):
                parts[0] = parts[0].replace(said, "")
            parts.append(self.spec.describe(shapes=True))
        if self.found_as:
            parts[0] = f"{self.found_as}: a {parts[0]}"
        elif self.status == "emulated":
            parts[0] = "equals a " + parts[0]
        elif parts[0] == "grouped Conv" and len(parts) > 1:
            parts.pop(0)  # a native grouped Conv: its geometry says it all
        if self.intermediate_mb_per_image is not None:
            verb = "uses" if self.status == "emulated" else "would use"
            parts.append(f"the emulation {verb} {self.intermediate_mb_per_image:.2f} MiB per image extra")
        if self.reason:
            parts.append(self.reason + (f" [{self.code}]" if self.code else ""))
        if self.prediction is not None and self.prediction.times_ms:
            parts.append(self.prediction.times_line())
            if self.prediction.work:
                parts.append(self.prediction.work)
        elif self.prediction is not None:
            parts.append(self.prediction.why)
        indent = " " * 6
        body = [textwrap.fill(part, 80, initial_indent=indent, subsequent_indent=indent + "  ") for part in parts]
        text = "\n".join([f"{self.status:<9} {tail(self.node + where, 70)}"] + body)
        return text


@dataclass
class InspectReport:
    findings: list[Finding] = field(default_factory=list)
    provider: str = "cpu"  # the target of the predictions
    cost_model: str = ""
    warnings: list[str] = field(default_factory=list)  # e.g. an unreadable tune cache

    def count(self, status: str) -> int:
        """Number of findings with `status` ("native", "emulated", "split", "dense" or "skipped")."""
        return sum(f.status == status for f in self.findings)

    def lines(self) -> list[str]:
        """The terminal report: every finding, then a summary."""
        written = "".join(f", {self.count(s)} {s}" for s in ("split", "dense") if self.count(s))
        summary = [f"{len(self.findings)} candidate(s): {self.count('native')} native grouped, "
                   f"{self.count('emulated')} emulated{written}, {self.count('skipped')} skipped"]
        summary += warning_lines((f.computes for f in self.findings), self.warnings)
        return self.table() + [f.line() for f in self.findings] + summary + [
            textwrap.fill(f"cost model: {self.cost_model}", 80, subsequent_indent="  ")]

    def table(self) -> list[str]:
        """One 80-column row per finding (status, node, G, Cig x Cog, kernel, stride, the pick), then a rule."""
        if not self.findings:
            return []
        rows = [f"{'status':<9} {'node':<30} {'G':>3} {'CigxCog':>7} {'k':>5} {'s':>4} {'pick (ms)':>15}"]
        for f in self.findings:
            geometry = pick = ""
            if f.spec is not None:
                s = f.spec
                geometry = (f"{s.group:>3} {f'{s.cig}x{s.cog}':>7} {'x'.join(map(str, s.kernel)):>5} "
                            f"{'x'.join(map(str, s.strides)):>4}")
            p = f.prediction
            if p is not None and p.times_ms:
                times = p.measured_ms or p.times_ms
                pick = f"{p.form} {times[p.form]:.3f}{'*' if p.measured_ms else ''}" if times.get(p.form) else p.form
            elif "NOT a grouped conv" in f.computes:
                pick = "NOT grouped"
            rows.append(f"{f.status:<9} {tail(f.node, 30):<30} {geometry:<22} {pick:>15}".rstrip())
        if any(f.prediction is not None and f.prediction.measured_ms for f in self.findings):
            rows.append("(* measured by tune; other times predicted by the cost model)")
        return rows + ["-" * 79]

    def to_dict(self) -> dict:
        """Plain data (schema gconv-rewrite/inspect-report, docs/reports.md)."""
        return {**schema(INSPECT_REPORT), "provider": self.provider,
                "cost_model": self.cost_model, "findings": [asdict(f) for f in self.findings],
                "warnings": self.warnings}


def inspect(model: model_io.ModelSource, provider: str = "auto", *, cache: str | None = None,
            input_shapes: dict[str, tuple[int, ...]] | None = None, _info=None, device: str | None = None,
            profile: str | None = None) -> InspectReport:
    """Find every grouped Conv and emulation subgraph (all graphs) without changing anything.

    Each finding carries every form's predicted time on `provider` (measured, where `tune`
    cached this geometry) and the form the cost model would pick. `input_shapes` resolves
    symbolic input dims (name -> shape) for those predictions. `device` (provider "cuda"): plan for
    that GPU model with its shipped CUDA profile. `profile` names the cost profile (a shipped
    one's name or a file; default: see basis.select).
    """
    if _info is None:
        loaded, info = model_io.load(model)
    else:
        loaded, info = model, _info
    shapes = ShapeTable(loaded, info.value_infos or None)
    resolved = ShapeTable(loaded, model_io.shapes_at(loaded, input_shapes)) if input_shapes else None
    opset = default_opset(loaded)
    choice = runtime.target_provider(provider)  # nothing runs: a CPU-only machine may inspect for CUDA
    chosen = basis.select(choice.name, named=profile)
    planner = cached_planner(choice.name, cache, chosen.profile, device=device)
    report = InspectReport(provider=choice.name, cost_model=planner.describe(),
                           warnings=chosen.warnings + ([planner.warning] if planner.warning else []))

    def visit(graph, outer, path):
        ix = GraphIndex(graph, shapes, opset, outer, path, loaded.ir_version)
        for node in ix.nodes:
            if node.attribute:
                for sub in subgraphs(node):
                    visit(sub, ix, f"{path}/{node_label(node)}/{sub.name or 'body'}")
        for cand in analyse(ix):
            finding = _finding(cand, path, planning_spec(cand, resolved))
            if finding.status != "skipped" and finding.spec is not None and not finding.spec.is_depthwise:
                finding.prediction = planner.plan(finding.spec, tuple(f for f in FORMS if f != "dw" or opset >= 5))
            report.findings.append(finding)

    visit(loaded.graph, None, "main")
    return report


def _finding(cand, path: str, spec: ConvSpec | None) -> Finding:
    if isinstance(cand, Skip):
        what = SKIPPED_WHAT[cand.kind]
        return Finding(node_label(cand.node), path, cand.kind, "skipped", what, cand.reason, spec, code=cand.code)
    mb = None
    elements = spec.emulation_intermediate_elements()
    if isinstance(cand, Emulation) and spec.output_spatial_size() is not None:
        # What this region materialises: its depthwise Conv's output (a wrong emulation's
        # is as large as a right one's, though what it equals has multiplier 1).
        elements = spec.output_spatial_size() * cand.dw_weight.shape[0]
    if elements is not None:
        mb = elements * np.dtype(spec.dtype).itemsize / 2**20
    if isinstance(cand, NativeGrouped):
        return Finding(node_label(cand.node), path, "grouped_conv", "native", f"grouped Conv {spec.describe()}",
                       spec=spec, intermediate_mb_per_image=mb)
    if isinstance(cand, Composite):
        status = {"dw": "emulated", "native": "native"}.get(cand.was, cand.was)
        return Finding(node_label(cand.anchor), path, cand.kind, status,
                       cand.grouping.describe(), spec=spec, emulation_nodes=len(cand.nodes),
                       intermediate_mb_per_image=mb, found_as=cand.found_as)
    assert isinstance(cand, Emulation)
    return Finding(node_label(cand.dw), path, "emulation", "emulated", cand.grouping.describe(), spec=spec,
                   emulation_nodes=len(cand.nodes) + 1, intermediate_mb_per_image=mb)

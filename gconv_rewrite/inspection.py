"""`inspect`: every grouped Conv and emulation in a model, what it computes and what it costs; nothing written."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from . import model_io
from .analysis import Emulation, NativeGrouped, Skip, analyse, node_label
from .geometry import ConvSpec
from .graph import GraphIndex, ShapeTable, default_opset, subgraphs


@dataclass
class Finding:
    """One candidate as found: a native grouped Conv, an emulation, or a near-miss and why."""

    node: str
    graph: str
    kind: str  # "grouped_conv" | "emulation"
    status: str  # "native" | "emulated" | "skipped"
    computes: str
    reason: str = ""
    spec: ConvSpec | None = None
    emulation_nodes: int = 0  # nodes of the emulation region (depthwise Conv included)
    intermediate_mb_per_image: float | None = None  # the emulation's Cig-times-larger tensor

    def line(self) -> str:
        where = "" if self.graph == "main" else f" [{self.graph}]"
        text = f"{self.status:<9} {self.node}{where}: {self.computes}"
        if self.spec is not None and self.spec.output_shape and self.spec.output_spatial_size():
            text += " out " + "x".join(str(d) for d in self.spec.output_shape[2:])
        if self.intermediate_mb_per_image is not None:
            verb = "uses" if self.status == "emulated" else "would use"
            text += f"; emulation {verb} {self.intermediate_mb_per_image:.2f} MB/image extra"
        if self.reason:
            text += f" - {self.reason}"
        return text


@dataclass
class InspectReport:
    findings: list[Finding] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(f.status == status for f in self.findings)

    def lines(self) -> list[str]:
        summary = (f"{len(self.findings)} candidate(s): {self.count('native')} native grouped, "
                   f"{self.count('emulated')} emulated, {self.count('skipped')} skipped")
        return [f.line() for f in self.findings] + [summary]

    def to_dict(self) -> dict:
        return {"findings": [asdict(f) for f in self.findings]}


def inspect(model: model_io.ModelSource) -> InspectReport:
    """Find every grouped Conv and emulation subgraph (all graphs) without changing anything."""
    loaded, info = model_io.load(model)
    shapes = ShapeTable(loaded, info.value_infos or None)
    opset = default_opset(loaded)
    report = InspectReport()

    def visit(graph, outer, path):
        ix = GraphIndex(graph, shapes, opset, outer, path, loaded.ir_version)
        for node in ix.nodes:
            if node.attribute:
                for sub in subgraphs(node):
                    visit(sub, ix, f"{path}/{node_label(node)}/{sub.name or 'body'}")
        report.findings.extend(_finding(c, path) for c in analyse(ix))

    visit(loaded.graph, None, "main")
    return report


def _finding(cand, path: str) -> Finding:
    if isinstance(cand, Skip):
        what = "grouped Conv" if cand.kind == "grouped_conv" else "depthwise Conv followed by channel ops"
        return Finding(node_label(cand.node), path, cand.kind, "skipped", what, cand.reason, cand.spec)
    spec = cand.spec
    mb = None
    elements = spec.emulation_intermediate_elements()
    if elements is not None:
        mb = elements * np.dtype(spec.dtype).itemsize / 2**20
    if isinstance(cand, NativeGrouped):
        return Finding(node_label(cand.node), path, "grouped_conv", "native", f"grouped Conv {spec.describe()}",
                       spec=spec, intermediate_mb_per_image=mb)
    assert isinstance(cand, Emulation)
    return Finding(node_label(cand.dw), path, "emulation", "emulated", cand.grouping.describe(), spec=spec,
                   emulation_nodes=len(cand.nodes) + 1, intermediate_mb_per_image=mb)

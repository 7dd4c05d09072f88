"""Plan and apply rewrites: the only module that edits graphs.

Per graph (subgraphs first, bottom-up): analyse once, decide per candidate, collect all edits,
then rebuild the node list once and drop what became dead. Nothing outside the rewritten
regions changes: names, value_info, metadata, IR version and opsets are kept.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, helper

from . import model_io
from .analysis import Emulation, NativeGrouped, Skip, analyse, node_label, planning_spec
from .cost import Planner, Prediction
from .geometry import ConvSpec
from .graph import SHAPE_ONLY_OPS, GraphIndex, NameGen, ShapeTable, attr, default_opset, outer_references, subgraphs
from .lowering import (conv_node, dense_weights, expand_weights, fuse_weights, int64_tensor, reduce_sum_node,
                       split_weights, tensor)
from .wording import tail, warning_lines

if TYPE_CHECKING:  # verify and tuning import this module's names; only the annotations need theirs
    from .tuning import TuneReport
    from .verify import VerifyReport

Direction = Literal["auto", "expand", "fuse"]
DIRECTIONS = ("auto", "expand", "fuse")
Form = Literal["native", "dw", "split", "dense"]
FORMS = ("native", "dw", "split", "dense")
_FORM_TEXT = {"native": "one Conv(group=G)", "dw": "depthwise Conv + Reshape + ReduceSum + Reshape",
              "split": "Split -> G Convs -> Concat", "dense": "one dense Conv with block-diagonal weights"}


@dataclass
class Decision:
    """What happened to one candidate node, and why."""

    node: str
    kind: str  # "grouped_conv" (a native grouped Conv) | "emulation" (a depthwise Conv + channel sums)
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

    TABLE_HEADER = f"{'action':<9} {'node':<34} {'form':<9} {'ms before -> after':>24}"

    def row(self) -> str:
        """One row of the 80-column table: action, node, form afterwards, predicted (or tuned) ms."""
        node = self.node if self.graph == "main" else f"{self.node} [{self.graph}]"
        node = tail(node, 34)
        times = ""
        p = self.prediction
        if p is not None and self.form is not None:
            t = {f: v for f, v in (p.measured_ms or p.times_ms).items() if v is not None}
            original = "native" if self.kind == "grouped_conv" else "dw"
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


# JSON report: bump REPORT_VERSION on any change that is not a pure addition of fields.
REPORT_SCHEMA = "gconv-rewrite/rewrite-report"
REPORT_VERSION = 1


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
            original = "native" if d.kind == "grouped_conv" else "dw"
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
            lines.append(f"grouped convs on {self.provider}: {b:.2f} ms -> {a:.2f} ms {label} ({b / a:.2f}x)")
        wb, wa = self.weight_bytes()
        if self.changed:
            lines.append(f"weights: {wb / 2**20:.2f} MiB -> {wa / 2**20:.2f} MiB")
        return lines

    def save(self, path: str | os.PathLike) -> None:
        """Write the model atomically; external data beside it if the input had some or it exceeds 2 GB."""
        model_io.save(self.model, path, external_data=self.source.external_data or None)

    def to_dict(self) -> dict:
        """The report as plain data (REPORT_SCHEMA, version REPORT_VERSION): what --report and --json write."""
        from . import __version__
        counts = {a: self.count(a) for a in ("fused", "expanded", "converted", "kept", "skipped", "reverted")}
        predicted = self.predicted_ms()
        weights = self.weight_bytes()
        return {
            "schema": REPORT_SCHEMA, "version": REPORT_VERSION, "tool_version": __version__,
            "input": self.source.path, "direction": self.direction, "provider": self.provider,
            "cost_model": self.planner, "counts": counts,
            "predicted_ms": {"before": predicted[0], "after": predicted[1]} if predicted else None,
            "weight_bytes": {"before": weights[0], "after": weights[1]},
            "decisions": [dataclasses.asdict(d) for d in self.decisions],
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "tuning": self.tuning.to_dict() if self.tuning is not None else None,
            "warnings": self.warnings,
        }


def rewrite_model(model: ModelProto, direction: Direction = "auto", form: Form | None = None,
                  value_infos: dict | None = None, planner: Planner | None = None,
                  plan_shapes: dict | None = None) -> list[Decision]:
    """Rewrite `model` in place (callers pass their own copy) and return the decisions.

    `form` forces every grouped conv (native or emulated) into one form; `direction` then is moot.
    `value_infos`: the model's inferred shapes when already known (model_io.load returns them).
    `planner`: the cost model of the target provider (default: onnxruntime CPU on this machine).
    `plan_shapes`: value shapes at concrete input shapes (model_io.shapes_at), for planning and
    reports where the model's spatial dims are symbolic; the graph stays symbolic.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if form is not None and form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    shapes = ShapeTable(model, value_infos or None)
    names = NameGen(model)
    opset = default_opset(model)
    decisions: list[Decision] = []
    if planner is None:
        planner = Planner("cpu")
    resolved = ShapeTable(model, plan_shapes) if plan_shapes else None
    _rewrite_graph(model.graph, shapes, opset, None, "main", (direction, form, planner, resolved), names, decisions,
                   model.ir_version)
    for fn in model.functions:
        for node in fn.node:
            if node.op_type == "Conv" and attr(node, "group", 1) > 1:
                decisions.append(Decision(node_label(node), "grouped_conv", "skipped", "Conv inside a function",
                                          "model-local functions are not rewritten (no shapes or constant weights of their own)",
                                          graph=f"function {fn.name}", code="in_function"))
    return decisions


def _rewrite_graph(graph: GraphProto, shapes, opset: int, outer: GraphIndex | None, path: str,
                   direction: str, names: NameGen, decisions: list[Decision], ir_version: int) -> set[str]:
    """Rewrite one graph, its subgraphs first; returns the enclosing-scope names it no longer reads."""
    reads_before = outer_references(graph) if outer is not None else set()
    ix = GraphIndex(graph, shapes, opset, outer, path, ir_version)
    nested = [(node, sub) for node in ix.nodes if node.attribute for sub in subgraphs(node)]
    dropped: set[str] = set()
    for node, sub in nested:
        dropped |= _rewrite_graph(sub, shapes, opset, ix, f"{path}/{node_label(node)}/{sub.name or 'body'}",
                                  direction, names, decisions, ir_version)
    if nested:
        ix = GraphIndex(graph, shapes, opset, outer, path, ir_version)
    edit = _Edit()
    edit.seeds = sorted(dropped)  # weights a rewritten body no longer reads may now be dead here
    for cand in analyse(ix):
        decision, target = _decide(cand, direction, opset)
        decision.graph = path
        if target is not None:
            _apply(ix, cand, target, names, edit, decision)
        decisions.append(decision)
    if edit:
        edit.commit(ix)
    return reads_before - outer_references(graph) if outer is not None else set()


def _decide(cand, direction, opset: int) -> tuple[Decision, str | None]:
    """What to do with a candidate: a Decision, and the form to write (None: leave it)."""
    direction, form, planner, resolved = direction
    spec = planning_spec(cand, resolved)
    if isinstance(cand, Skip):
        return Decision(node_label(cand.node), cand.kind, "skipped",
                        "grouped Conv" if cand.kind == "grouped_conv" else "depthwise Conv followed by channel ops",
                        cand.reason, spec, code=cand.code), None
    native = isinstance(cand, NativeGrouped)
    label = node_label(cand.node if native else cand.dw)
    kind = "grouped_conv" if native else "emulation"
    computes = f"grouped Conv {cand.spec.describe()}" if native else f"emulation of a {cand.grouping.describe()}"
    current = "native" if native else "dw"
    depthwise = not native and cand.grouping.is_depthwise
    available = ("native",) if depthwise else tuple(f for f in FORMS if f != "dw" or opset >= 5)
    prediction = planner.plan(spec, available) if not depthwise else None

    def decision(action, reason, now):
        return Decision(label, kind, action, computes, reason, spec, form=now, prediction=prediction)

    if form is None:
        if direction == "expand" and not native:
            return decision("kept", "direction=expand keeps emulations", current), None
        if direction == "fuse" and native:
            return decision("kept", "direction=fuse keeps native grouped Convs", current), None
        if direction == "auto":
            form = prediction.form if prediction is not None else "native"
            if form == current:
                return decision("kept", prediction.why, current), None
        else:
            form = {"expand": "dw", "fuse": "native"}[direction]
    elif depthwise and form != "native":
        skipped = decision("skipped", f"a depthwise Conv has no {form} form", current)
        skipped.code = "no_such_form"
        return skipped, None
    if native and form == current:
        return decision("kept", f"already in the {form} form", current), None
    if form == "dw" and opset < 5:
        skipped = decision("skipped", f"opset {opset} < 5: Reshape takes no shape input, so the emulation cannot be "
                           "written", current)
        skipped.code = "opset_too_old"
        return skipped, None
    action = {"native": "fused" if not native else "kept", "dw": "expanded" if native else "converted"}.get(form, "converted")
    reason = "" if action == "fused" else f"to {_FORM_TEXT[form]}"
    if depthwise and cand.grouping.max_terms > 1:
        # Exact all the same: the model computes this, whatever its author meant.
        reason = (f"NOT a grouped conv: it sums over the multiplier axis (Cog), not the in-group axis; "
                  f"rewritten to the depthwise Conv it equals")
    if direction == "auto" and prediction is not None and prediction.form == form:
        reason = (reason + "; " if reason else "") + prediction.why
    return decision(action, reason, "depthwise" if depthwise else form), form


# -- edits ---------------------------------------------------------------------------------------

class _Edit:
    """Edits to one graph, applied together: node replacements, removals and new initializers."""

    def __init__(self):
        self.replace: dict[int, list[NodeProto]] = {}
        self.remove: set[int] = set()
        self.initializers: list[onnx.TensorProto] = []
        self.seeds: list[str] = []  # names that may have lost their last reader outside this edit

    def __bool__(self):
        return bool(self.replace or self.remove or self.seeds)

    def busy(self, node: NodeProto) -> bool:
        return id(node) in self.replace or id(node) in self.remove

    def commit(self, ix: GraphIndex) -> None:
        graph = ix.graph
        planned: list[NodeProto] = []
        new_nodes: list[NodeProto] = []
        seeds: list[str] = list(self.seeds)
        for node in ix.nodes:
            key = id(node)
            if key in self.replace or key in self.remove:
                seeds.extend(ix.reads[key])
                planned.extend(self.replace.get(key, ()))
                new_nodes.extend(self.replace.get(key, ()))
            else:
                planned.append(node)
        gone_keys = self.replace.keys() | self.remove
        for key in gone_keys:  # shape readers of removed tensors go too (analysis checked they feed only these)
            for out in ix.outputs_of(key):
                readers = [c for c in ix.consumers.get(out, ())
                           if c.op_type in SHAPE_ONLY_OPS and id(c) not in gone_keys]
                seeds.extend(_downstream_outputs(ix, readers, gone_keys))
        dead = _Liveness(ix, gone_keys, new_nodes, {t.name for t in self.initializers})
        dead.collect(seeds)
        graph.ClearField("node")
        graph.node.extend(n for n in planned if id(n) not in dead.nodes)
        for i in reversed(range(len(graph.initializer))):
            if graph.initializer[i].name in dead.initializers:
                del graph.initializer[i]
        graph.initializer.extend(t for t in self.initializers if t.name not in dead.initializers)
        if ix.ir_version < 4:  # before IR 4 every initializer must also be a graph input
            if dead.initializers:
                kept_inputs = [i for i in graph.input if i.name not in dead.initializers]
                graph.ClearField("input")
                graph.input.extend(kept_inputs)
            graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                               for t in self.initializers if t.name not in dead.initializers)
        gone = {o for key in self.remove | self.replace.keys() for o in ix.outputs_of(key)}
        gone |= {o for key in dead.nodes if key in ix.position for o in ix.outputs_of(key)}
        gone -= {o for n in new_nodes if id(n) not in dead.nodes for o in n.output}
        if any(vi.name in gone for vi in graph.value_info):
            keep_vi = [vi for vi in graph.value_info if vi.name not in gone]
            graph.ClearField("value_info")
            graph.value_info.extend(keep_vi)


def _downstream_outputs(ix: GraphIndex, starts: list[NodeProto], gone: set[int]) -> list[str]:
    """Outputs of `starts` and of the nodes reading them (not `gone`), parents first: seeded in this
    order, liveness pops the leaves first, so a dead Shape -> Slice chain goes as a whole."""
    order, seen, queue = [], set(), list(starts)
    while queue and len(order) < 4096:
        node = queue.pop(0)
        if id(node) in seen or id(node) in gone:
            continue
        seen.add(id(node))
        outs = [o for o in node.output if o]
        order.extend(outs)
        queue.extend(c for o in outs for c in ix.consumers.get(o, ()))
    return order


def _reads(node: NodeProto) -> list[str]:
    names = [n for n in node.input if n]
    if node.attribute:
        for g in subgraphs(node):
            names.extend(outer_references(g))
    return list(dict.fromkeys(names))


class _Liveness:
    """Dead-code elimination after an edit, touching only what the edit orphaned (no full-graph pass).

    A value is dead when no surviving node reads it and it is not a graph output; a node is dead
    when all its outputs are; an initializer is dropped only when the edit orphaned it.
    """

    def __init__(self, ix: GraphIndex, replaced: set[int], new_nodes: list[NodeProto], new_inits: set[str]):
        self.ix = ix
        self.gone = set(replaced)  # old nodes no longer in the graph
        self.new_reads: dict[str, int] = {}
        self.new_producer: dict[str, NodeProto] = {}
        self.reads_of: dict[int, list[str]] = {}
        for node in new_nodes:
            self.reads_of[id(node)] = _reads(node)
            for name in self.reads_of[id(node)]:
                self.new_reads[name] = self.new_reads.get(name, 0) + 1
            for out in node.output:
                self.new_producer[out] = node
        self.initializer_names = set(ix.initializers) | new_inits
        self.nodes: set[int] = set()
        self.initializers: set[str] = set()

    def _used(self, name: str) -> bool:
        if name in self.ix.graph_outputs or self.new_reads.get(name, 0) > 0:
            return True
        return any(id(c) not in self.gone and id(c) not in self.nodes for c in self.ix.consumers.get(name, ()))

    def collect(self, seeds: list[str]) -> None:
        work = list(seeds)
        while work:
            name = work.pop()
            if self._used(name):
                continue
            node = self.new_producer.get(name) or self.ix.producer.get(name)
            if node is not None and (id(node) not in self.gone or name in self.new_producer):
                key = id(node)
                if key in self.nodes or any(self._used(o) for o in node.output if o):
                    continue
                self.nodes.add(key)
                for inp in self.reads_of.get(key) or self.ix.reads.get(key, []):
                    if key in self.reads_of:
                        self.new_reads[inp] -= 1
                    work.append(inp)
            elif node is None and name in self.initializer_names and name not in self.ix.graph_inputs:
                self.initializers.add(name)


def _apply(ix: GraphIndex, cand, form: str, names: NameGen, edit: _Edit, decision: Decision) -> None:
    if isinstance(cand, NativeGrouped):
        node = cand.node
        new, inits = _emit(form, ix, node.input[0], cand.weight, cand.bias, cand.spec.group, node, node.output[0],
                           node.name or node.output[0], names)
        edit.replace[id(node)] = new
        edit.initializers += inits
        decision.nodes_removed, decision.nodes_added = 1, len(new)
    else:
        _fuse(ix, cand, names, edit, decision, form)


def _emit(form: str, ix: GraphIndex, x: str, weight: np.ndarray, bias: np.ndarray | None, group: int,
          template: NodeProto, out: str, base: str, names: NameGen) -> tuple[list[NodeProto], list]:
    """Nodes and initializers computing the grouped Conv (weight, bias, group, template's attributes)
    of `x` into `out`, in the given form."""
    def const(suffix, array):
        name = names(f"{base}.{suffix}")
        inits.append(tensor(name, array))
        return name

    inits: list = []
    node_name = template.name or names(f"{base}/conv")
    if form == "native":
        inputs = [x, const("weight", weight)] + ([const("bias", bias)] if bias is not None else [])
        return [conv_node(template, inputs, out, group, node_name)], inits
    if form == "dense":
        inputs = [x, const("dense_weight", dense_weights(weight, group))] + (
            [const("bias", bias)] if bias is not None else [])
        return [conv_node(template, inputs, out, 1, node_name)], inits
    if form == "split":
        cig = weight.shape[1]
        parts = [names(f"{base}.in{g}") for g in range(group)]
        outs = [names(f"{base}.out{g}") for g in range(group)]
        if ix.opset >= 13:
            sizes = names(f"{base}.split_sizes")
            inits.append(int64_tensor(sizes, [cig] * group))
            new = [helper.make_node("Split", [x, sizes], parts, name=names(f"{base}/split"), axis=1)]
        else:
            new = [helper.make_node("Split", [x], parts, name=names(f"{base}/split"), axis=1, split=[cig] * group)]
        for g, (w, b) in enumerate(split_weights(weight, bias, group)):
            inputs = [parts[g], const(f"weight{g}", w)] + ([const(f"bias{g}", b)] if b is not None else [])
            new.append(conv_node(template, inputs, outs[g], 1, names(f"{node_name}/group{g}")))
        new.append(helper.make_node("Concat", outs, [out], name=names(f"{base}/concat"), axis=1))
        return new, inits
    return _emit_dw(ix, x, weight, bias, group, template, out, base, names, node_name, inits)


def _emit_dw(ix, x, weight, bias, group, template, out, base, names, node_name, inits):
    """Depthwise Conv (multiplier Cog) + Reshape [N,G,Cig,Cog,spatial] + ReduceSum + Reshape [N,Cout,spatial]."""
    c_out, cig = weight.shape[:2]
    g, cog, rank = group, c_out // group, weight.ndim - 2
    depthwise, dw_bias = expand_weights(weight, bias, g)
    w_name = names(f"{base}.dw_weight")
    inits.append(tensor(w_name, depthwise))
    inputs = [x, w_name]
    if dw_bias is not None:
        b_name = names(f"{base}.dw_bias")
        inits.append(tensor(b_name, dw_bias))
        inputs.append(b_name)
    dw_out = names(f"{base}.dw_out")
    new = [conv_node(template, inputs, dw_out, g * cig, node_name)]
    out_shape = ix.shape(out)
    spatial = list(out_shape[2:]) if out_shape is not None and len(out_shape) == rank + 2 else None
    head5, head_out = [0, g, cig, cog], [0, c_out]
    shape_a, shape_b = names(f"{base}.grouped_shape"), names(f"{base}.out_shape")
    if spatial is not None and all(isinstance(d, int) and d > 0 for d in spatial):
        inits += [int64_tensor(shape_a, head5 + spatial), int64_tensor(shape_b, head_out + spatial)]
    else:  # dynamic spatial dims: read them from the depthwise output at run time
        dims, sp = names(f"{base}.dw_shape"), names(f"{base}.spatial")
        idx, h5, ho = names(f"{base}.spatial_axes"), names(f"{base}.head_grouped"), names(f"{base}.head_out")
        inits += [int64_tensor(idx, list(range(2, 2 + rank))), int64_tensor(h5, head5), int64_tensor(ho, head_out)]
        new += [helper.make_node("Shape", [dw_out], [dims], name=names(f"{base}/shape")),
                helper.make_node("Gather", [dims, idx], [sp], name=names(f"{base}/spatial"), axis=0),
                helper.make_node("Concat", [h5, sp], [shape_a], name=names(f"{base}/grouped_shape"), axis=0),
                helper.make_node("Concat", [ho, sp], [shape_b], name=names(f"{base}/out_shape"), axis=0)]
    grouped, summed = names(f"{base}.grouped"), names(f"{base}.summed")
    reduce, reduce_inits = reduce_sum_node(grouped, [2], summed, names(f"{base}/reduce_sum"), ix.opset,
                                           names(f"{base}.reduce_axes"))
    inits += reduce_inits
    new += [helper.make_node("Reshape", [dw_out, shape_a], [grouped], name=names(f"{base}/reshape_grouped")),
            reduce,
            helper.make_node("Reshape", [summed, shape_b], [out], name=names(f"{base}/reshape_out"))]
    return new, inits


def _fuse(ix: GraphIndex, cand: Emulation, names: NameGen, edit: _Edit, decision: Decision, form: str = "native") -> None:
    dw, grouping, cmap = cand.dw, cand.grouping, cand.cmap
    base = dw.name or dw.output[0]
    multiplier = cand.dw_weight.shape[0] // grouping.c_in
    weight, bias = fuse_weights(grouping, cmap, cand.dw_weight, cand.dw_bias, multiplier)
    new: list[NodeProto] = []
    conv_in = dw.input[0]
    if grouping.in_perm is not None:
        if _fold_input_permutation(ix, conv_in, grouping.in_perm, names, edit, dw):
            decision.reason = "; ".join(filter(None, [decision.reason, "input permutation folded into the producing Conv"]))
        else:
            perm_name, conv_in = names(f"{base}.in_perm"), names(f"{base}.permuted_input")
            edit.initializers.append(int64_tensor(perm_name, grouping.in_perm))
            new.append(helper.make_node("Gather", [dw.input[0], perm_name], [conv_in], name=names(f"{base}/permute_in"), axis=1))
            decision.reason = "; ".join(filter(None, [decision.reason, "input permutation applied with a Gather"]))
    needs_tail = grouping.out_order is not None or cmap.layout == "NLC"
    conv_out = names(f"{base}.out") if needs_tail else cand.output
    body, inits = _emit(form, ix, conv_in, weight, bias, grouping.group, dw, conv_out, base, names)
    new += body
    edit.initializers += inits
    current = conv_out
    if grouping.out_order is not None:
        inv = np.empty_like(grouping.out_order)
        inv[grouping.out_order] = np.arange(len(inv))
        idx_name = names(f"{base}.out_perm")
        nxt = cand.output if cmap.layout == "NC" else names(f"{base}.out_permuted")
        edit.initializers.append(int64_tensor(idx_name, inv))
        new.append(helper.make_node("Gather", [current, idx_name], [nxt], name=names(f"{base}/permute_out"), axis=1))
        current = nxt
        decision.reason = (decision.reason + "; " if decision.reason else "") + "output permutation applied with a Gather"
    if cmap.layout == "NLC":
        rank = len(cand.dw_weight.shape)
        new.append(helper.make_node("Transpose", [current], [cand.output], name=names(f"{base}/to_channels_last"),
                                    perm=[0] + list(range(2, rank)) + [1]))
    edit.replace[id(cand.nodes[-1])] = new
    edit.remove.update(id(n) for n in cand.nodes[:-1])
    edit.remove.add(id(dw))
    decision.nodes_removed, decision.nodes_added = len(cand.nodes) + 1, len(new)


_ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
                          "Softplus", "Identity", "Neg", "Abs", "Clip", "Gelu", "Mish", "PRelu"})


def _fold_input_permutation(ix: GraphIndex, x: str, perm: np.ndarray, names: NameGen, edit: _Edit,
                            reader: NodeProto) -> bool:
    """Permute the channels of `x` at their source: walk up single-consumer per-channel ops to a
    group=1 Conv, permuting its output channels and every per-channel parameter on the way."""
    planned: dict[int, NodeProto] = {}
    inits = []
    name, consumer = x, reader
    for _ in range(32):
        users = ix.consumers.get(name, [])
        node = ix.producer.get(name)
        if (node is None or len(users) != 1 or users[0] is not consumer or ix.is_output(name)
                or edit.busy(node) or node.domain not in ("", "ai.onnx") or len([o for o in node.output if o]) != 1):
            return False
        op = node.op_type
        if op in _ELEMENTWISE:
            if op == "PRelu":
                if not _permute_params(ix, node, [1], perm, names, planned, inits, per_channel=True):
                    return False
            elif op == "Clip" and any(n and not ix.is_constant(n) for n in node.input[1:]):
                return False
            name, consumer = node.input[0], node
            continue
        if op == "BatchNormalization":
            if not _permute_params(ix, node, [1, 2, 3, 4], perm, names, planned, inits, per_channel=False):
                return False
            name, consumer = node.input[0], node
            continue
        if op in ("Add", "Mul", "Sub", "Div") and len(node.input) == 2:
            const = [i for i in (0, 1) if ix.is_constant(node.input[i])]
            if len(const) != 1:  # elementwise either way round, so only the constant moves
                return False
            if not _permute_params(ix, node, const, perm, names, planned, inits, per_channel=True):
                return False
            name, consumer = node.input[1 - const[0]], node
            continue
        if op == "Conv" and attr(node, "group", 1) == 1 and ix.is_constant(node.input[1]):
            if len(node.input) > 2 and node.input[2] and not ix.is_constant(node.input[2]):
                return False
            if not _permute_params(ix, node, [1, 2], perm, names, planned, inits, per_channel=False):
                return False
            for key, new in planned.items():
                edit.replace[key] = [new]
            edit.initializers += inits
            return True
        return False
    return False


def _permute_params(ix, node, positions, perm, names, planned, inits, per_channel: bool) -> bool:
    """Replace `node`'s constant inputs at `positions` by copies permuted along the channel axis.

    per_channel: the constant broadcasts against an NC... tensor (axis = its rank - (data rank - 1));
    otherwise the channel axis is 0 (Conv weight/bias, BatchNormalization parameters).
    """
    new = planned.get(id(node))
    if new is None:
        new = onnx.NodeProto()
        new.CopyFrom(node)
    c = len(perm)
    data_rank = None
    shape = ix.shape(node.output[0])
    if shape is not None:
        data_rank = len(shape)
    for pos in positions:
        if pos >= len(node.input) or not node.input[pos]:
            continue
        value = ix.constant(node.input[pos])
        if value is None:
            return False
        if per_channel:
            if value.size == 1:
                continue
            if data_rank is None:
                return False
            axis = value.ndim - (data_rank - 1)
            if axis < 0 or value.shape[axis] != c or any(d != 1 for i, d in enumerate(value.shape) if i != axis):
                return False
        else:
            axis = 0
            if value.ndim == 0 or value.shape[0] != c:
                return False
        new_name = names(f"{node.input[pos]}.permuted")
        inits.append(tensor(new_name, np.take(value, perm, axis=axis)))
        new.input[pos] = new_name
    planned[id(node)] = new
    return True

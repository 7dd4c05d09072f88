"""Find candidates in one graph: native grouped Convs, and emulation regions behind depthwise Convs.

An emulation region is grown forward from a depthwise Conv's output through ops that can only
move or sum elements (`channelmap.TRACEABLE_OPS`). Every prefix of the region with a single exit
tensor is a possible cut; the deepest cut whose traced content is a channel map of a single Conv
is the one to fuse. Near-misses become `Skip`s with the precise reason.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from math import prod

import numpy as np
from onnx import NodeProto

from . import composites
from .channelmap import (
    SUMMING_OPS,
    TRACEABLE_OPS,
    ChannelMap,
    NotAChannelMove,
    SizeDependent,
    classify_output,
    source,
)
from .composites import Composite
from .geometry import ConvSpec, spec_from_conv
from .graph import GraphIndex, ShapeTable, attr
from .lowering import Grouping, NotFusable, fuse_weights, overflows, solve_grouping
from .tracing import TraceSizes, conv_output_sizes, grow_region, propagate_to, valid_cuts

_NOT_REWRITTEN = {
    "QLinearConv": "quantized convs are not rewritten",
    "ConvInteger": "quantized convs are not rewritten",
    "ConvTranspose": "transposed convs are not rewritten",
}
_FUSED_CONV = ("com.microsoft FusedConv (a grouped Conv and its activation, fused by onnxruntime's extended "
               "optimizer) is not rewritten: rewrite the model before that optimization, or save it with "
               "disabled_optimizers=['ConvActivationFusion']")
_FUSED_MIX = ("its output feeds a com.microsoft FusedConv (a Conv and its activation, fused by onnxruntime's "
              "extended optimizer), which is not traced: rewrite the model before that optimization, or save it "
              "with disabled_optimizers=['ConvActivationFusion']")
# Stable short codes of skip reasons (docs/reports.md lists and explains each; scripts match these).
SKIP_CODES = frozenset({
    "size_dependent", "not_a_channel_move", "not_a_channel_map", "not_a_single_conv", "nothing_summed",
    "no_single_exit", "too_large", "weight_not_constant", "bias_not_constant", "weight_dtype", "quantized",
    "transposed", "inconsistent", "no_such_form", "opset_too_old", "in_function", "unequal_convs",
    "not_channel_slices", "optimized", "overflow", "other"})
_MAX_TRACE_ELEMENTS = 1 << 27


@dataclass
class NativeGrouped:
    """A Conv with 1 < group < C_in and constant weights."""

    node: NodeProto
    spec: ConvSpec
    weight: np.ndarray
    bias: np.ndarray | None
    scope: tuple = ()  # the graph's scope key (graph.ShapeTable): where its shapes are looked up


@dataclass
class Emulation:
    """A depthwise Conv plus the nodes after it that, together, compute one Conv."""

    dw: NodeProto
    spec: ConvSpec  # of the Conv the region equals
    nodes: list[NodeProto]  # the region up to the cut, in graph order (dw Conv excluded)
    output: str  # the cut tensor, produced by the region's last node
    cmap: ChannelMap
    grouping: Grouping
    dw_weight: np.ndarray
    dw_bias: np.ndarray | None
    scope: tuple = ()


@dataclass
class Skip:
    """A node that looked like a candidate but is left alone, and why."""

    node: NodeProto
    kind: str  # "grouped_conv" | "emulation" | "split" | "dense"
    reason: str
    spec: ConvSpec | None = None
    scope: tuple = ()
    code: str = "other"  # stable short code of the reason (SKIP_CODES, docs/reports.md)

    def __post_init__(self):
        if self.code not in SKIP_CODES:
            raise ValueError(f"undocumented skip code {self.code!r}")


Candidate = NativeGrouped | Emulation | Composite | Skip
# What a skipped candidate looked like, per kind.
SKIPPED_WHAT = {"grouped_conv": "grouped Conv", "emulation": "depthwise Conv followed by channel ops",
                "split": "Convs on channel slices joined by a Concat", "dense": "Conv with block-diagonal weights"}


def planning_spec(cand: Candidate, shapes: ShapeTable | None) -> ConvSpec | None:
    """The candidate's geometry for the cost model: its own, or, where its spatial size is symbolic,
    the one `shapes` (inferred with concrete input shapes, --input-shape) gives. The graph keeps its
    symbolic dims: this only informs predictions and reports."""
    spec = cand.spec
    if spec is None or shapes is None or spec.output_spatial_size() is not None:
        return spec
    shape = shapes.get(anchor(cand).input[0], cand.scope)
    if shape is not None and len(shape) > 1:  # a split form's Conv reads a slice: the whole has spec.c_in
        shape = (shape[0], spec.c_in) + tuple(shape[2:])
    return spec.at_input(shape) if shape is not None else spec


def analyse(ix: GraphIndex) -> list[Candidate]:
    """All candidates of the graph, in graph order.

    Emulation regions are traced in parallel threads: numpy releases the GIL in the copies and
    comparisons that dominate tracing.
    """
    found: list[Candidate | NodeProto] = []
    for node in ix.nodes:
        if (node.op_type in _NOT_REWRITTEN and node.domain in ("", "ai.onnx", "com.microsoft")
                and attr(node, "group", 1) > 1):
            found.append(Skip(node, "grouped_conv", _NOT_REWRITTEN[node.op_type],
                              code="quantized" if "quantized" in _NOT_REWRITTEN[node.op_type] else "transposed"))
            continue
        if node.op_type == "FusedConv" and node.domain == "com.microsoft" and 1 < attr(node, "group", 1):
            dims = ix.constant_dims(node.input[1]) if len(node.input) > 1 else None
            if dims is None or len(dims) < 2 or dims[1] > 1:  # not depthwise (Cig > 1)
                found.append(Skip(node, "grouped_conv", _FUSED_CONV, code="optimized"))
            continue
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        group = attr(node, "group", 1)
        wdims = ix.constant_dims(node.input[1])
        if wdims is None:
            inferred = ix.shape(node.input[1]) if group > 1 else None
            if inferred and len(inferred) > 1 and isinstance(inferred[1], int) and inferred[1] == 1:
                continue  # a depthwise Conv with runtime weights (MobileNet-style): not a grouped conv
            if group > 1:
                weight_src = ix.producer.get(node.input[1])
                if weight_src is not None and weight_src.op_type == "DequantizeLinear":
                    found.append(Skip(node, "grouped_conv", "weight is dequantized (QDQ): quantized convs are not "
                                      "rewritten", code="quantized"))
                else:
                    found.append(Skip(node, "grouped_conv",
                                      "weight is not a constant (initializer or Constant node): channel count and "
                                      "kernels unknown", code="weight_not_constant"))
            continue
        if len(wdims) < 3:
            continue
        c_in = group * wdims[1]
        if 1 < group < c_in:
            found.append(_guarded(_native, ix, node, "grouped_conv"))
        elif group == c_in and c_in > 1 and any(n.op_type in TRACEABLE_OPS for n in ix.data_consumers(node.output[0])):
            found.append(node)  # traced below
        elif group == c_in and c_in > 1 and any(n.op_type == "FusedConv" and n.domain == "com.microsoft"
                                                for n in ix.data_consumers(node.output[0])):
            found.append(Skip(node, "emulation", _FUSED_MIX, code="optimized"))
    pending = [n for n in found if isinstance(n, NodeProto)]
    if pending:
        ix.shape(pending[0].output[0])  # run shape inference once, before the threads
        workers = min(len(pending), os.cpu_count() or 1)
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                traced = dict(zip(map(id, pending), pool.map(lambda n: _guarded(_emulation, ix, n, "emulation"),
                                                             pending)))
        else:
            traced = {id(n): _guarded(_emulation, ix, n, "emulation") for n in pending}
        found = [traced[id(c)] if isinstance(c, NodeProto) else c for c in found]
    found = _with_composites(ix, [c for c in found if c is not None])
    for c in found:
        c.scope = ix.scope
    return found


def anchor(cand: Candidate) -> NodeProto:
    """The node a candidate is named after: its Conv (an emulation's depthwise Conv)."""
    return cand.dw if isinstance(cand, Emulation) else cand.node


def _with_composites(ix: GraphIndex, found: list[Candidate]) -> list[Candidate]:
    """Add the composites (split forms, block-diagonal and mixed Convs); a composite replaces the
    native grouped Conv or the emulation near-miss it contains."""
    taken, mixable = set(), set()
    for c in found:
        if isinstance(c, Emulation):
            taken.update([id(c.dw)] + [id(n) for n in c.nodes])
        elif isinstance(c, Skip) and c.kind == "emulation":
            mixable.add(id(c.node))
    more: list[Candidate] = []
    for c in composites.find(ix, taken, mixable):
        if isinstance(c, composites.NearMiss):
            more.append(Skip(c.node, c.kind, c.reason, c.spec, code=c.code))
        else:
            more.append(c)
    if not more:
        return found
    covered = {id(n) for c in more if isinstance(c, Composite) for n in c.nodes}
    kept = [c for c in found if isinstance(c, Emulation) or id(c.node) not in covered]
    return sorted(kept + more, key=lambda c: ix.pos(anchor(c)))


def _guarded(fn, ix: GraphIndex, node: NodeProto, kind: str) -> Candidate | None:
    """A node the analysis cannot make sense of (inconsistent attributes, odd shapes) is skipped, with why."""
    try:
        return fn(ix, node)
    except (ValueError, IndexError, TypeError, KeyError, ZeroDivisionError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return Skip(node, kind, f"could not be analysed ({type(exc).__name__}: {first})", code="inconsistent")


def _conv_spec(ix: GraphIndex, node: NodeProto, wdims, dtype) -> ConvSpec:
    return spec_from_conv(node, wdims, dtype, ix.shape(node.input[0]), ix.shape(node.output[0]))


def _conv_params(ix: GraphIndex, node: NodeProto) -> tuple[np.ndarray, np.ndarray | None, str, str]:
    """A Conv's constant weight and bias, why they cannot be used ('' when they can) and its code."""
    weight = ix.constant(node.input[1])
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = ix.constant(node.input[2])
        if bias is None:
            return weight, None, "bias is not a constant", "bias_not_constant"
    if weight.dtype.kind != "f":
        return weight, bias, f"weight dtype {weight.dtype} is not floating point", "weight_dtype"
    return weight, bias, "", ""


def _native(ix: GraphIndex, node: NodeProto) -> Candidate:
    weight, bias, problem, code = _conv_params(ix, node)
    if problem:
        return Skip(node, "grouped_conv", problem, code=code)
    spec = _conv_spec(ix, node, weight.shape, weight.dtype)
    if spec.c_out % spec.group:
        return Skip(node, "grouped_conv", f"C_out={spec.c_out} is not a multiple of group={spec.group}", spec,
                    code="inconsistent")
    return NativeGrouped(node, spec, weight, bias)


# -- emulation regions ---------------------------------------------------------------------------

def _emulation(ix: GraphIndex, dw: NodeProto) -> Candidate | None:
    y0 = dw.output[0]
    weight, dw_bias, problem, code = _conv_params(ix, dw)
    if problem:
        return Skip(dw, "emulation", f"depthwise {problem}", code=code)
    c_in = attr(dw, "group", 1)
    multiplier = weight.shape[0] // c_in
    region, boundary, refused = grow_region(ix, [y0])
    if not SUMMING_OPS & ({n.op_type for n in region} | refused):
        return None  # a plain depthwise Conv followed by, say, a Flatten: nothing emulated here
    if not region:
        return Skip(dw, "emulation", boundary, code="not_a_channel_move")
    probe = conv_output_sizes(ix, dw, weight.shape)
    if prod(probe.shape) > _MAX_TRACE_ELEMENTS:
        return Skip(dw, "emulation", f"depthwise output {list(probe.shape)} is too large to trace", code="too_large")
    cuts, cut_reason = valid_cuts(ix, [y0], region)
    if not cuts:
        return Skip(dw, "emulation", cut_reason or boundary or "no single exit tensor", code="no_single_exit")
    try:
        cut, output, cmap, grouping = _trace(ix, y0, probe, region, cuts, multiplier)
    except NotAChannelMove as exc:
        return Skip(dw, "emulation", str(exc), code=exc.code)
    nodes = region[:cut + 1]
    out_shape = ix.shape(output)
    if out_shape is not None and cmap.layout == "NLC":
        out_shape = (out_shape[0], out_shape[-1]) + tuple(out_shape[1:-1])
    spec = spec_from_conv(dw, (grouping.c_out, grouping.cig) + tuple(weight.shape[2:]), weight.dtype,
                          ix.shape(dw.input[0]), out_shape)
    spec = replace(spec, group=grouping.group, c_in=grouping.c_in)
    if weight.dtype == np.float16 and overflows(*fuse_weights(grouping, cmap, weight, dw_bias, multiplier)):
        return Skip(dw, "emulation", "its fused kernels or bias overflow float16 (a sum of kernels beyond the type's "
                    "range)", spec, code="overflow")
    return Emulation(dw, spec, nodes, output, cmap, grouping, weight, dw_bias)


def _trace(ix: GraphIndex, y0: str, probe: TraceSizes, region, cuts, multiplier: int
           ) -> tuple[int, str, ChannelMap, Grouping]:
    """The deepest cut whose traced content is a single Conv's channel map that sums something, else
    raises the first (deepest) reason, with its code.

    Cuts are tried deepest first; a shallower one costs another propagation, which only
    happens when the deeper result is not a conv (then the ops after the cut stay as they are).
    """
    first: NotAChannelMove | None = None
    for cut, out in reversed(cuts):
        try:
            traced = propagate_to(ix, {y0: source(probe.shape, probe.axes)}, probe, region[:cut + 1], out)
            try:
                cmap = classify_output(traced, probe.shape, probe.axes)
            except SizeDependent:
                raise
            except NotAChannelMove as exc:
                raise NotAChannelMove(f"result '{out}': {exc}", code="not_a_channel_map") from None
            if _is_identity(cmap, probe.shape[1]):
                raise NotAChannelMove(f"result '{out}' is the depthwise Conv's output itself (no channel summed): "
                                      "nothing to fuse", code="nothing_summed")
            try:
                grouping = solve_grouping(cmap, multiplier, probe.shape[1] // multiplier)
            except NotFusable as exc:
                raise NotAChannelMove(f"does not compute a single Conv: {exc}", code="not_a_single_conv") from None
        except NotAChannelMove as exc:
            first = first or exc
            continue
        return cut, out, cmap, grouping
    raise first if first is not None else NotAChannelMove("no cut", code="no_single_exit")


def _is_identity(cmap: ChannelMap, channels: int) -> bool:
    terms = cmap.terms
    return (cmap.bias is None and terms.shape == (channels, 1)
            and np.array_equal(terms[:, 0], np.arange(channels)))



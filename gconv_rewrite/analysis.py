"""Find candidates in one graph: native grouped Convs, and emulation regions behind depthwise Convs.

An emulation region is grown forward from a depthwise Conv's output through ops that can only
move or sum elements (`channelmap.TRACEABLE_OPS`). Every prefix of the region with a single exit
tensor is a possible cut; the deepest cut whose traced content is a channel map of a single Conv
is the one to fuse. Near-misses become `Skip`s with the precise reason.
"""

from __future__ import annotations

import heapq
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod

import numpy as np
from onnx import NodeProto, helper

from .channelmap import (TRACEABLE_OPS, ChannelMap, NotAChannelMove, ShapeEval, Traced, classify_output,
                         conv_1x1_matrix, propagate, source)
from .geometry import ConvSpec, spec_from_conv
from .graph import SHAPE_ONLY_OPS, GraphIndex, ShapeTable, attr
from .lowering import Grouping, NotFusable, solve_grouping

_SHAPE_OPS = frozenset({"Shape", "Size", "Gather", "Cast", "Slice", "Concat", "Unsqueeze", "Squeeze",
                        "Identity", "Add", "Sub", "Mul", "Div", "Max", "Min", "Reshape", "ReduceProd",
                        "Constant"})
_NOT_REWRITTEN = {
    "QLinearConv": "quantized convs are not rewritten",
    "ConvInteger": "quantized convs are not rewritten",
    "ConvTranspose": "transposed convs are not rewritten",
}
# Ops that sum or regroup channels: a depthwise Conv followed by none of them emulates nothing.
_SUMMING_OPS = frozenset({"ReduceSum", "Add", "Sum", "Conv", "Reshape"})
_MAX_TRACE_ELEMENTS = 1 << 27
_BATCH_PROBE = 2
_SPATIAL_PROBES = (5, 7, 11, 13, 17)
_SPATIAL_PROBES_2 = (6, 9, 10, 12, 14)


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
    kind: str  # "grouped_conv" | "emulation"
    reason: str
    spec: ConvSpec | None = None
    scope: tuple = ()


Candidate = NativeGrouped | Emulation | Skip


def planning_spec(cand: Candidate, shapes: ShapeTable | None) -> ConvSpec | None:
    """The candidate's geometry for the cost model: its own, or, where its spatial size is symbolic,
    the one `shapes` (inferred with concrete input shapes, --input-shape) gives. The graph keeps its
    symbolic dims: this only informs predictions and reports."""
    spec = cand.spec
    if spec is None or shapes is None or spec.output_spatial_size() is not None:
        return spec
    x = (cand.node if isinstance(cand, (NativeGrouped, Skip)) else cand.dw).input[0]
    shape = shapes.get(x, cand.scope)
    return spec.at_input(shape) if shape is not None else spec


def node_label(node: NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def analyse(ix: GraphIndex) -> list[Candidate]:
    """All candidates of the graph, in graph order.

    Emulation regions are traced in parallel threads: numpy releases the GIL in the copies and
    comparisons that dominate tracing.
    """
    found: list[Candidate | NodeProto] = []
    for node in ix.nodes:
        if node.op_type in _NOT_REWRITTEN and node.domain in ("", "ai.onnx", "com.microsoft") and attr(node, "group", 1) > 1:
            found.append(Skip(node, "grouped_conv", _NOT_REWRITTEN[node.op_type]))
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
                    found.append(Skip(node, "grouped_conv", "weight is dequantized (QDQ): quantized convs are not rewritten"))
                else:
                    found.append(Skip(node, "grouped_conv",
                                      "weight is not a constant (initializer or Constant node): channel count and kernels unknown"))
            continue
        if len(wdims) < 3:
            continue
        c_in = group * wdims[1]
        if 1 < group < c_in:
            found.append(_guarded(_native, ix, node, "grouped_conv"))
        elif group == c_in and c_in > 1 and any(n.op_type in TRACEABLE_OPS for n in ix.data_consumers(node.output[0])):
            found.append(node)  # traced below
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
    found = [c for c in found if c is not None]
    for c in found:
        c.scope = ix.scope
    return found


def _guarded(fn, ix: GraphIndex, node: NodeProto, kind: str) -> Candidate | None:
    """A node the analysis cannot make sense of (inconsistent attributes, odd shapes) is skipped, with why."""
    try:
        return fn(ix, node)
    except (ValueError, IndexError, TypeError, KeyError, ZeroDivisionError, AttributeError) as exc:
        return Skip(node, kind, f"could not be analysed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")


def _conv_spec(ix: GraphIndex, node: NodeProto, wdims, dtype) -> ConvSpec:
    return spec_from_conv(node, wdims, dtype, ix.shape(node.input[0]), ix.shape(node.output[0]))


def _conv_params(ix: GraphIndex, node: NodeProto) -> tuple[np.ndarray, np.ndarray | None, str]:
    """A Conv's constant weight and bias, and why they cannot be used ('' when they can)."""
    weight = ix.constant(node.input[1])
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = ix.constant(node.input[2])
        if bias is None:
            return weight, None, "bias is not a constant"
    if weight.dtype.kind != "f":
        return weight, bias, f"weight dtype {weight.dtype} is not floating point"
    return weight, bias, ""


def _native(ix: GraphIndex, node: NodeProto) -> Candidate:
    weight, bias, problem = _conv_params(ix, node)
    if problem:
        return Skip(node, "grouped_conv", problem)
    spec = _conv_spec(ix, node, weight.shape, weight.dtype)
    if spec.c_out % spec.group:
        return Skip(node, "grouped_conv", f"C_out={spec.c_out} is not a multiple of group={spec.group}", spec)
    return NativeGrouped(node, spec, weight, bias)


# -- emulation regions ---------------------------------------------------------------------------

def _emulation(ix: GraphIndex, dw: NodeProto) -> Candidate | None:
    y0 = dw.output[0]
    weight, dw_bias, problem = _conv_params(ix, dw)
    if problem:
        return Skip(dw, "emulation", f"depthwise {problem}")
    c_in = attr(dw, "group", 1)
    multiplier = weight.shape[0] // c_in
    region, boundary, refused = _grow_region(ix, y0)
    if not _SUMMING_OPS & ({n.op_type for n in region} | refused):
        return None  # a plain depthwise Conv followed by, say, a Flatten: nothing emulated here
    if not region:
        return Skip(dw, "emulation", boundary)
    probe, symbols, varies = _probe_shape(ix, dw, weight.shape)
    if prod(probe) > _MAX_TRACE_ELEMENTS:
        return Skip(dw, "emulation", f"depthwise output {list(probe)} is too large to trace")
    cuts, cut_reason = _valid_cuts(ix, y0, region)
    if not cuts:
        return Skip(dw, "emulation", cut_reason or boundary or "no single exit tensor")
    try:
        best = _trace(ix, y0, probe, symbols, region, cuts)
    except NotAChannelMove as exc:
        return Skip(dw, "emulation", str(exc))
    if isinstance(best, str):
        return Skip(dw, "emulation", best)
    cut, cmap = best
    if varies:  # symbolic dims: what the region computes must not depend on their values
        other, other_symbols, _ = _probe_shape(ix, dw, weight.shape, variant=1)
        why = _same_map_at(ix, y0, other, other_symbols, region[:cut + 1], cmap)
        if why:
            return Skip(dw, "emulation", f"what it computes depends on the input's size: at {list(other)} {why}")
    try:
        grouping = solve_grouping(cmap, multiplier, c_in)
    except NotFusable as exc:
        return Skip(dw, "emulation", f"does not compute a single Conv: {exc}")
    nodes = region[:cut + 1]
    output = _cut_output(nodes[-1], ix)
    out_shape = ix.shape(output)
    if out_shape is not None and cmap.layout == "NLC":
        out_shape = (out_shape[0], out_shape[-1]) + tuple(out_shape[1:-1])
    spec = spec_from_conv(dw, (grouping.c_out, grouping.cig) + tuple(weight.shape[2:]), weight.dtype,
                          ix.shape(dw.input[0]), out_shape)
    spec = ConvSpec(**{**spec.__dict__, "group": grouping.group, "c_in": grouping.c_in})
    return Emulation(dw, spec, nodes, output, cmap, grouping, weight, dw_bias)


def _grow_region(ix: GraphIndex, y0: str) -> tuple[list[NodeProto], str, set[str]]:
    """Nodes reachable from y0 through traceable ops whose other inputs are constant or shape-computed;
    the first reason a traceable op was refused; the op types refused."""
    traced = {y0}
    refused: set[str] = set()
    region: list[NodeProto] = []
    seen: set[int] = set()
    heap: list = []
    boundary = ""
    shape_computable: dict[str, bool] = {}

    def push(name):
        for n in ix.data_consumers(name):
            if id(n) not in seen:
                seen.add(id(n))
                heapq.heappush(heap, (ix.pos(n), id(n), n))

    push(y0)
    while heap:
        _, _, node = heapq.heappop(heap)
        why = _region_refusal(ix, node, traced, shape_computable)
        if why is not None:
            boundary = boundary or why
            if why:
                refused.add(node.op_type)
            continue
        region.append(node)
        for out in node.output:
            if out:
                traced.add(out)
                push(out)
    return region, boundary, refused


def _region_refusal(ix: GraphIndex, node: NodeProto, traced: set[str], memo: dict) -> str | None:
    """None when `node` joins the region, else why not ("" for an ordinary op that ends it)."""
    if node.op_type not in TRACEABLE_OPS or node.domain not in ("", "ai.onnx"):
        return ""
    ins = [n for n in node.input]
    is_traced = [bool(n) and n in traced for n in ins]
    if node.op_type in ("Add", "Sub", "Sum", "Concat"):
        others_ok = all(t or not n or _shape_computable(ix, n, memo) for n, t in zip(ins, is_traced))
        return None if others_ok else f"{node.op_type} {node_label(node)} mixes in a non-constant tensor"
    if not is_traced[0] or any(is_traced[1:]):
        return f"{node.op_type} {node_label(node)} uses the traced tensor as a parameter"
    if not all(not n or _shape_computable(ix, n, memo) for n in ins[1:]):
        return f"{node.op_type} {node_label(node)} has non-constant parameters"
    if node.op_type == "Conv":
        try:
            conv_1x1_matrix(node, ix.constant(node.input[1]))
        except NotAChannelMove as exc:
            return f"Conv {node_label(node)}: {exc}"
    return None


def _shape_computable(ix: GraphIndex, name: str, memo: dict, depth: int = 0) -> bool:
    """True when `name` depends only on constants and on tensor shapes."""
    if name in memo:
        return memo[name]
    ok = ix.is_constant(name)
    if not ok and depth < 48:
        node = ix.producer.get(name)
        if node is not None and node.op_type in _SHAPE_OPS and node.domain in ("", "ai.onnx"):
            ok = node.op_type in SHAPE_ONLY_OPS or all(
                not n or _shape_computable(ix, n, memo, depth + 1) for n in node.input)
    memo[name] = ok
    return ok


def _probe_shape(ix: GraphIndex, dw: NodeProto, wdims, variant: int = 0) -> tuple[tuple[int, ...], dict, bool]:
    """Concrete sizes to trace with: static dims as they are; symbolic or unknown ones get probe values
    (batch 2 and small primes; variant 1: batch 1 and other values). Also whether any dim varies."""
    rank = len(wdims)
    channels = int(wdims[0])
    shape = ix.shape(dw.output[0])
    if shape is None or len(shape) != rank:
        shape = (None, channels) + (None,) * (rank - 2)
    symbols: dict = {}
    dims = []
    varies = False
    probes = iter(_SPATIAL_PROBES if variant == 0 else _SPATIAL_PROBES_2)
    for axis, d in enumerate(shape):
        if axis == 1:
            dims.append(channels)
        elif isinstance(d, int) and d > 0:
            dims.append(d)
        else:
            varies = True
            value = (_BATCH_PROBE if variant == 0 else 1) if axis == 0 else next(probes, 19 + variant)
            if isinstance(d, str):
                value = symbols.setdefault(d, value)
            dims.append(value)
    return tuple(dims), symbols, varies


def _same_map_at(ix: GraphIndex, y0: str, probe, symbols, prefix: list[NodeProto], cmap: ChannelMap) -> str:
    """'' when tracing `prefix` at other sizes gives the same channel map, else what differs."""
    try:
        other = classify_output(_propagate_to(ix, y0, probe, symbols, prefix), probe)
    except NotAChannelMove as exc:
        return str(exc)
    if other.layout != cmap.layout or not np.array_equal(np.sort(other.terms, axis=1), np.sort(cmap.terms, axis=1)):
        return "it sums other channels"
    if (other.bias is None) != (cmap.bias is None) or (other.bias is not None and not np.array_equal(other.bias, cmap.bias)):
        return "it adds another constant"
    return ""


def _valid_cuts(ix: GraphIndex, y0: str, region: list[NodeProto]) -> tuple[list[int], str]:
    """Indices i such that region[:i+1] can be replaced as a whole by something producing one tensor."""
    in_region = {id(n) for n in region}
    last_use: dict[str, int] = {}
    exits: dict[str, str] = {}

    def note(name: str):
        uses = [ix.pos(n) for n in ix.consumers.get(name, ()) if id(n) in in_region]
        last_use[name] = max(uses) if uses else -1
        outside = [n for n in ix.data_consumers(name) if id(n) not in in_region]
        if outside:
            exits[name] = f"feeds {outside[0].op_type} {node_label(outside[0])}, which needs the unfused tensor"
        elif ix.is_output(name):
            exits[name] = "is a graph output"

    note(y0)
    open_: set[str] = {y0}
    cuts: list[int] = []
    reason = ""
    for i, node in enumerate(region):
        here = ix.pos(node)
        for out in node.output:
            if out:
                note(out)
                open_.add(out)
        open_ = {t for t in open_ if t in exits or last_use[t] > here}
        outs = [o for o in node.output if o in open_]
        if len(open_) == 1 and len(outs) == 1:
            shape_why = _shape_users_removable(ix, region[:i + 1], y0, outs[0])
            if shape_why:
                reason = shape_why
            else:
                cuts.append(i)
        elif y0 in exits and not reason:
            reason = f"depthwise output {exits[y0]}"
    if not cuts and not reason:
        produced = [y0] + [o for n in region for o in n.output]
        stuck = [t for t in produced if t in open_ and t in exits]
        if stuck:
            reason = f"intermediate tensor '{stuck[0]}' {exits[stuck[0]]}"
    return cuts, reason


def _shape_users_removable(ix: GraphIndex, prefix: list[NodeProto], y0: str, keep: str) -> str:
    """Shape/Size consumers of removed tensors must only feed the removed nodes' parameters."""
    removed = {id(n) for n in prefix}
    names = [y0] + [o for n in prefix for o in n.output if o and o != keep]
    for name in names:
        for user in ix.consumers.get(name, ()):
            if user.op_type in SHAPE_ONLY_OPS and not _only_feeds(ix, user, removed, 0):
                return f"the shape of '{name}' is used outside the emulation"
    return ""


def _only_feeds(ix: GraphIndex, node: NodeProto, removed: set[int], depth: int) -> bool:
    if depth > 48:
        return False
    for out in node.output:
        if ix.is_output(out):
            return False
        for user in ix.consumers.get(out, ()):
            if id(user) in removed:
                continue
            if user.op_type not in _SHAPE_OPS or not _only_feeds(ix, user, removed, depth + 1):
                return False
    return True


def _cut_output(node: NodeProto, ix: GraphIndex) -> str:
    outs = [o for o in node.output if o and (ix.consumers.get(o) or ix.is_output(o))]
    return outs[0]


def _trace(ix: GraphIndex, y0: str, probe, symbols, region, cuts) -> tuple[int, ChannelMap] | str:
    """The deepest cut whose traced content is a channel map that sums something, else the reason.

    Cuts are tried deepest first; a shallower one costs another propagation, which only
    happens when the deeper result is not a conv.
    """
    reason = ""
    for cut in reversed(cuts):
        try:
            traced = _propagate_to(ix, y0, probe, symbols, region[:cut + 1])
        except NotAChannelMove as exc:
            reason = reason or str(exc)
            continue
        out = _cut_output(region[cut], ix)
        try:
            cmap = classify_output(traced, probe)
        except NotAChannelMove as exc:
            reason = reason or f"result '{out}': {exc}"
            continue
        if _is_identity(cmap, probe[1]):
            reason = reason or f"result '{out}' is the depthwise Conv's output itself (no channel summed): nothing to fuse"
            continue
        return cut, cmap
    return reason


def _is_identity(cmap: ChannelMap, channels: int) -> bool:
    terms = cmap.terms
    return (cmap.bias is None and terms.shape == (channels, 1)
            and np.array_equal(terms[:, 0], np.arange(channels)))


def _propagate_to(ix: GraphIndex, y0: str, probe, symbols, prefix: list[NodeProto]) -> Traced:
    """Trace y0 through `prefix`, freeing each index array after its last use; returns the last output."""
    last_use = {}
    for i, node in enumerate(prefix):
        for name in node.input:
            last_use[name] = i
    traced: dict[str, Traced] = {y0: source(probe)}
    shapes = {y0: probe}
    ev = ShapeEval(ix, shapes, symbols)
    out = None
    for i, node in enumerate(prefix):
        ins = [traced.get(n) if n else None for n in node.input]
        # stored constants at any size (a frozen 0/1 1x1 kernel of a wide stage has millions of entries);
        # ShapeEval's size cap is for tensors it must compute
        values = [None if (t is not None or not n) else ix.constant(n) if ix.is_constant(n) else ev.value(n)
                  for n, t in zip(node.input, ins)]
        try:
            outs = propagate(node, ins, values, ix.opset)
        except NotAChannelMove as exc:
            raise NotAChannelMove(f"{node.op_type} {node_label(node)}: {exc}") from None
        del ins
        for name in set(node.input):
            if last_use.get(name) == i:
                traced.pop(name, None)
        for name, t in zip(node.output, outs):
            if name:
                shapes[name] = t.shape
                if last_use.get(name, -1) > i:
                    traced[name] = t
        out = outs[[o for o in node.output].index(_cut_output(node, ix))] if i == len(prefix) - 1 else None
    return out

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
from dataclasses import dataclass
from math import prod

import numpy as np
from onnx import NodeProto

from .channelmap import (
    JOINING_OPS,
    OPS,
    SHAPE_OPS,
    SUMMING_OPS,
    TRACEABLE_OPS,
    ChannelMap,
    NotAChannelMove,
    ShapeEval,
    SizeDependent,
    Traced,
    classify_output,
    propagate,
    source,
)
from .geometry import ConvSpec, spec_from_conv
from .graph import SHAPE_ONLY_OPS, GraphIndex, ShapeTable, attr
from .lowering import Grouping, NotFusable, solve_grouping

_NOT_REWRITTEN = {
    "QLinearConv": "quantized convs are not rewritten",
    "ConvInteger": "quantized convs are not rewritten",
    "ConvTranspose": "transposed convs are not rewritten",
}
# Stable short codes of skip reasons (docs/reports.md lists and explains each; scripts match these).
SKIP_CODES = frozenset({
    "size_dependent", "not_a_channel_move", "not_a_channel_map", "not_a_single_conv", "nothing_summed",
    "no_single_exit", "too_large", "weight_not_constant", "bias_not_constant", "weight_dtype", "quantized",
    "transposed", "inconsistent", "no_such_form", "opset_too_old", "in_function", "other"})
_MAX_TRACE_ELEMENTS = 1 << 27
_BATCH_PROBE = 2
_SPATIAL_PROBES = (5, 7, 11, 13, 17, 19, 23, 29)


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
    code: str = "other"  # stable short code of the reason (SKIP_CODES, docs/reports.md)

    def __post_init__(self):
        if self.code not in SKIP_CODES:
            raise ValueError(f"undocumented skip code {self.code!r}")


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
        if (node.op_type in _NOT_REWRITTEN and node.domain in ("", "ai.onnx", "com.microsoft")
                and attr(node, "group", 1) > 1):
            found.append(Skip(node, "grouped_conv", _NOT_REWRITTEN[node.op_type],
                              code="quantized" if "quantized" in _NOT_REWRITTEN[node.op_type] else "transposed"))
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
    region, boundary, refused = _grow_region(ix, y0)
    if not SUMMING_OPS & ({n.op_type for n in region} | refused):
        return None  # a plain depthwise Conv followed by, say, a Flatten: nothing emulated here
    if not region:
        return Skip(dw, "emulation", boundary, code="not_a_channel_move")
    probe = _probe(ix, dw, weight.shape)
    if prod(probe.shape) > _MAX_TRACE_ELEMENTS:
        return Skip(dw, "emulation", f"depthwise output {list(probe.shape)} is too large to trace", code="too_large")
    cuts, cut_reason = _valid_cuts(ix, y0, region)
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
    if node.op_type in JOINING_OPS:
        others_ok = all(t or not n or _shape_computable(ix, n, memo) for n, t in zip(ins, is_traced))
        return None if others_ok else f"{node.op_type} {node_label(node)} mixes in a non-constant tensor"
    if not is_traced[0] or any(is_traced[1:]):
        return f"{node.op_type} {node_label(node)} uses the traced tensor as a parameter"
    if not all(not n or _shape_computable(ix, n, memo) for n in ins[1:]):
        return f"{node.op_type} {node_label(node)} has non-constant parameters"
    admit = OPS[node.op_type].admit
    why = admit(node, ix.constant) if admit is not None else None
    return None if why is None else f"{node.op_type} {node_label(node)}: {why}"


def _shape_computable(ix: GraphIndex, name: str, memo: dict, depth: int = 0) -> bool:
    """True when `name` depends only on constants and on tensor shapes."""
    if name in memo:
        return memo[name]
    ok = ix.is_constant(name)
    if not ok and depth < 48:
        node = ix.producer.get(name)
        if node is not None and node.op_type in SHAPE_OPS and node.domain in ("", "ai.onnx"):
            ok = node.op_type in SHAPE_ONLY_OPS or all(
                not n or _shape_computable(ix, n, memo, depth + 1) for n in node.input)
    memo[name] = ok
    return ok


@dataclass
class _Probe:
    """Sizes to trace at, and what they stand for: each depthwise-output axis as factors (symbol
    names for symbolic sizes), the symbols' probe values, and dim_params that name the same size."""

    shape: tuple[int, ...]
    axes: tuple
    env: dict
    aliases: dict


def _probe(ix: GraphIndex, dw: NodeProto, wdims) -> _Probe:
    """Static dims as they are; a symbolic dim becomes a symbol with a probe value (batch 2, small
    primes). A spatial size the Conv keeps (stride 1, padding that adds up to the kernel's reach) is
    the input's own symbol, so that shapes read from the Conv's input (PyTorch's `x.shape`) relate to it."""
    rank = len(wdims)
    shape = ix.shape(dw.output[0])
    if shape is None or len(shape) != rank:
        shape = (None, int(wdims[0])) + (None,) * (rank - 2)
    x_shape = ix.shape(dw.input[0])
    x_shape = x_shape if x_shape is not None and len(x_shape) == rank else (None,) * rank
    env: dict = {}
    aliases: dict = {}
    dims, axes = [], []
    probes = iter(_SPATIAL_PROBES)
    for axis, d in enumerate(shape):
        if axis == 1:
            d = int(wdims[0])
        if isinstance(d, int) and d > 0:
            dims.append(d)
            axes.append((d,) if d != 1 else ())
            continue
        name = _symbol_of(dw, axis, d, x_shape[axis], wdims)
        if isinstance(d, str) and d and d != name:
            aliases[d] = name
        if name not in env:
            env[name] = _BATCH_PROBE if axis == 0 else next(probes, 31 + axis)
        dims.append(env[name])
        axes.append((name,))
    return _Probe(tuple(dims), tuple(axes), env, aliases)


def _symbol_of(dw: NodeProto, axis: int, d, x_dim, wdims) -> str:
    """The symbol for a symbolic output dim: the input's own where the Conv keeps that size."""
    keeps = axis == 0
    if axis >= 2 and isinstance(x_dim, str) and x_dim:
        k, rank = axis - 2, len(wdims)
        strides = attr(dw, "strides", [1] * (rank - 2))
        dilations = attr(dw, "dilations", [1] * (rank - 2))
        pads = attr(dw, "pads", [0] * (2 * (rank - 2)))
        kernel = list(wdims[2:])
        auto_pad = attr(dw, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if strides[k] == 1:
            reach = dilations[k] * (kernel[k] - 1)
            keeps = auto_pad in ("SAME_UPPER", "SAME_LOWER") or (
                auto_pad == "NOTSET" and pads[k] + pads[k + rank - 2] == reach)
    if keeps and isinstance(x_dim, str) and x_dim:
        return x_dim
    return d if isinstance(d, str) and d else f"{dw.output[0]}:dim{axis}"


def _valid_cuts(ix: GraphIndex, y0: str, region: list[NodeProto]) -> tuple[list[tuple[int, str]], str]:
    """(i, exit) such that region[:i+1] can be replaced as a whole by something producing the one tensor
    `exit` (an output of region[i]; a multi-output op's other outputs are read by nothing that stays)."""
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
    cuts: list[tuple[int, str]] = []
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
                cuts.append((i, outs[0]))
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
            if user.op_type not in SHAPE_OPS or not _only_feeds(ix, user, removed, depth + 1):
                return False
    return True


def _trace(ix: GraphIndex, y0: str, probe: _Probe, region, cuts, multiplier: int
           ) -> tuple[int, str, ChannelMap, Grouping]:
    """The deepest cut whose traced content is a single Conv's channel map that sums something, else
    raises the first (deepest) reason, with its code.

    Cuts are tried deepest first; a shallower one costs another propagation, which only
    happens when the deeper result is not a conv (then the ops after the cut stay as they are).
    """
    first: NotAChannelMove | None = None
    for cut, out in reversed(cuts):
        try:
            traced = _propagate_to(ix, y0, probe, region[:cut + 1], out)
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


def _propagate_to(ix: GraphIndex, y0: str, probe: _Probe, prefix: list[NodeProto], exit_name: str) -> Traced:
    """Trace y0 through `prefix`, freeing each index array after its last use; returns `exit_name`'s trace."""
    last_use = {}
    for i, node in enumerate(prefix):
        for name in node.input:
            last_use[name] = i
    traced: dict[str, Traced] = {y0: source(probe.shape, probe.axes)}
    axes = {y0: probe.axes}
    ev = ShapeEval(ix, axes, probe.aliases)
    out = None
    for i, node in enumerate(prefix):
        ins = [traced.get(n) if n else None for n in node.input]
        try:
            values = [_parameter(ix, ev, n) if (t is None and n) else None for n, t in zip(node.input, ins)]
            outs = propagate(node, ins, values, ix.opset, probe.env)
        except NotAChannelMove as exc:
            raise type(exc)(f"{node.op_type} {node_label(node)}: {exc}", code=exc.code) from None
        del ins
        for name in set(node.input):
            if last_use.get(name) == i:
                traced.pop(name, None)
        for name, t in zip(node.output, outs):
            if name:
                axes[name] = t.axes
                if last_use.get(name, -1) > i:
                    traced[name] = t
        out = outs[list(node.output).index(exit_name)] if i == len(prefix) - 1 else None
    return out


def _parameter(ix: GraphIndex, ev: ShapeEval, name: str):
    """A non-traced input's value: a stored constant at any size (a frozen 0/1 1x1 kernel of a wide
    stage has millions of entries; ShapeEval's size cap is for what it must compute), else computed
    from shapes; SizeDependent where that value depends on the input's size in a way not provable."""
    if ix.is_constant(name):
        return ix.constant(name)
    value = ev.value(name)
    if value is None and ev.why.get(name):
        raise SizeDependent(f"'{name}' {ev.why[name]}")
    return value

"""Regions of channel-moving ops after (or before) some tensors, and their traces: what the
emulation analysis and the composite analysis (split forms, mixed 1x1 Convs) share.

A region is grown forward from its start tensors through ops that can only move or sum elements
(`channelmap.TRACEABLE_OPS`), whose other inputs are constants or computed from shapes. Every
prefix of it with a single exit tensor is a possible cut (`valid_cuts`); `propagate_to` traces the
starts' element indices through a prefix (`channelmap`), at probe sizes of the symbolic dims
(`TraceSizes`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from onnx import NodeProto

from .channelmap import (
    JOINING_OPS,
    OPS,
    SHAPE_OPS,
    TRACEABLE_OPS,
    NotAChannelMove,
    ShapeEval,
    SizeDependent,
    Traced,
    propagate,
)
from .graph import SHAPE_ONLY_OPS, GraphIndex, attr

BATCH_PROBE = 2
SPATIAL_PROBES = (5, 7, 11, 13, 17, 19, 23, 29)


def node_label(node: NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def grow_region(ix: GraphIndex, starts: list[str]) -> tuple[list[NodeProto], str, set[str]]:
    """Nodes reachable from the `starts` through traceable ops whose other inputs are constant or shape-computed;
    the first reason a traceable op was refused; the op types refused."""
    traced = set(starts)
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

    for start in starts:
        push(start)
    while heap:
        _, _, node = heapq.heappop(heap)
        why = region_refusal(ix, node, traced, shape_computable)
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


def region_refusal(ix: GraphIndex, node: NodeProto, traced: set[str], memo: dict) -> str | None:
    """None when `node` joins the region, else why not ("" for an ordinary op that ends it)."""
    if node.op_type not in TRACEABLE_OPS or node.domain not in ("", "ai.onnx"):
        return ""
    ins = [n for n in node.input]
    is_traced = [bool(n) and n in traced for n in ins]
    if node.op_type in JOINING_OPS:
        others_ok = all(t or not n or shape_computable(ix, n, memo) for n, t in zip(ins, is_traced))
        return None if others_ok else f"{node.op_type} {node_label(node)} mixes in a non-constant tensor"
    if not is_traced[0] or any(is_traced[1:]):
        return f"{node.op_type} {node_label(node)} uses the traced tensor as a parameter"
    if not all(not n or shape_computable(ix, n, memo) for n in ins[1:]):
        return f"{node.op_type} {node_label(node)} has non-constant parameters"
    admit = OPS[node.op_type].admit
    why = admit(node, ix.constant) if admit is not None else None
    return None if why is None else f"{node.op_type} {node_label(node)}: {why}"


def shape_computable(ix: GraphIndex, name: str, memo: dict, depth: int = 0) -> bool:
    """True when `name` depends only on constants and on tensor shapes."""
    if name in memo:
        return memo[name]
    ok = ix.is_constant(name)
    if not ok and depth < 48:
        node = ix.producer.get(name)
        if node is not None and node.op_type in SHAPE_OPS and node.domain in ("", "ai.onnx"):
            ok = node.op_type in SHAPE_ONLY_OPS or all(
                not n or shape_computable(ix, n, memo, depth + 1) for n in node.input)
    memo[name] = ok
    return ok


@dataclass
class TraceSizes:
    """Sizes to trace at, and what they stand for: each depthwise-output axis as factors (symbol
    names for symbolic sizes), the symbols' probe values, and dim_params that name the same size."""

    shape: tuple[int, ...]
    axes: tuple
    env: dict
    aliases: dict


def conv_output_sizes(ix: GraphIndex, dw: NodeProto, wdims) -> TraceSizes:
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
    probes = iter(SPATIAL_PROBES)
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
            env[name] = BATCH_PROBE if axis == 0 else next(probes, 31 + axis)
        dims.append(env[name])
        axes.append((name,))
    return TraceSizes(tuple(dims), tuple(axes), env, aliases)


def tensor_sizes(ix: GraphIndex, name: str, channel_axis: int) -> TraceSizes | None:
    """Probe sizes of any tensor whose rank and channel count are known: static dims as they are, a
    symbolic dim its own symbol (the dim_param, else one named after the tensor) with a probe value."""
    shape = ix.shape(name)
    if shape is None or not isinstance(shape[channel_axis], int) or shape[channel_axis] <= 0:
        return None
    env: dict = {}
    dims, axes = [], []
    probes = iter(SPATIAL_PROBES)
    for axis, d in enumerate(shape):
        if isinstance(d, int) and d > 0:
            dims.append(d)
            axes.append((d,) if d != 1 else ())
            continue
        symbol = d if isinstance(d, str) and d else f"{name}:dim{axis}"
        if symbol not in env:
            env[symbol] = BATCH_PROBE if axis == 0 else next(probes, 31 + axis)
        dims.append(env[symbol])
        axes.append((symbol,))
    return TraceSizes(tuple(dims), tuple(axes), env, {})


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


def valid_cuts(ix: GraphIndex, starts: list[str], region: list[NodeProto], what: str = "depthwise output"
               ) -> tuple[list[tuple[int, str]], str]:
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

    for start in starts:
        note(start)
    open_: set[str] = set(starts)
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
            shape_why = _shape_users_removable(ix, region[:i + 1], starts, outs[0])
            if shape_why:
                reason = shape_why
            else:
                cuts.append((i, outs[0]))
        elif not reason and any(s in exits for s in starts):
            start = next(s for s in starts if s in exits)
            reason = f"{what} {exits[start]}"
    if not cuts and not reason:
        produced = list(starts) + [o for n in region for o in n.output]
        stuck = [t for t in produced if t in open_ and t in exits]
        if stuck:
            reason = f"intermediate tensor '{stuck[0]}' {exits[stuck[0]]}"
    return cuts, reason


def _shape_users_removable(ix: GraphIndex, prefix: list[NodeProto], starts: list[str], keep: str) -> str:
    """Shape/Size consumers of removed tensors must only feed the removed nodes' parameters."""
    removed = {id(n) for n in prefix}
    names = list(starts) + [o for n in prefix for o in n.output if o and o != keep]
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


def propagate_to(ix: GraphIndex, sources: dict[str, Traced], sizes: TraceSizes, prefix: list[NodeProto],
                 exit_name: str) -> Traced:
    """Trace the `sources` through `prefix` (whose last node produces `exit_name`); `exit_name`'s trace."""
    return propagate_all(ix, sources, sizes, prefix, [exit_name])[exit_name]


def propagate_all(ix: GraphIndex, sources: dict[str, Traced], sizes: TraceSizes, prefix: list[NodeProto],
                  wanted: list[str]) -> dict[str, Traced]:
    """Trace the `sources` through `prefix`, freeing each index array after its last use; the traces
    of the `wanted` tensors (each a source or produced in `prefix`)."""
    last_use = {}
    for i, node in enumerate(prefix):
        for name in node.input:
            last_use[name] = i
    traced: dict[str, Traced] = dict(sources)
    axes = {name: t.axes for name, t in sources.items()}
    ev = ShapeEval(ix, axes, sizes.aliases)
    found = {name: traced[name] for name in wanted if name in traced}
    for i, node in enumerate(prefix):
        ins = [traced.get(n) if n else None for n in node.input]
        try:
            values = [parameter(ix, ev, n) if (t is None and n) else None for n, t in zip(node.input, ins)]
            outs = propagate(node, ins, values, ix.opset, sizes.env)
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
                if name in wanted:
                    found[name] = t
    return found


def parameter(ix: GraphIndex, ev: ShapeEval, name: str):
    """A non-traced input's value: a stored constant at any size (a frozen 0/1 1x1 kernel of a wide
    stage has millions of entries; ShapeEval's size cap is for what it must compute), else computed
    from shapes; SizeDependent where that value depends on the input's size in a way not provable."""
    if ix.is_constant(name):
        return ix.constant(name)
    value = ev.value(name)
    if value is None and ev.why.get(name):
        raise SizeDependent(f"'{name}' {ev.why[name]}")
    return value

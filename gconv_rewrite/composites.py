"""Grouped convs written with other ops than one grouped Conv, found from what the ops compute.

- The split form: G Convs with one geometry whose inputs are channel ranges of one tensor (Slice,
  Split, Gather, through Transposes and Reshapes, in any order) and whose outputs are joined along
  channels (Concat, also through Transposes): Keras Lambda slices, tf.split, torch.chunk.
- A Conv whose weight has more all-zero blocks than its group count says: a dense Conv with
  block-diagonal weights (up to channel permutations), or a grouped Conv whose groups split further.
- A Conv followed, through channel moves, by a 1x1 Conv with any weights whose rows keep to groups:
  a depthwise Conv whose frozen 0/1 1x1 Conv had a BatchNormalization folded into it by a simplifier.

One mechanism serves all three. The Convs' kernels and the channel moves around them (traced with
`channelmap`, as for emulations) say which input channel each kernel connects to which output
channel (`_Wiring`); `lowering.solve_pairs` finds the finest grouped Conv with those connections, up
to channel permutations, and `lowering.place_kernels` writes its weight. Zeros are decided exactly
(all-zero kernels), never by a tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from onnx import NodeProto

from .channelmap import ChannelMap, NotAChannelMove, Traced, classify_output, source
from .geometry import ConvSpec, conv_attributes, spec_from_conv
from .graph import GraphIndex, attr
from .lowering import Bias, Grouping, NotFusable, dense_weights, overflows, place_kernels, solve_pairs
from .tracing import (
    TraceSizes,
    conv_output_sizes,
    grow_region,
    node_label,
    propagate_all,
    propagate_to,
    shape_computable,
    tensor_sizes,
    valid_cuts,
)

# Ops that only move elements, walked through between a Conv and the Concat that joins it.
_JOIN_MOVES = frozenset({"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"})
# ... and between a tensor and the Convs that read its channel ranges.
_SLICE_MOVES = _JOIN_MOVES | {"Slice", "Split", "Gather"}
_MAX_WALK = 8
_MAX_MIXED_PAIRS = 1 << 24  # connections of a mixed region built before it is known to be grouped


@dataclass
class Composite:
    """Ops that together compute one grouped Conv (or a grouped Conv with more groups than written)."""

    kind: str  # "split" | "dense" | "grouped_conv" (finer than written) | "emulation" (Conv + mixing 1x1 Conv)
    anchor: NodeProto  # the first of its Convs: named in reports; its spatial attributes are kept
    was: str  # the form it is written in: split | dense | native | dw
    written_group: int  # the group count it is written with
    spec: ConvSpec  # of the grouped Conv it equals
    x: str  # the tensor it reads
    x_layout: str  # "NC", or "NLC": channels last (a Transpose to channels-first goes before the Conv)
    nodes: list[NodeProto]  # the nodes it replaces, in graph order; the last one produces `output`
    output: str
    layout: str  # of `output`: "NC" or "NLC"
    grouping: Grouping
    weight: np.ndarray  # [C_out, Cig, k...] in the fused Conv's channel order
    bias: np.ndarray | None
    found_as: str  # how it is written, in words
    scope: tuple = ()
    rejoin: tuple[NodeProto, int, int] | None = None  # a Concat that also joins other tensors: its inputs
    #                                                   [a, b) are the Convs' outputs, to become `output`

    @property
    def node(self) -> NodeProto:
        return self.anchor

    @property
    def as_written(self) -> bool:
        """Written exactly as the form `was` writes it: no channel permutation or layout change to undo,
        and as many groups (a dense Conv's blocks are its groups; a finer grouped Conv or a mixed one
        always changes)."""
        plain = (self.grouping.in_perm is None and self.grouping.out_order is None and self.layout == "NC"
                 and self.x_layout == "NC")
        if self.was == "dense":
            return plain
        return plain and self.was == "split" and self.written_group == self.grouping.group


@dataclass
class NearMiss:
    """Ops that look like one of the above but are not (or not provably) one grouped Conv."""

    node: NodeProto
    kind: str
    reason: str
    code: str
    spec: ConvSpec | None = None


@dataclass
class _Wiring:
    """Connections of a region: kernel `kernels[which[i]]` from input channel `inp[i]` to output `out[i]`."""

    out: np.ndarray
    inp: np.ndarray
    kernels: np.ndarray
    which: np.ndarray
    bias: Bias | None

    def nonzero(self) -> _Wiring:
        """Without the all-zero kernels: they connect nothing."""
        live = np.any(self.kernels.reshape(len(self.kernels), -1) != 0, axis=1)[self.which]
        if live.all():
            return self
        return _Wiring(self.out[live], self.inp[live], self.kernels, self.which[live], self.bias)


def find(ix: GraphIndex, taken: set[int], mixable: set[int]) -> list[Composite | NearMiss]:
    """Every composite of the graph whose nodes are not `taken` (already in another candidate).
    `mixable`: depthwise Convs whose emulation analysis failed, tried with a mixing 1x1 Conv."""
    found: list[Composite | NearMiss] = []
    used = set(taken)
    for node in ix.nodes:
        if node.op_type == "Concat" and node.domain in ("", "ai.onnx"):
            for convs, chains in _by_source(ix, _joined_convs(ix, node, used), used):
                result = _guarded(_split, ix, convs[0], "split", convs, chains, node)
                if result is not None:
                    found.append(result)
                    if isinstance(result, Composite):
                        used.update(id(n) for n in result.nodes)
    for node in ix.nodes:
        if (node.op_type == "Conv" and node.domain in ("", "ai.onnx") and id(node) not in used
                and len(node.input) > 1 and _is_pointwise(node, ix)):
            kernel_conv = _conv_behind(ix, node.input[0], _JOIN_MOVES)
            if kernel_conv is not None and id(kernel_conv) not in used and (
                    id(kernel_conv) in mixable or id(kernel_conv) not in taken):
                result = _guarded(_mixed, ix, kernel_conv, "emulation", kernel_conv, node)
                if isinstance(result, Composite):
                    found.append(result)
                    used.update(id(n) for n in result.nodes)
    for node in ix.nodes:
        if node.op_type == "Conv" and node.domain in ("", "ai.onnx") and id(node) not in used and len(node.input) > 1:
            result = _guarded(_finer, ix, node, "dense", node)
            if isinstance(result, Composite):
                found.append(result)
    return found


def _guarded(fn, ix, node, kind, *args):
    """fn(ix, *args); odd attributes or shapes it trips on make a near-miss of `node`, not a traceback."""
    try:
        return fn(ix, *args)
    except (ValueError, IndexError, TypeError, KeyError, ZeroDivisionError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return NearMiss(node, kind, f"could not be analysed ({type(exc).__name__}: {first})", "inconsistent")


# -- walking between Convs and the ops around them -------------------------------------------------

def _conv_behind(ix: GraphIndex, name: str, moves: frozenset) -> NodeProto | None:
    """The Conv whose output reaches `name` through single-reader ops in `moves`, if any."""
    for _ in range(_MAX_WALK):
        node = ix.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Conv":
            return node
        if node.op_type not in moves or len(ix.data_consumers(name)) != 1 or ix.is_output(name):
            return None
        name = node.input[0]
    return None


def _joined_convs(ix: GraphIndex, concat: NodeProto, used: set[int]) -> list[NodeProto]:
    convs: list[NodeProto] = []
    for name in concat.input:
        conv = _conv_behind(ix, name, _JOIN_MOVES) if name else None
        if conv is not None and id(conv) not in used and all(c is not conv for c in convs):
            convs.append(conv)
    return sorted(convs, key=ix.pos)


def _by_source(ix: GraphIndex, convs: list[NodeProto], used: set[int]) -> list[tuple[list[NodeProto], list]]:
    """The Convs behind one Concat, grouped by the tensor they read channel ranges of (a DenseNet-style
    Concat also joins Convs of other tensors); of a group, Convs that read that tensor whole are not
    part of its split form (they stay other inputs of the Concat). Groups of two or more, each with
    its Convs' chains (`_chain_up`)."""
    memo: dict = {}
    chains = [_chain_up(ix, n.input[0], memo, used) for n in convs]
    groups: list[tuple[set, list[int]]] = []
    for i, chain in enumerate(chains):
        mine = set(chain)
        joined = [g for g in groups if g[0] & mine]
        for g in joined:
            groups.remove(g)
        groups.append((mine.union(*(g[0] for g in joined)), sorted([i] + [k for g in joined for k in g[1]])))
    result = []
    for _, members in groups:
        sliced = [k for k in members if len(chains[k]) > 1 and not any(chains[k][0] in chains[j][1:]
                                                                       for j in members if j != k)]
        keep = sliced if len(sliced) >= 2 else members
        if len(keep) >= 2:
            result.append(([convs[k] for k in keep], [chains[k] for k in keep]))
    return result


def _chain_up(ix: GraphIndex, name: str, memo: dict, used: set[int]) -> list[str]:
    """`name` and the tensors above it through channel-moving ops, nearest first; not through an op
    another candidate rewrites (its output survives the rewrite, what is above it may not)."""
    chain = [name]
    for _ in range(_MAX_WALK):
        node = ix.producer.get(name)
        if (node is None or node.op_type not in _SLICE_MOVES or node.domain not in ("", "ai.onnx") or id(node) in used
                or not all(not n or shape_computable(ix, n, memo) for n in node.input[1:])):
            break
        name = node.input[0]
        chain.append(name)
    return chain


def _is_pointwise(node: NodeProto, ix: GraphIndex) -> bool:
    """A 1x1 Conv that touches one position at a time: stride 1, no padding."""
    dims = ix.constant_dims(node.input[1])
    if dims is None or len(dims) < 3 or any(d != 1 for d in dims[2:]):
        return False
    a = conv_attributes(node)
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return (all(s == 1 for s in a.get("strides", [1])) and not any(a.get("pads", [0]))
            and auto_pad in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER", ""))


# -- the Convs' own connections ---------------------------------------------------------------------

@dataclass
class _Conv:
    node: NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    spec: ConvSpec


def _conv(ix: GraphIndex, node: NodeProto) -> _Conv | tuple[str, str]:
    """A Conv's constant weight, bias and geometry, or why they cannot be used (reason, skip code)."""
    weight = ix.constant(node.input[1])
    if weight is None:
        return f"the weight of Conv {node_label(node)} is not a constant", "weight_not_constant"
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = ix.constant(node.input[2])
        if bias is None:
            return f"the bias of Conv {node_label(node)} is not a constant", "bias_not_constant"
    if weight.dtype.kind != "f" or weight.ndim < 3:
        return f"Conv {node_label(node)} has a {weight.dtype} weight of rank {weight.ndim}", "weight_dtype"
    spec = spec_from_conv(node, weight.shape, weight.dtype, ix.shape(node.input[0]), ix.shape(node.output[0]))
    return _Conv(node, weight, bias, spec)


def _own_pairs(conv: _Conv) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(output, input, kernel row) of every kernel of a Conv, rows of weight.reshape(C_out * Cig, k...)."""
    c_out, cig = conv.weight.shape[:2]
    cog = c_out // conv.spec.group
    out = np.repeat(np.arange(c_out), cig)
    local = np.tile(np.arange(cig), c_out)
    return out, (out // cog) * cig + local, np.arange(c_out * cig)


def _geometry_key(conv: _Conv) -> tuple:
    s = conv.spec
    return s.kernel, s.strides, s.dilations, s.pads, s.auto_pad, s.dtype


def _differ(a: _Conv, b: _Conv) -> str:
    for what in ("kernel", "strides", "dilations", "auto_pad", "pads", "dtype"):
        x, y = getattr(a.spec, what), getattr(b.spec, what)
        if x != y:
            return f"{what} {x} ({node_label(a.node)}) vs {y} ({node_label(b.node)})"
    return ""


# -- the split form --------------------------------------------------------------------------------

def _split(ix: GraphIndex, nodes: list[NodeProto], chains: list[list[str]], concat: NodeProto
           ) -> Composite | NearMiss | None:
    common = [t for t in chains[0] if all(t in c for c in chains[1:])]
    if not common or all(n.input[0] == nodes[0].input[0] for n in nodes):
        return None  # Convs of different tensors, or all of one whole tensor (Inception, SqueezeNet): not a split
    anchor = nodes[0]

    def miss(reason, code, spec=None):
        return NearMiss(anchor, "split", f"{len(nodes)} Convs joined by a Concat: {reason}", code, spec)

    convs = []
    for n in nodes:
        conv = _conv(ix, n)
        if not isinstance(conv, _Conv):
            return miss(*conv)
        convs.append(conv)
    for c in convs[1:]:
        if _geometry_key(c) != _geometry_key(convs[0]):
            return miss(f"their Convs differ: {_differ(convs[0], c)}", "unequal_convs", convs[0].spec)
    try:
        x, x_layout, selections = _read_slices(ix, convs, chains, common)
        _check_cover(convs, selections, _channels(ix, x, x_layout))
        found = _first_grouped(ix, convs, concat, selections, _channels(ix, x, x_layout))
    except NotAChannelMove as exc:
        return miss(str(exc), exc.code, convs[0].spec)
    except NotFusable as exc:
        return miss(f"they do not compute a single Conv: {exc}", "not_a_single_conv", convs[0].spec)
    region, cut, output, cmap, wiring, grouping, rejoin = found
    replaced = sorted([c.node for c in convs] + region[:cut + 1], key=ix.pos)
    written = sum(c.spec.group for c in convs)
    found = _composite(ix, "split", "split", written, convs[0], x, x_layout, replaced, output, cmap.layout,
                       grouping, wiring, f"Split -> {len(convs)} Convs -> Concat")
    if rejoin is not None and isinstance(found, Composite):
        found.rejoin = (concat,) + rejoin
        found.found_as += f" (inputs {rejoin[0]}..{rejoin[1] - 1} of {len(concat.input)})"
    return found


def _first_grouped(ix: GraphIndex, convs: list[_Conv], concat: NodeProto, selections, channels: int):
    """The deepest join of the Convs that is one grouped Conv: (region, cut, exit, channel map, wiring,
    grouping, rejoin); an op after the Concat that sums or drops channels leaves the Concat itself.
    A Concat that also joins other tensors: its run of the Convs' outputs (`rejoin`)."""
    first: Exception | None = None
    try:
        for region, cut, output, cmap in _joined(ix, convs):
            wiring = _split_wiring(convs, selections, cmap)
            try:
                return region, cut, output, cmap, wiring, solve_pairs(wiring.out, wiring.inp, len(cmap.terms),
                                                                      channels), None
            except NotFusable as exc:
                first = first or exc
    except NotAChannelMove as exc:
        first = first or exc
    rejoin = _run_in(ix, convs, concat)
    if rejoin is None:
        raise first if first is not None else NotAChannelMove("no join", code="no_single_exit")
    cmap = _run_map(convs, concat, rejoin)
    wiring = _split_wiring(convs, selections, cmap)
    return [concat], 0, concat.output[0], cmap, wiring, solve_pairs(wiring.out, wiring.inp, len(cmap.terms),
                                                                    channels), rejoin


def _run_in(ix: GraphIndex, convs: list[_Conv], concat: NodeProto) -> tuple[int, int] | None:
    """[a, b) where a Concat along channels that also joins other tensors reads the Convs' outputs
    directly, one after another, each read by nothing else; None if it does not."""
    rank = convs[0].weight.ndim
    if attr(concat, "axis", 0) % rank != 1:
        return None
    outputs = {c.node.output[0] for c in convs}
    at = [i for i, name in enumerate(concat.input) if name in outputs]
    if (len(at) != len(convs) or at != list(range(at[0], at[0] + len(at)))
            or any(ix.is_output(n) or len(ix.consumers.get(n, ())) != 1 for n in outputs)):
        return None
    return at[0], at[-1] + 1


def _run_map(convs: list[_Conv], concat: NodeProto, run: tuple[int, int]) -> ChannelMap:
    offsets, offset = {}, 0
    for c in convs:
        offsets[c.node.output[0]] = (offset, c.spec.c_out)
        offset += c.spec.c_out
    order = [np.arange(start, start + n) for start, n in (offsets[name] for name in concat.input[run[0]:run[1]])]
    return ChannelMap(np.concatenate(order)[:, None], None, "NC")


def _check_cover(convs: list[_Conv], selections: list[np.ndarray], channels: int) -> None:
    """Each channel of the source read by exactly one Conv; else say which is not."""
    readers = np.zeros(channels, dtype=np.int64)
    first = np.full(channels, -1, dtype=np.int64)
    for k, sel in enumerate(selections):
        twice = np.flatnonzero(readers[sel] > 0)
        if twice.size:
            c = int(sel[twice[0]])
            raise NotFusable(f"their slices overlap: channel {c} is read by Conv {node_label(convs[first[c]].node)} "
                             f"and Conv {node_label(convs[k].node)}")
        readers[sel] += 1
        first[sel] = k
    if not readers.all():
        raise NotFusable(f"channel {int(np.argmin(readers))} of {channels} is read by no Conv (a slice is missing)")


def _channels(ix: GraphIndex, x: str, layout: str) -> int:
    shape = ix.shape(x)
    return int(shape[1] if layout == "NC" else shape[-1])


def _read_slices(ix: GraphIndex, convs: list[_Conv], chains, common: list[str]):
    """The tensor the Convs read channel ranges of, its layout, and per Conv which of its channels
    each input channel is. The nearest common tensor channels-first is preferred; then farther
    ones (a Transpose to channels-last and back is seen through), then channels-last ones."""
    rank = convs[0].weight.ndim
    reason, code = "", "not_channel_slices"
    for layout in ("NC", "NLC"):
        for x in common[:4]:
            shape = ix.shape(x)
            if shape is None or len(shape) != rank:
                reason = reason or f"the shape of '{x}' is not known"
                continue
            sizes = tensor_sizes(ix, x, 1 if layout == "NC" else rank - 1)
            if sizes is None:
                reason = reason or f"the channel count of '{x}' is not known"
                continue
            try:
                return x, layout, _selections(ix, convs, chains, x, layout, sizes)
            except NotAChannelMove as exc:
                if not reason:
                    reason, code = str(exc), ("size_dependent" if exc.code == "size_dependent" else code)
    raise NotAChannelMove(f"their inputs are not channel ranges of one tensor: {reason}", code=code)


def _selections(ix, convs, chains, x, layout, sizes: TraceSizes) -> list[np.ndarray]:
    rank = len(sizes.shape)
    if layout == "NC":
        nc_shape, nc_axes = sizes.shape, sizes.axes
        start = source(nc_shape, nc_axes)
    else:
        perm = [0, rank - 1] + list(range(1, rank - 1))
        nc_shape = tuple(sizes.shape[p] for p in perm)
        nc_axes = tuple(sizes.axes[p] for p in perm)
        nc = source(nc_shape, nc_axes)
        back = [0] + list(range(2, rank)) + [1]
        start = Traced(nc.idx.transpose(back + [rank]), None, sizes.axes)
    prefix_ids, prefix = set(), []
    for chain in chains:
        for tensor in chain:
            if tensor == x:
                break
            producer = ix.producer.get(tensor)
            if producer is not None and id(producer) not in prefix_ids:
                prefix_ids.add(id(producer))
                prefix.append(producer)
    prefix.sort(key=ix.pos)
    wanted = [c.node.input[0] for c in convs]
    traces = propagate_all(ix, {x: start}, sizes, prefix, wanted)
    selections = []
    for conv in convs:
        cmap = classify_output(traces[conv.node.input[0]], nc_shape, nc_axes)
        terms = cmap.terms
        if cmap.layout != "NC" or terms.shape[1] != 1 or (terms < 0).any() or cmap.bias is not None:
            raise NotAChannelMove(f"the input of Conv {node_label(conv.node)} is not a channel range of '{x}'",
                                  code="not_channel_slices")
        if len(terms) != conv.spec.c_in:
            raise NotAChannelMove(f"Conv {node_label(conv.node)} reads {len(terms)} channels, not {conv.spec.c_in}",
                                  code="inconsistent")
        selections.append(terms[:, 0])
    return selections


def _joined(ix: GraphIndex, convs: list[_Conv]):
    """The cuts of the region after the Convs whose content is their outputs' channels (reordered,
    maybe summed, maybe laid out channels-last), deepest first: (region, cut, the cut tensor, its
    channel map over the Convs' outputs laid end to end). Raises the deepest reason when none is."""
    starts = [c.node.output[0] for c in convs]
    region, boundary, _ = grow_region(ix, starts)
    cuts, why = valid_cuts(ix, starts, region, what="a Conv's output")
    if not cuts:
        raise NotAChannelMove(why or boundary or "their outputs are not joined into one tensor", code="no_single_exit")
    wdims = (sum(c.spec.c_out for c in convs),) + convs[0].weight.shape[1:]
    sizes = conv_output_sizes(ix, convs[0].node, wdims)
    whole = source(sizes.shape, sizes.axes)
    sources, offset = {}, 0
    for c in convs:
        axes = (sizes.axes[0], (c.spec.c_out,) if c.spec.c_out != 1 else ()) + tuple(sizes.axes[2:])
        sources[c.node.output[0]] = Traced(whole.idx[:, offset:offset + c.spec.c_out], None, axes)
        offset += c.spec.c_out
    first: NotAChannelMove | None = None
    for cut, out in reversed(cuts):
        try:
            traced = propagate_to(ix, sources, sizes, region[:cut + 1], out)
            cmap = classify_output(traced, sizes.shape, sizes.axes)
        except NotAChannelMove as exc:
            first = first or NotAChannelMove(f"their join '{out}': {exc}", code=exc.code)
            continue
        if (cmap.terms >= 0).any(axis=1).all():
            yield region, cut, out, cmap
            continue
        first = first or NotAChannelMove(f"their join '{out}' has channels that read no Conv", code="not_a_channel_map")
    if first is not None:
        raise first


def _split_wiring(convs: list[_Conv], selections: list[np.ndarray], cmap: ChannelMap) -> _Wiring:
    """Connections of the joined outputs: output o reads Conv k's output j (cmap), which reads Conv k's
    input channels, which are the source's channels `selections[k]`."""
    terms = cmap.terms
    o_idx, t_idx = np.nonzero(terms >= 0)
    v = terms[o_idx, t_idx]
    outs, inps, rows, kernels = [], [], [], []
    bias_out, bias_val = [], []
    offset = row_base = 0
    for conv, sel in zip(convs, selections):
        _, own_in, own_row = _own_pairs(conv)
        cig = conv.weight.shape[1]
        mine = (v >= offset) & (v < offset + conv.spec.c_out)
        o, j = o_idx[mine], v[mine] - offset
        # each (o, j) brings the cig kernels of Conv output j: rows j*cig .. j*cig + cig - 1
        pos = (j[:, None] * cig + np.arange(cig)).ravel()
        outs.append(np.repeat(o, cig))
        inps.append(sel[own_in[pos]])
        rows.append(own_row[pos] + row_base)
        kernels.append(conv.weight.reshape((-1,) + conv.weight.shape[2:]))
        if conv.bias is not None:
            bias_out.append(o)
            bias_val.append(conv.bias[j])
        offset += conv.spec.c_out
        row_base += own_row.size
    bias = None
    if bias_out or cmap.bias is not None:
        bias = Bias(np.concatenate(bias_out) if bias_out else np.zeros(0, np.int64),
                    np.concatenate(bias_val) if bias_val else np.zeros(0), cmap.bias)
    return _Wiring(np.concatenate(outs), np.concatenate(inps), np.concatenate(kernels), np.concatenate(rows),
                   bias).nonzero()


# -- a Conv mixed by a 1x1 Conv ---------------------------------------------------------------------

def _mixed(ix: GraphIndex, kernel_node: NodeProto, mixer_node: NodeProto) -> Composite | None:
    """A Conv, channel moves, then a 1x1 Conv: one grouped Conv when the 1x1 Conv's rows keep to groups.

    Exact up to float reassociation: each fused kernel is the mixing weight times the Conv's kernel
    (summed where a row mixes several of a group), as every fusion, proven by verification.
    """
    conv, mixer = _conv(ix, kernel_node), _conv(ix, mixer_node)
    if (not isinstance(conv, _Conv) or not isinstance(mixer, _Conv) or not conv.spec.is_depthwise
            or conv.spec.dtype != mixer.spec.dtype):
        return None
    mid = mixer_node.input[0]
    if ix.is_output(mid) or len(ix.consumers.get(mid, ())) != 1:
        return None
    if mid == kernel_node.output[0]:
        region, cut = [], -1
        cmap = ChannelMap(np.arange(conv.spec.c_out)[:, None], None, "NC")
    else:
        try:  # the cut of the region after the Conv that the 1x1 Conv reads
            found = next(((r, c, m) for r, c, out, m in _joined(ix, [conv]) if out == mid), None)
        except NotAChannelMove:
            found = None
        if found is None:
            return None
        region, cut, cmap = found
    if cmap.layout != "NC" or len(cmap.terms) != mixer.spec.c_in:
        return None
    wiring = _split_wiring([conv], [np.arange(conv.spec.c_in)], cmap)
    a = mixer.weight.reshape(mixer.weight.shape[:2])
    mix = dense_weights(a, mixer.spec.group)
    reach = np.zeros((mixer.spec.c_in, conv.spec.c_in), dtype=np.int32)
    np.add.at(reach, (wiring.out, wiring.inp), 1)
    connected = (mix != 0).astype(np.float32) @ (reach > 0).astype(np.float32) > 0
    if connected.all() or np.count_nonzero(mix) * max(1, len(wiring.out) // max(1, mixer.spec.c_in)) > _MAX_MIXED_PAIRS:
        return None  # dense: an ordinary Conv followed by a 1x1 Conv
    wiring = _mix(wiring, mix, mixer.bias)
    try:
        grouping = solve_pairs(wiring.out, wiring.inp, mixer.spec.c_out, conv.spec.c_in)
    except NotFusable:
        return None
    replaced = sorted([kernel_node, mixer_node] + region[:cut + 1], key=ix.pos)
    return _composite(ix, "emulation", "dw", conv.spec.group, conv,
                      kernel_node.input[0], "NC", replaced, mixer_node.output[0], "NC", grouping, wiring,
                      f"Conv {node_label(kernel_node)} mixed by 1x1 Conv {node_label(mixer_node)}")


def _mix(wiring: _Wiring, mix: np.ndarray, mixer_bias: np.ndarray | None) -> _Wiring:
    """The wiring after a channel-mixing matrix: output o gets mix[o, m] times each kernel of channel m."""
    o_idx, m_idx = np.nonzero(mix)
    order = np.argsort(wiring.out, kind="stable")
    starts = np.searchsorted(wiring.out[order], np.arange(mix.shape[1] + 1))
    counts = np.diff(starts)[m_idx]
    picks = np.concatenate([order[starts[m]:starts[m + 1]] for m in m_idx]) if len(m_idx) else np.zeros(0, np.int64)
    scale = np.repeat(mix[o_idx, m_idx].astype(np.float64), counts)
    kernels = wiring.kernels[wiring.which[picks]].astype(np.float64) * scale.reshape((-1,) + (1,) * (
        wiring.kernels.ndim - 1))
    extra = None
    inner = np.zeros(mix.shape[1], dtype=np.float64)
    if wiring.bias is not None:
        if wiring.bias.values is not None:
            np.add.at(inner, wiring.bias.out, np.asarray(wiring.bias.values, dtype=np.float64))
        if wiring.bias.extra is not None:
            inner += wiring.bias.extra
    if wiring.bias is not None or mixer_bias is not None:
        extra = mix.astype(np.float64) @ inner
        if mixer_bias is not None:
            extra += mixer_bias.astype(np.float64)
    bias = Bias(np.zeros(0, np.int64), None, extra) if extra is not None else None
    return _Wiring(np.repeat(o_idx, counts), wiring.inp[picks], kernels, np.arange(len(picks)), bias).nonzero()


# -- a Conv with finer zeros than its groups --------------------------------------------------------

def _finer(ix: GraphIndex, node: NodeProto) -> Composite | None:
    """A Conv whose all-zero kernels allow more groups than it has."""
    dims = ix.constant_dims(node.input[1])
    if dims is None or len(dims) < 3:
        return None
    conv = _conv(ix, node)
    if not isinstance(conv, _Conv) or conv.spec.is_depthwise or conv.spec.c_out % conv.spec.group:
        return None
    w = conv.weight
    if np.count_nonzero(w) == w.size:
        return None  # no zero at all (the common case): as many groups as it says
    live = np.any(w.reshape(w.shape[0], w.shape[1], -1) != 0, axis=2)
    if 2 * int(live.sum(axis=1).max(initial=0)) > w.shape[1]:
        return None  # an output reads over half its inputs: no finer equal groups (the common case, decided fast)
    out, inp, rows = _own_pairs(conv)
    bias = Bias(np.arange(conv.spec.c_out), conv.bias) if conv.bias is not None else None
    wiring = _Wiring(out, inp, w.reshape((-1,) + w.shape[2:]), rows, bias).nonzero()
    try:
        grouping = solve_pairs(wiring.out, wiring.inp, conv.spec.c_out, conv.spec.c_in)
    except NotFusable:
        return None
    if grouping.group <= conv.spec.group:
        return None
    dense = conv.spec.group == 1
    what = ("dense Conv with block-diagonal weights" if dense
            else f"Conv(group={conv.spec.group}) whose weights are block-diagonal within groups")
    return _composite(ix, "dense" if dense else "grouped_conv", "dense" if dense else "native", conv.spec.group, conv,
                      node.input[0], "NC", [node], node.output[0], "NC", grouping, wiring, what)


def _composite(ix, kind, was, written, conv: _Conv, x, x_layout, replaced, output, layout, grouping: Grouping,
               wiring: _Wiring, found_as: str) -> Composite | NearMiss:
    weight, bias = place_kernels(grouping, wiring.out, wiring.inp, wiring.kernels, wiring.which, wiring.bias,
                                 conv.weight.dtype)
    if overflows(weight, bias):
        return NearMiss(conv.node, kind, f"{found_as}: its fused kernels or bias overflow {weight.dtype} (a product "
                        "or sum of kernels beyond the type's range)", "overflow", conv.spec)
    x_shape = ix.shape(x)
    if x_shape is not None and x_layout == "NLC":
        x_shape = (x_shape[0], x_shape[-1]) + tuple(x_shape[1:-1])
    out_shape = ix.shape(output)
    if out_shape is not None and layout == "NLC":
        out_shape = (out_shape[0], out_shape[-1]) + tuple(out_shape[1:-1])
    spec = spec_from_conv(conv.node, weight.shape, weight.dtype, x_shape, out_shape)
    spec = replace(spec, group=grouping.group, c_in=grouping.c_in)
    return Composite(kind, conv.node, was, written, spec, x, x_layout, replaced, output, layout, grouping,
                     weight, bias, found_as)

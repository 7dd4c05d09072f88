"""Where the graph is edited: a candidate's nodes replaced by its new form, the edits of one graph
applied in one pass (`Edit.commit`), what they orphaned dropped (`_Liveness`), and channel
permutations folded into the Conv that produces them. Nothing outside the rewritten regions changes:
names, value_info, metadata, IR version and opsets are kept.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import NodeProto, helper

from .analysis import Composite, Emulation, NativeGrouped
from .graph import SHAPE_ONLY_OPS, GraphIndex, NameGen, attr, outer_references, subgraphs
from .lowering import emit, fuse_weights, int64_tensor, tensor
from .report import Decision


class Edit:
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
    """The names `node` reads, its subgraphs' reads from enclosing scopes included."""
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


def apply_form(ix: GraphIndex, cand, form: str, names: NameGen, edit: Edit, decision: Decision) -> None:
    """Plan the edit that writes candidate `cand` in `form`, and record its node counts in `decision`."""
    if isinstance(cand, NativeGrouped):
        node = cand.node
        new, inits = emit(form, ix.opset, ix.shape(node.output[0]), node.input[0], cand.weight, cand.bias,
                          cand.spec.group, node, node.output[0], node.name or node.output[0], names)
        edit.replace[id(node)] = new
        edit.initializers += inits
        decision.nodes_removed, decision.nodes_added = 1, len(new)
    else:
        _fuse(ix, cand, names, edit, decision, form)


def _fuse(ix: GraphIndex, cand: Emulation | Composite, names: NameGen, edit: Edit, decision: Decision,
          form: str = "native") -> None:
    """Plan the edit that replaces an emulation region or a composite by one conv in `form`, its
    channel permutations folded into the producer or applied with Gathers, its layouts restored."""
    if isinstance(cand, Emulation):
        multiplier = cand.dw_weight.shape[0] // cand.grouping.c_in
        weight, bias = fuse_weights(cand.grouping, cand.cmap, cand.dw_weight, cand.dw_bias, multiplier)
        template, x, x_layout, layout = cand.dw, cand.dw.input[0], "NC", cand.cmap.layout
        replaced = [cand.dw] + cand.nodes
    else:
        weight, bias = cand.weight, cand.bias
        template, x, x_layout, layout, replaced = cand.anchor, cand.x, cand.x_layout, cand.layout, cand.nodes
    grouping = cand.grouping
    base = template.name or template.output[0]
    rank = weight.ndim
    new: list[NodeProto] = []
    conv_in = x
    if x_layout == "NLC":
        conv_in = names(f"{base}.channels_first")
        new.append(helper.make_node("Transpose", [x], [conv_in], name=names(f"{base}/to_channels_first"),
                                    perm=[0, rank - 1] + list(range(1, rank - 1))))
    if grouping.in_perm is not None:
        if x_layout == "NC" and _fold_input_permutation(ix, conv_in, grouping.in_perm, names, edit, template):
            decision.reason = "; ".join(filter(None, [decision.reason,
                                                      "input permutation folded into the producing Conv"]))
        else:
            perm_name, permuted = names(f"{base}.in_perm"), names(f"{base}.permuted_input")
            edit.initializers.append(int64_tensor(perm_name, grouping.in_perm))
            new.append(helper.make_node("Gather", [conv_in, perm_name], [permuted],
                                        name=names(f"{base}/permute_in"), axis=1))
            conv_in = permuted
            decision.reason = "; ".join(filter(None, [decision.reason, "input permutation applied with a Gather"]))
    rejoin = cand.rejoin if isinstance(cand, Composite) else None
    final = names(f"{base}.joined") if rejoin is not None else cand.output
    needs_tail = grouping.out_order is not None or layout == "NLC"
    conv_out = names(f"{base}.out") if needs_tail else final
    body, inits = emit(form, ix.opset, ix.shape(conv_out), conv_in, weight, bias, grouping.group, template, conv_out,
                       base, names)
    new += body
    edit.initializers += inits
    current = conv_out
    if grouping.out_order is not None:
        inv = np.empty_like(grouping.out_order)
        inv[grouping.out_order] = np.arange(len(inv))
        idx_name = names(f"{base}.out_perm")
        nxt = final if layout == "NC" else names(f"{base}.out_permuted")
        edit.initializers.append(int64_tensor(idx_name, inv))
        new.append(helper.make_node("Gather", [current, idx_name], [nxt], name=names(f"{base}/permute_out"), axis=1))
        current = nxt
        decision.reason = ((decision.reason + "; " if decision.reason else "")
                           + "output permutation applied with a Gather")
    if layout == "NLC":
        new.append(helper.make_node("Transpose", [current], [final], name=names(f"{base}/to_channels_last"),
                                    perm=[0] + list(range(2, rank)) + [1]))
    if rejoin is not None:  # the Concat keeps joining the other tensors, now with the fused Conv's output
        concat, a, b = rejoin
        joined = onnx.NodeProto()
        joined.CopyFrom(concat)
        del joined.input[:]
        joined.input.extend(list(concat.input[:a]) + [final] + list(concat.input[b:]))
        new.append(joined)
    last = max(replaced, key=ix.pos)
    edit.replace[id(last)] = new
    edit.remove.update(id(n) for n in replaced if n is not last)
    decision.nodes_removed, decision.nodes_added = len(replaced), len(new)


_ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
                          "Softplus", "Identity", "Neg", "Abs", "Clip", "Gelu", "Mish", "PRelu"})


def _fold_input_permutation(ix: GraphIndex, x: str, perm: np.ndarray, names: NameGen, edit: Edit,
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

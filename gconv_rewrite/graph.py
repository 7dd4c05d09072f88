"""Read-only indexes over one ONNX graph: producers, consumers, constants and shapes, built once.

Every analysis looks things up here instead of scanning the graph, so a pass stays linear in
the graph's size.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import GraphProto, NodeProto, numpy_helper

Shape = tuple  # of int | str | None

SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def scoped_subgraphs(node: NodeProto) -> list[tuple[str, int, GraphProto]]:
    """(attribute name, index, graph) of each graph-valued attribute: with the node's position, a
    subgraph's key in its parent's scope."""
    out = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append((attr.name, 0, attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend((attr.name, i, g) for i, g in enumerate(attr.graphs))
    return out


def subgraphs(node: NodeProto) -> list[GraphProto]:
    """Graph-valued attributes of a node (If branches, Loop/Scan bodies)."""
    out = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def outer_references(graph: GraphProto) -> set[str]:
    """Names a (sub)graph reads from enclosing scopes."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for g in subgraphs(node):
            used |= outer_references(g)
        local.update(node.output)
    used.update(o.name for o in graph.output)
    return used - local


class GraphIndex:
    """Producer/consumer maps, constants and (inferred) shapes of one graph."""

    def __init__(self, graph: GraphProto, shapes: "ShapeTable", opset: int,
                 outer: "GraphIndex | None" = None, path: str = "main", ir_version: int = 8):
        self.graph = graph
        self.path = path
        self.opset = opset
        self.outer = outer
        self.shapes = shapes
        self.scope = outer.scope_of(graph) if outer is not None else ()
        self._sub_scopes: dict[int, tuple] = {}
        self._subs: list[GraphProto] = []  # keeps the wrappers alive, so that their ids stay theirs
        self.nodes: list[NodeProto] = list(graph.node)
        self.position: dict[int, int] = {}
        self.reads: dict[int, list[str]] = {}  # node -> every name it reads, subgraph references included
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        consumers = self.consumers
        for pos, node in enumerate(self.nodes):
            key = id(node)
            self.position[key] = pos
            for out in node.output:
                self.producer[out] = node
            reads = [n for n in node.input if n]
            if node.attribute:
                for name, i, g in scoped_subgraphs(node):
                    reads.extend(outer_references(g))
                    self._sub_scopes[id(g)] = self.scope + ((pos, name, i),)
                    self._subs.append(g)
            if len(reads) > 1:
                reads = list(dict.fromkeys(reads))
            self.reads[key] = reads
            for name in reads:
                consumers[name].append(node)
        self.producer.pop("", None)
        self.initializers = {t.name: t for t in graph.initializer}
        self.ir_version = ir_version
        # Before IR 4 every initializer is also listed as a graph input, and still a constant.
        self.graph_inputs = {i.name for i in graph.input} - (set(self.initializers) if ir_version < 4 else set())
        self.graph_outputs = {o.name for o in graph.output}
        self._const_cache: dict[str, np.ndarray | None] = {}

    # -- constants -------------------------------------------------------------------------

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is an initializer or a Constant node's output (this or outer scopes)."""
        if name in self._const_cache:
            return self._const_cache[name]
        value = None
        if name in self.initializers and name not in self.graph_inputs:
            value = numpy_helper.to_array(self.initializers[name])
        elif name in self.producer:
            node = self.producer[name]
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_node_value(node)
            elif _is_identity(node):  # torch.onnx shares deduplicated constants through Identity nodes
                value = self.constant(node.input[0])
        elif self.outer is not None and name not in self.graph_inputs:
            value = self.outer.constant(name)
        self._const_cache[name] = value
        return value

    def is_constant(self, name: str) -> bool:
        if name in self.initializers and name not in self.graph_inputs:
            return True
        node = self.producer.get(name)
        if node is not None:
            if _is_identity(node):
                return self.is_constant(node.input[0])
            return node.op_type == "Constant" and node.domain in ("", "ai.onnx")
        return self.outer is not None and name not in self.graph_inputs and self.outer.is_constant(name)

    def constant_dims(self, name: str) -> tuple[int, ...] | None:
        """Shape of a constant without materialising it."""
        if name in self.initializers and name not in self.graph_inputs:
            return tuple(self.initializers[name].dims)
        node = self.producer.get(name)
        if node is not None and _is_identity(node):
            return self.constant_dims(node.input[0])
        value = self.constant(name)
        return None if value is None else tuple(value.shape)

    # -- structure -------------------------------------------------------------------------

    def scope_of(self, graph: GraphProto) -> tuple:
        """The scope key of a subgraph of one of this graph's nodes (see ShapeTable)."""
        key = self._sub_scopes.get(id(graph))
        if key is None:
            raise KeyError(f"graph '{graph.name}' is not a subgraph of a node of {self.path}")
        return key

    def shape(self, name: str) -> Shape | None:
        """The inferred shape of `name` as the scope that defines it sees it (sibling If branches or
        Loop bodies may reuse a name with another shape)."""
        return self.shapes.get(name, self.scope)

    def data_consumers(self, name: str) -> list[NodeProto]:
        """Consumers that read the tensor's values (Shape/Size only read its shape)."""
        return [n for n in self.consumers.get(name, ()) if n.op_type not in SHAPE_ONLY_OPS]

    def is_output(self, name: str) -> bool:
        return name in self.graph_outputs

    def pos(self, node: NodeProto) -> int:
        return self.position[id(node)]

    def outputs_of(self, key: int) -> list[str]:
        return list(self.nodes[self.position[key]].output)


def _constant_node_value(node: NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def attr(node: NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class ShapeTable:
    """Shapes of the model's values (all graphs), inferred on first use.

    ONNX shape inference runs on a weightless copy (large initializers become typed graph
    inputs), so it costs little even for multi-GB models; small initializers (shape constants)
    keep their values for data propagation. Models without candidates never pay for it.
    """

    def __init__(self, model: onnx.ModelProto, infos: dict[str, onnx.ValueInfoProto] | None = None):
        self._model = model
        self._infos = infos  # already inferred (model_io.load validates with the same inference)
        self._cache: dict[tuple, Shape | None] = {}

    def get(self, name: str, scope: tuple = ()) -> Shape | None:
        """The shape of `name` seen from `scope`: the innermost enclosing scope that knows it."""
        key = (scope, name)
        if key in self._cache:
            return self._cache[key]
        if self._infos is None:
            self._infos = _inferred_value_infos(self._model)
            self._model = None
        vi = self._lookup(name, scope)
        shape = _dims(vi) if vi is not None else None
        self._cache[key] = shape
        return shape

    def _lookup(self, name: str, scope: tuple) -> onnx.ValueInfoProto | None:
        scopes = getattr(self._infos, "scopes", None)
        if scopes is None:  # a plain name -> ValueInfo dict (one scope)
            return self._infos.get(name)
        for depth in range(len(scope), -1, -1):
            vi = scopes.get(scope[:depth], {}).get(name)
            if vi is not None:
                return vi
        return None


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large weights: big initializers become typed graph inputs.

    Checking and shape inference on it cost little even for multi-GB models; small
    initializers (shape constants) keep their values for data propagation.
    """
    skel = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skel, field, getattr(model, field))
    skel.opset_import.extend(model.opset_import)
    skel.functions.extend(model.functions)
    g, src = skel.graph, model.graph
    g.name = src.name
    g.node.extend(_inferable(n) for n in src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    input_names = {i.name for i in src.input}
    for sparse in src.sparse_initializer:  # a dense-typed stand-in, as onnxruntime densifies them
        if sparse.values.name not in input_names:
            g.input.append(onnx.helper.make_tensor_value_info(sparse.values.name, sparse.values.data_type,
                                                              list(sparse.dims)))
    for init in src.initializer:
        if _num_elements(init) <= 4096 and init.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(init)
        elif init.name not in input_names:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return skel


def _inferable(node: NodeProto) -> NodeProto:
    """onnxruntime's com.microsoft FusedConv (a Conv fused with its activation by the extended optimizer,
    saved with optimized_model_filepath) has no schema in onnx; for shape inference it is the Conv it
    was, whose shapes it keeps."""
    if node.op_type != "FusedConv" or node.domain != "com.microsoft":
        return node
    stand_in = onnx.helper.make_node("Conv", list(node.input[:3]), list(node.output[:1]), name=node.name)
    stand_in.attribute.extend(a for a in node.attribute if not a.name.startswith("activation"))
    return stand_in


def _inferred_value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    skeleton_model = skeleton(model)
    try:
        return infer_value_infos(skeleton_model, strict=False)
    except Exception:  # noqa: BLE001 - inference is a help, not a requirement: analysis falls back to probe sizes
        return value_infos(skeleton_model)


def infer_value_infos(skel: onnx.ModelProto, strict: bool) -> "ScopedInfos":
    """Shape inference (types checked), with data propagation where onnx manages it.

    onnx's data propagation keeps one table of values by name across scopes, so sibling If
    branches that reuse a name (which onnx.checker and onnxruntime accept) trip it: then the
    model is inferred without propagated values; the analysis evaluates shape subgraphs itself.
    Strict, that fallback is taken only where scopes do reuse a name: elsewhere a failure with
    propagated values is an inconsistency of the model (e.g. a Reshape target that makes an Add's
    shapes incompatible), not onnx's limitation, and is raised.
    """
    infer = onnx.shape_inference.infer_shapes
    try:
        return value_infos(infer(skel, check_type=True, strict_mode=strict, data_prop=True))
    except Exception:
        if strict and not names_reused_across_scopes(skel.graph):
            raise
        return value_infos(infer(skel, check_type=True, strict_mode=strict, data_prop=False))


def names_reused_across_scopes(graph: GraphProto) -> bool:
    """True when two scopes (the graph, If branches, Loop/Scan bodies, at any depth) define the same
    name: what onnx's data propagation, with one table of values for all scopes, cannot handle."""
    seen: set[str] = set()
    stack = [graph]
    while stack:
        g = stack.pop()
        own = {i.name for i in g.input} | {t.name for t in g.initializer}
        own |= {o for n in g.node for o in n.output if o}
        if own & seen:
            return True
        seen |= own
        for node in g.node:
            if node.attribute:
                stack.extend(subgraphs(node))
    return False


class ScopedInfos(dict):
    """name -> ValueInfo (the outermost scope's first), plus `scopes`: scope key -> that scope's own
    name -> ValueInfo. A scope key is a tuple of (node position, attribute name, index) steps."""

    def __init__(self):
        super().__init__()
        self.scopes: dict[tuple, dict[str, onnx.ValueInfoProto]] = {}


def value_infos(inferred: onnx.ModelProto) -> ScopedInfos:
    """Every value's ValueInfo in an inferred model, subgraphs included, also per scope."""
    infos = ScopedInfos()
    _collect_value_infos(inferred.graph, infos, ())
    return infos


def _collect_value_infos(graph: GraphProto, infos: ScopedInfos, scope: tuple) -> None:
    own = infos.scopes.setdefault(scope, {})
    for field in (graph.input, graph.output, graph.value_info):
        for vi in field:
            own.setdefault(vi.name, vi)
            infos.setdefault(vi.name, vi)
    for pos, node in enumerate(graph.node):
        if node.attribute:
            for name, i, sub in scoped_subgraphs(node):
                _collect_value_infos(sub, infos, scope + ((pos, name, i),))


def _dims(vi: onnx.ValueInfoProto) -> Shape | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _num_elements(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def all_names(model: onnx.ModelProto) -> set[str]:
    """Every value and node name in the model, to keep new names unique."""
    names: set[str] = set()

    def visit(graph: GraphProto):
        names.update(i.name for i in graph.input)
        names.update(o.name for o in graph.output)
        names.update(t.name for t in graph.initializer)
        for node in graph.node:
            names.add(node.name)
            names.update(node.output)
            if node.attribute:
                for sub in subgraphs(node):
                    visit(sub)

    visit(model.graph)
    return names


class NameGen:
    """Fresh, readable names that clash with nothing in the model (collected on first use)."""

    def __init__(self, model: onnx.ModelProto):
        self._model = model
        self.taken: set[str] | None = None

    def __call__(self, base: str) -> str:
        if self.taken is None:
            self.taken = all_names(self._model)
        name, i = base, 1
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


def _is_identity(node: NodeProto) -> bool:
    return (node.op_type == "Identity" and node.domain in ("", "ai.onnx") and len(node.input) == 1
            and bool(node.input[0]))

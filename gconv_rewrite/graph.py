"""Read-only indexes over one ONNX graph: producers, consumers, constants and shapes, built once.

Every analysis looks things up here instead of scanning the graph, so a pass stays linear in
the graph's size.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import numpy as np
import onnx
from onnx import GraphProto, NodeProto, numpy_helper

Shape = tuple  # of int | str | None

SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


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

    def __init__(self, graph: GraphProto, shapes: dict[str, Shape], opset: int,
                 outer: "GraphIndex | None" = None, path: str = "main"):
        self.graph = graph
        self.path = path
        self.opset = opset
        self.outer = outer
        self.shapes = shapes
        self.position: dict[int, int] = {}
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        for pos, node in enumerate(graph.node):
            self.position[id(node)] = pos
            for out in node.output:
                if out:
                    self.producer[out] = node
            seen = set()
            for inp in node.input:
                if inp and inp not in seen:
                    seen.add(inp)
                    self.consumers[inp].append(node)
            for g in subgraphs(node):
                for ref in outer_references(g) - seen:
                    seen.add(ref)
                    self.consumers[ref].append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {i.name for i in graph.input}
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
        elif self.outer is not None and name not in self.graph_inputs:
            value = self.outer.constant(name)
        self._const_cache[name] = value
        return value

    def is_constant(self, name: str) -> bool:
        if name in self.initializers and name not in self.graph_inputs:
            return True
        node = self.producer.get(name)
        if node is not None:
            return node.op_type == "Constant" and node.domain in ("", "ai.onnx")
        return self.outer is not None and name not in self.graph_inputs and self.outer.is_constant(name)

    def constant_dims(self, name: str) -> tuple[int, ...] | None:
        """Shape of a constant without materialising it."""
        if name in self.initializers and name not in self.graph_inputs:
            return tuple(self.initializers[name].dims)
        value = self.constant(name)
        return None if value is None else tuple(value.shape)

    # -- structure -------------------------------------------------------------------------

    def shape(self, name: str) -> Shape | None:
        return self.shapes.get(name)

    def data_consumers(self, name: str) -> list[NodeProto]:
        """Consumers that read the tensor's values (Shape/Size only read its shape)."""
        return [n for n in self.consumers.get(name, ()) if n.op_type not in SHAPE_ONLY_OPS]

    def is_output(self, name: str) -> bool:
        return name in self.graph_outputs

    def pos(self, node: NodeProto) -> int:
        return self.position[id(node)]


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


def infer_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Shapes of every value in the model (all graphs), from ONNX shape inference on a weightless copy.

    Large initializers are replaced by typed graph inputs first, so inference costs little even
    for multi-GB models; small ones (shape constants) keep their values for data propagation.
    """
    skeleton = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, field, getattr(model, field))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g, src = skeleton.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    input_names = {i.name for i in src.input}
    for init in src.initializer:
        if _num_elements(init) <= 4096 and init.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(init)
        elif init.name not in input_names:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    shapes: dict[str, Shape] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        inferred = skeleton
    _collect_shapes(inferred.graph, shapes)
    for init in src.initializer:
        shapes.setdefault(init.name, tuple(int(d) for d in init.dims))
    return shapes


def _collect_shapes(graph: GraphProto, shapes: dict[str, Shape]) -> None:
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shapes[vi.name] = tuple(dims)
    for init in graph.initializer:
        shapes.setdefault(init.name, tuple(int(d) for d in init.dims))
    for node in graph.node:
        for sub in subgraphs(node):
            _collect_shapes(sub, shapes)


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
            names.update(node.input)
            for sub in subgraphs(node):
                visit(sub)

    visit(model.graph)
    return names


class NameGen:
    """Fresh, readable names that clash with nothing in the model."""

    def __init__(self, taken: Iterable[str]):
        self.taken = set(taken)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

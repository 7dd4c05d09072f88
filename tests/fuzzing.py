"""Model mutations for fuzzing the tool (shared by tests/test_fuzz.py and benchmarks/fuzz.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers import run_first


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))] if len(seq) else None


def flip_bytes(model: onnx.ModelProto, rng) -> bytes:
    data = bytearray(model.SerializeToString())
    for _ in range(int(rng.integers(1, 9))):
        data[int(rng.integers(len(data)))] = int(rng.integers(256))
    return bytes(data)


def truncate(model: onnx.ModelProto, rng) -> bytes:
    data = model.SerializeToString()
    return data[: int(rng.integers(1, len(data)))]


def mutate_attribute(model: onnx.ModelProto, rng) -> onnx.ModelProto:
    nodes = [n for n in model.graph.node
             if any(a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS) for a in n.attribute)]
    node = _pick(rng, nodes)
    attr = _pick(rng, [a for a in node.attribute if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)])
    value = int(rng.integers(-2, 12))
    if attr.type == onnx.AttributeProto.INT:
        attr.i = value
    elif len(attr.ints):
        attr.ints[int(rng.integers(len(attr.ints)))] = value
    return model


def mutate_int_constant(model: onnx.ModelProto, rng) -> onnx.ModelProto:
    inits = [t for t in model.graph.initializer if t.data_type == TensorProto.INT64 and 0 < np.prod(t.dims) <= 16]
    tensor = _pick(rng, inits)
    if tensor is None:
        return mutate_attribute(model, rng)
    value = numpy_helper.to_array(tensor).copy()
    flat = value.reshape(-1)
    flat[int(rng.integers(flat.size))] = int(rng.integers(-3, 70))
    tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return model


def mutate_dims(model: onnx.ModelProto, rng) -> onnx.ModelProto:
    if rng.random() < 0.5:
        vi = _pick(rng, list(model.graph.input))
        dims = vi.type.tensor_type.shape.dim
        d = dims[int(rng.integers(len(dims)))]
        if rng.random() < 0.5:
            d.dim_value = int(rng.integers(0, 40))
        else:
            d.dim_param = "sym"
    else:
        tensor = _pick(rng, [t for t in model.graph.initializer if len(t.dims)])
        tensor.dims[int(rng.integers(len(tensor.dims)))] = int(rng.integers(1, 9))
    return model


def mutate_dtype(model: onnx.ModelProto, rng) -> onnx.ModelProto:
    dtype = _pick(rng, [TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT8])
    if rng.random() < 0.5:
        _pick(rng, list(model.graph.input)).type.tensor_type.elem_type = dtype
    else:
        _pick(rng, list(model.graph.initializer)).data_type = dtype
    return model


def mutate_wiring(model: onnx.ModelProto, rng) -> onnx.ModelProto:
    graph = model.graph
    names = ([o for n in graph.node for o in n.output] + [i.name for i in graph.input]
             + [t.name for t in graph.initializer])
    choice = rng.random()
    if choice < 0.5:
        node = _pick(rng, list(graph.node))
        if len(node.input):
            node.input[int(rng.integers(len(node.input)))] = _pick(rng, names)
    elif choice < 0.75:
        del graph.node[int(rng.integers(len(graph.node)))]
    else:
        i, j = rng.integers(len(graph.node), size=2)
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(graph.node[int(i)])
        b.CopyFrom(graph.node[int(j)])
        graph.node[int(i)].CopyFrom(b)
        graph.node[int(j)].CopyFrom(a)
    return model


MUTATIONS = [flip_bytes, truncate, mutate_attribute, mutate_int_constant, mutate_dims, mutate_dtype, mutate_wiring]


def mutated(model: onnx.ModelProto, rng) -> tuple[str, bytes]:
    """One random mutation of a copy of `model`: (its name, the serialized result)."""
    fn = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    out = fn(copy, rng)
    return fn.__name__, out if isinstance(out, bytes) else out.SerializeToString()


def check_case(invoke, data: bytes, workdir, direction: str) -> str:
    """Run the CLI on one mutated model; return the outcome ('ok', 'refused', 'parity') or raise AssertionError."""
    src, out = workdir / "in.onnx", workdir / "out.onnx"
    src.write_bytes(data)
    out.unlink(missing_ok=True)
    result = invoke(src, "-o", out, "--provider", "cpu", "--no-latency", "--direction", direction)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output[-400:])
    assert src.read_bytes() == data  # the input is never modified
    if result.exit_code == 0:
        onnx.checker.check_model(str(out))
        assert "FAIL" not in result.output
        return "ok"
    assert not out.exists(), "a failed run left a file at -o"
    assert result.output.strip().splitlines()[-1].startswith("error:"), result.output
    return "parity" if result.exit_code == 1 else "refused"


# -- generated models: symbolic-size ops and sibling scopes sharing names ----------------------------
# Valid by construction; the oracle is onnxruntime at sizes the tool never saw: wherever the original
# runs, a written model must compute the same.

_G, _CIG, _COG = 2, 2, 3
_C = _G * _CIG
_INT32_MAX = 2**31 - 1


class _Net:
    """x[N, C, H, W] (symbolic) -> depthwise Conv -> generated ops."""

    def __init__(self, rng, opset: int, prefix: str = ""):
        self.rng, self.opset, self.p = rng, opset, prefix
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base):
        self.n += 1
        return f"{self.p}{base}{self.n}"

    def const(self, values, dtype=np.int64):
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self.name("t")
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def slice(self, x, starts, ends, axes):
        if self.opset >= 10:
            return self.node("Slice", [x, self.const(starts), self.const(ends), self.const(axes)])
        return self.node("Slice", [x], starts=starts, ends=ends, axes=axes)

    def size_op(self, x):
        """One op whose meaning may depend on a symbolic size (or provably does not)."""
        axis = int(self.rng.choice([0, 2, 3]))
        k = int(self.rng.integers(1, 25))
        kind = _pick(self.rng, ["head", "tail", "whole", "to_size", "max", "min", "squeeze", "none"])
        if kind == "head":
            return self.slice(x, [0], [k], [axis])
        if kind == "tail":
            return self.slice(x, [-k], [_INT32_MAX], [axis])
        if kind == "whole":
            return self.slice(x, [0], [_INT32_MAX if self.rng.random() < 0.5 else 2**63 - 1], [axis])
        size = self.slice(self.node("Shape", [x]), [axis], [axis + 1], [0])
        if kind == "to_size" and self.opset >= 10:
            return self.node("Slice", [x, self.const([0]), size, self.const([axis])])
        if kind in ("max", "min") and self.opset >= 13:
            extra = [self.const([k + int(self.rng.integers(0, 5))])] * int(self.rng.integers(0, 2))
            picked = self.node("Max" if kind == "max" else "Min", [size, self.const([k])] + extra)
            return self.node("Add", [x, self.node("Cast", [picked], to=TensorProto.FLOAT)])
        if kind == "squeeze" and self.opset < 13:
            return self.node("Unsqueeze", [self.node("Squeeze", [x])], axes=[0])
        return x

    def emulation(self, y, x):
        """Reshape -> ReduceSum -> Reshape with run-time sizes read from y or from the conv input x."""
        src = y if self.rng.random() < 0.6 else x
        hw = self.slice(self.node("Shape", [src]), [2], [4], [0])
        head = self.slice(self.node("Shape", [src]), [0], [1], [0]) if self.rng.random() < 0.5 else self.const([0])
        r = self.node("Reshape", [y, self.node("Concat", [head, self.const([_G, _CIG, _COG]), hw], axis=0)])
        if self.opset >= 13:
            s = self.node("ReduceSum", [r, self.const([2])], keepdims=0)
        else:
            s = self.node("ReduceSum", [r], axes=[2], keepdims=0)
        return self.node("Reshape", [s, self.node("Concat", [head, self.const([_G * _COG]), hw], axis=0)])

    def block(self, x):
        w = self.name("w")
        self.inits.append(numpy_helper.from_array(self.rng.standard_normal((_C * _COG, 1, 3, 3)).astype(np.float32), w))
        y = self.name("y")
        self.nodes.append(helper.make_node("Conv", [x, w], [y], group=_C, pads=[1, 1, 1, 1], name=self.name("dw")))
        before = self.size_op(y) if self.rng.random() < 0.5 else y
        out = self.emulation(before, x)
        return self.size_op(out) if self.rng.random() < 0.5 else out


def _finish(nodes, inits, out, opset, extra_inputs=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", _C, "H", "W"])
    graph = helper.make_graph(nodes, "g", [x] + list(extra_inputs),
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def symbolic_size_model(rng) -> onnx.ModelProto:
    """A depthwise emulation with symbolic N, H, W and ops whose meaning may depend on those sizes."""
    net = _Net(rng, int(_pick(rng, [9, 11, 13, 17])))
    out = net.block("x")
    net.nodes.append(helper.make_node("Identity", [out], ["out"]))
    return _finish(net.nodes, net.inits, "out", net.opset)


def sibling_scopes_model(rng) -> onnx.ModelProto:
    """An If whose branches reuse every name (values, Shape outputs, weights) at different sizes."""
    opset = int(_pick(rng, [11, 13, 17]))
    branches = []
    for branch in ("then", "else"):
        net = _Net(rng, opset)  # the same names in both branches
        x = "x"
        pool = int(_pick(rng, [1, 2]))
        if pool > 1:
            net.nodes.append(helper.make_node("MaxPool", ["x"], ["pooled"], kernel_shape=[pool] * 2,
                                              strides=[pool] * 2))
            x = "pooled"
        out = net.block(x)
        net.nodes.append(helper.make_node("Identity", [out], ["branch_out"]))
        branches.append(helper.make_graph(net.nodes, branch, [], [helper.make_tensor_value_info(
            "branch_out", TensorProto.FLOAT, None)], net.inits))
    node = helper.make_node("If", ["cond"], ["out"], then_branch=branches[0], else_branch=branches[1])
    return _finish([node], [], "out", opset, [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])])


GENERATORS = [symbolic_size_model, sibling_scopes_model]


def _run(model: onnx.ModelProto, feed):
    return run_first(model, feed)


def check_generated(invoke, model: onnx.ModelProto, rng, workdir, direction: str) -> str:
    """Run the CLI on a generated model; if it writes one, compare it with the original in onnxruntime
    at sizes beyond the analysis' probes (and both If branches). Returns the outcome or raises AssertionError."""
    src, out = workdir / "gen.onnx", workdir / "gen.out.onnx"
    src.write_bytes(model.SerializeToString())
    out.unlink(missing_ok=True)
    shape = f"x:{int(rng.integers(1, 4))}x{_C}x{int(rng.integers(3, 20))}x{int(rng.integers(3, 20))}"
    result = invoke(src, "-o", out, "--provider", "cpu", "--no-latency", "--direction", direction,
                    "--input-shape", shape)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and result.exit_code in (0, 1, 2), result.output
    if result.exit_code != 0:
        assert not out.exists()
        return "parity" if result.exit_code == 1 else "refused"
    rewritten = onnx.load(str(out))
    conds = [np.array(True), np.array(False)] if any(i.name == "cond" for i in model.graph.input) else [None]
    compared = 0
    for n, h, w in [(1, 3, 5), (3, 9, 4), (2, 45, 37), (5, 64, 3)]:
        x = rng.standard_normal((n, _C, h, w)).astype(np.float32)
        for cond in conds:
            feed = {"x": x} if cond is None else {"x": x, "cond": cond}
            try:
                a = _run(model, feed)
            except Exception:  # noqa: BLE001 - the original is not defined here
                continue
            b = _run(rewritten, feed)
            assert a.shape == b.shape and np.abs(a - b).max(initial=0) <= 1e-4 * max(1.0, np.abs(a).max(initial=0)), \
                f"wrong model written: differs at x{[n, _C, h, w]} cond={cond}"
            compared += 1
    return "ok" if rewritten.SerializeToString() != model.SerializeToString() else "unchanged"

"""Model mutations for fuzzing the tool (shared by tests/test_fuzz.py and benchmarks/fuzz.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


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
    nodes = [n for n in model.graph.node if any(a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS) for a in n.attribute)]
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
    names = [o for n in graph.node for o in n.output] + [i.name for i in graph.input] + [t.name for t in graph.initializer]
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

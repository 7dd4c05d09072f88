"""Index propagation follows onnxruntime's semantics op by op: the trace of each op, evaluated on
integer-coded data, equals onnxruntime's output on that data."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from gconv_rewrite.channelmap import NotAChannelMove, Traced, classify_output, propagate, source

from helpers import run_ort

SHAPE = (2, 6, 3, 4)


def evaluate(trace: Traced, data: np.ndarray) -> np.ndarray:
    flat = np.concatenate([data.reshape(-1), [0]])
    idx = np.where(trace.idx >= 0, trace.idx, flat.size - 1)
    out = flat[idx].sum(axis=-1)
    return out + (trace.bias if trace.bias is not None else 0)


def one_node_model(node, consts, opset=17):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph = helper.make_graph([node], "g", [x], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


CASES = [
    ("Transpose", {}, {"perm": [0, 2, 3, 1]}),
    ("Reshape", {"s": np.array([0, 2, 3, -1], np.int64)}, {}),
    ("Reshape", {"s": np.array([2, 3, 2, 12], np.int64)}, {}),
    ("Flatten", {}, {"axis": 2}),
    ("Slice", {"st": np.array([4, 1], np.int64), "en": np.array([-100, 3], np.int64),
               "ax": np.array([1, 3], np.int64), "sp": np.array([-2, 1], np.int64)}, {}),
    ("Slice", {"st": np.array([-1], np.int64), "en": np.array([2**62], np.int64), "ax": np.array([-1], np.int64)}, {}),
    ("Gather", {"i": np.array([[5, 0], [-1, 2]], np.int64)}, {"axis": 1}),
    ("ReduceSum", {"a": np.array([1, 3], np.int64)}, {"keepdims": 1}),
    ("ReduceSum", {"a": np.array([1], np.int64)}, {"keepdims": 0}),
    ("Unsqueeze", {"a": np.array([0, -1], np.int64)}, {}),
    ("Add", {"c": np.arange(6, dtype=np.float32).reshape(6, 1, 1)}, {}),
    ("Sub", {"c": np.float32(3.5).reshape(())}, {}),
    ("Conv", {"w": (np.random.default_rng(0).random((5, 6, 1, 1)) < 0.4).astype(np.float32),
              "b": np.arange(5, dtype=np.float32)}, {}),
]


@pytest.mark.parametrize("op,consts,attrs", CASES, ids=[c[0] + str(i) for i, c in enumerate(CASES)])
def test_trace_matches_onnxruntime(op, consts, attrs):
    node = helper.make_node(op, ["x"] + list(consts), ["y"], **attrs)
    data = np.random.default_rng(1).permutation(np.prod(SHAPE)).astype(np.float32).reshape(SHAPE)
    want = run_ort(one_node_model(node, consts), {"x": data})["y"]
    traced = [source(SHAPE)] + [None] * len(consts)
    values = [None] + list(consts.values())
    (out,) = propagate(node, traced, values, 17)
    np.testing.assert_array_equal(evaluate(out, data), want)


def test_split_and_concat_and_self_add_match_onnxruntime():
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1),
             helper.make_node("Concat", ["b", "a"], ["c"], axis=3),
             helper.make_node("Add", ["c", "c"], ["y"])]
    sizes = np.array([3, 3], np.int64)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(sizes, "sizes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    want = run_ort(model, {"x": data})["y"]
    a, b = propagate(nodes[0], [source(SHAPE), None], [None, sizes], 17)
    (c,) = propagate(nodes[1], [b, a], [None, None], 17)
    (y,) = propagate(nodes[2], [c, c], [None, None], 17)
    np.testing.assert_array_equal(evaluate(y, data), want)


def test_non_binary_1x1_conv_is_not_a_channel_move():
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    w = np.full((2, 6, 1, 1), 0.5, np.float32)
    with pytest.raises(NotAChannelMove, match="0/1"):
        propagate(node, [source(SHAPE), None], [None, w], 17)


def test_classify_reads_channels_first_and_channels_last():
    t = source(SHAPE)
    cmap = classify_output(t, SHAPE)
    assert cmap.layout == "NC" and cmap.terms[:, 0].tolist() == list(range(6))
    (nhwc,) = propagate(helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1]), [t], [None], 17)
    assert classify_output(nhwc, SHAPE).layout == "NLC"


def test_classify_refuses_a_reshape_that_mixes_channels_and_space():
    t = source(SHAPE)
    (mixed,) = propagate(helper.make_node("Reshape", ["x", "s"], ["y"]), [t, None],
                         [None, np.array([2, 3, 6, 4], np.int64)], 17)
    with pytest.raises(NotAChannelMove):
        classify_output(mixed, SHAPE)


def test_classify_refuses_a_sum_over_space():
    (summed,) = propagate(helper.make_node("ReduceSum", ["x", "a"], ["y"], keepdims=1), [source(SHAPE), None],
                          [None, np.array([3], np.int64)], 17)
    with pytest.raises(NotAChannelMove, match="spatial"):
        classify_output(summed, SHAPE)

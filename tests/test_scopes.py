"""Sibling scopes (If branches, Loop bodies) may reuse tensor names with other shapes: shapes,
value_info and constants are looked up in the scope that defines the tensor (issue 13, item 2)."""

import numpy as np
import onnxruntime as ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import gconv_rewrite as gr

from helpers import run_ort

G, CIG, COG = 2, 2, 2
C = G * CIG


def _branch(name, pool, emulated, shared_shape_name, rng):
    shared_shape_name = shared_shape_name or f"shape_{name}"
    """x (outer) -> [MaxPool 2x2] -> grouped Conv or its emulation -> out; every name is shared
    with the sibling branch, whose spatial size differs."""
    nodes, inits = [], []
    src = "x"
    if pool:
        nodes.append(helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[pool, pool], strides=[pool, pool]))
        src = "p"
    if emulated:
        w = rng.standard_normal((C * COG, 1, 3, 3)).astype(np.float32)
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0, G, CIG, COG, -1]), "t5"),
                  numpy_helper.from_array(np.array([2]), "ax"), numpy_helper.from_array(np.array([0, G * COG]), "head"),
                  numpy_helper.from_array(np.array([2]), "st"), numpy_helper.from_array(np.array([4]), "en")]
        nodes += [helper.make_node("Conv", [src, "w"], ["d"], group=C, pads=[1, 1, 1, 1], name="dw"),
                  helper.make_node("Reshape", ["d", "t5"], ["r"]),
                  helper.make_node("ReduceSum", ["r", "ax"], ["s"], keepdims=0),
                  helper.make_node("Shape", ["d"], [shared_shape_name]),
                  helper.make_node("Slice", [shared_shape_name, "st", "en"], ["hw"]),
                  helper.make_node("Concat", ["head", "hw"], ["target"], axis=0),
                  helper.make_node("Reshape", ["s", "target"], ["y"])]
    else:
        w = rng.standard_normal((G * COG, CIG, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, "w"))
        nodes.append(helper.make_node("Conv", [src, "w"], ["y"], group=G, pads=[1, 1, 1, 1], name="gc"))
        nodes.append(helper.make_node("Shape", ["y"], [shared_shape_name]))
        nodes.append(helper.make_node("Reshape", ["y", shared_shape_name], ["r2"]))
        nodes[-1].output[0] = "y2"
    out = "y2" if not emulated else "y"
    nodes.append(helper.make_node("Relu", [out], ["out"]))
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)


def if_model(emulated, pools=(0, 2), size=8, shared_shape_name=None, seed=0, opset=17):
    rng = np.random.default_rng(seed)
    then_b = _branch("then", pools[0], emulated, shared_shape_name, rng)
    else_b = _branch("else", pools[1], emulated, shared_shape_name, rng)
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["o"], then_branch=then_b, else_branch=else_b)], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, size, size]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def both_branches_agree(model, out):
    x = np.random.default_rng(1).standard_normal(model.graph.input[0].type.tensor_type.shape.dim[2].dim_value ** 2 * C)
    x = x.astype(np.float32).reshape((1, C) + (model.graph.input[0].type.tensor_type.shape.dim[2].dim_value,) * 2)
    for c in (True, False):
        feed = {"x": x, "c": np.array(c)}
        a, b = run_ort(model, feed)["o"], run_ort(out, feed)["o"]
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max()), c


def test_expand_writes_each_branch_with_its_own_spatial_sizes():
    model = if_model(emulated=False)
    result = gr.rewrite(model, "expand", verify_result=False)
    assert [d.action for d in result.decisions] == ["expanded", "expanded"]
    both_branches_agree(model, result.model)


def test_fuse_traces_each_branch_at_its_own_size():
    model = if_model(emulated=True)
    result = gr.rewrite(model, "fuse", verify_result=False)
    assert [d.action for d in result.decisions] == ["fused", "fused"]
    both_branches_agree(model, result.model)


def test_branches_sharing_a_shape_output_name_are_not_refused_as_a_whole():
    # both branches name their Shape output 'sh': onnx's data propagation trips on it
    model = if_model(emulated=False, shared_shape_name="sh")
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    result = gr.rewrite(model, "expand", provider="cpu", latency=False)
    assert result.verification.passed and result.count("expanded") == 2


@settings(max_examples=12, deadline=None)
@given(st.sampled_from([(0, 2), (2, 0), (2, 4), (0, 4)]), st.sampled_from([8, 16]), st.booleans(),
       st.sampled_from(["fuse", "expand"]), st.sampled_from([None, "sh"]), st.sampled_from([13, 15, 17, 19]))
def test_sibling_scopes_sharing_names_at_any_sizes(pools, size, emulated, direction, shape_name, opset):
    model = if_model(emulated=emulated, pools=pools, size=size, shared_shape_name=shape_name, opset=opset)
    result = gr.rewrite(model, direction, verify_result=False)
    both_branches_agree(model, result.model)


def _loop_body(src, rng):
    """One iteration: out = grouped Conv of the outer tensor `src`; the body's names are shared with
    the sibling Loop's body, whose input has another spatial size."""
    w = rng.standard_normal((G * COG, CIG, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
             helper.make_node("Conv", [src, "bw"], ["y"], group=G, pads=[1, 1, 1, 1], name="gc"),
             helper.make_node("Relu", ["y"], ["scan_out"])]
    return helper.make_graph(
        nodes, "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "bw")])


def test_sibling_loop_bodies_sharing_names_are_rewritten_each_at_its_own_size():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Loop", ["n", "c"], ["o1"], body=_loop_body("x", rng)),
             helper.make_node("Loop", ["n", "c"], ["o2"], body=_loop_body("p", rng))]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
                              [helper.make_tensor_value_info("o1", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("o2", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(1, np.int64), "n"),
                               numpy_helper.from_array(np.array(True), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = gr.rewrite(model, "expand", provider="cpu", latency=False)
    assert result.count("expanded") == 2 and result.verification.passed
    assert any("Loop" in n for n in result.verification.notes)
    x = {"x": np.random.default_rng(5).standard_normal((1, C, 8, 8)).astype(np.float32)}
    for name in ("o1", "o2"):
        np.testing.assert_allclose(run_ort(result.model, x)[name], run_ort(model, x)[name], rtol=1e-4, atol=1e-5)


def test_an_input_flag_is_sampled_both_ways_so_both_rewritten_branches_run():
    result = gr.rewrite(if_model(emulated=False), "expand", provider="cpu", latency=False)
    assert result.verification.passed and result.verification.samples == 2
    assert not any("never executed" in n for n in result.verification.notes)


def test_a_rewritten_branch_no_sample_runs_is_named():
    model = if_model(emulated=False)
    model.graph.input.pop()  # the condition becomes a constant: the else branch never runs
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "c"))
    result = gr.rewrite(model, "expand", provider="cpu", latency=False)
    assert result.verification.passed and result.count("expanded") == 2
    assert any("else_branch of If 'o' was never executed" in n for n in result.verification.notes)
    assert not any("then_branch" in n for n in result.verification.notes)

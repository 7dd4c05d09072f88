"""Near-misses are left untouched, each with the precise reason it was refused."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import gconv_rewrite as gr
from gconv_rewrite.errors import GconvError

from helpers import op_counts, run_ort

C, M, G, H = 8, 2, 4, 5  # depthwise over 8 channels, multiplier 2; a grouped conv would have 4 groups


def model_with(nodes, inits, outputs=("y",), inputs=(("x", [1, C, H, H]),)):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def dw_inits():
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((C * M, 1, 3, 3)).astype(np.float32)}


def dw_node():
    return helper.make_node("Conv", ["x", "w"], ["d"], name="dw", group=C, pads=[1, 1, 1, 1])


def only_decision(model):
    result = gr.rewrite(model, "fuse", verify_result=False)
    assert len(result.decisions) == 1, [d.line() for d in result.decisions]
    decision = result.decisions[0]
    assert result.model.SerializeToString() == model.SerializeToString()  # untouched
    return decision


def test_sum_over_a_spatial_axis():
    inits = {**dw_inits(), "ax": np.array([3], np.int64)}
    model = model_with([dw_node(), helper.make_node("ReduceSum", ["d", "ax"], ["y"], keepdims=1)], inits)
    d = only_decision(model)
    assert d.action == "skipped" and d.code == "not_a_channel_map"


def test_sum_over_a_spatial_axis_then_broadcast_back():
    # Keeps the shape but sums positions: the map check must catch it, not the shape check.
    inits = {**dw_inits(), "ax": np.array([3], np.int64), "z": np.zeros((1, 1, 1, H), np.float32)}
    model = model_with([dw_node(), helper.make_node("ReduceSum", ["d", "ax"], ["s"], keepdims=1),
                        helper.make_node("Add", ["s", "z"], ["y"])], inits)
    d = only_decision(model)
    assert d.action == "skipped" and d.code == "not_a_channel_map"


def test_non_constant_weight():
    model = model_with([helper.make_node("Conv", ["x", "wx"], ["y"], name="gc", group=G)], {},
                       inputs=(("x", [1, C, H, H]), ("wx", [C, C // G, 3, 3])))
    d = only_decision(model)
    assert d.kind == "grouped_conv" and d.action == "skipped"
    assert d.code == "weight_not_constant" and "channel count" in d.reason  # the words say what is unknown


def test_reshape_target_not_computable():
    model = model_with([dw_node(), helper.make_node("Reshape", ["d", "shape"], ["y"])], dw_inits(),
                       inputs=(("x", [1, C, H, H]), ("shape", [6])))
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.INT64
    d = only_decision(model)
    assert d.action == "skipped" and d.code == "not_a_channel_move" and "Reshape dw" not in d.reason


def test_reshape_that_mixes_channels_and_space():
    # Transposing H next to the channels and then reshaping as if it were NCHW reinterprets rows as channels.
    inits = {**dw_inits(), "s2": np.array([1, G, C // G, M, H, H], np.int64), "ax": np.array([2], np.int64),
             "s3": np.array([1, G * M, H, H], np.int64)}
    nodes = [dw_node(), helper.make_node("Transpose", ["d"], ["r1"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["r1", "s2"], ["r2"]),
             helper.make_node("ReduceSum", ["r2", "ax"], ["r3"], keepdims=0),
             helper.make_node("Reshape", ["r3", "s3"], ["y"])]
    d = only_decision(model_with(nodes, inits))
    assert d.action == "skipped" and d.code == "not_a_channel_map"


def emulation_nodes(out="y"):
    return [helper.make_node("Reshape", ["d", "s2"], ["r2"]),
            helper.make_node("ReduceSum", ["r2", "ax"], ["r3"], keepdims=0),
            helper.make_node("Reshape", ["r3", "s3"], [out])]


def emulation_inits():
    return {**dw_inits(), "s2": np.array([0, G, C // G, M, H, H], np.int64), "ax": np.array([2], np.int64),
            "s3": np.array([0, G * M, H, H], np.int64)}


def test_depthwise_output_with_another_consumer():
    nodes = [dw_node()] + emulation_nodes() + [helper.make_node("Relu", ["d"], ["z"], name="side")]
    d = only_decision(model_with(nodes, emulation_inits(), outputs=("y", "z")))
    assert d.action == "skipped" and d.code == "no_single_exit"
    assert d.reason == "depthwise output feeds Relu side, which needs the unfused tensor"  # names the reader


def test_depthwise_output_that_is_a_graph_output():
    d = only_decision(model_with([dw_node()] + emulation_nodes(), emulation_inits(), outputs=("y", "d")))
    assert d.action == "skipped" and d.code == "no_single_exit"


def test_reshapes_that_compose_to_the_emulation_are_fused():
    # Reshape -> Reshape is one reinterpretation of memory: [1,CM,H,W] -> [1,H,CM,W] -> [1,G,Cig,M,H,W]
    # is the standard emulation however odd the middle shape looks.
    inits = {**emulation_inits(), "s1": np.array([1, H, C * M, H], np.int64)}
    nodes = [dw_node(), helper.make_node("Reshape", ["d", "s1"], ["r1"]),
             helper.make_node("Reshape", ["r1", "s2"], ["r2"])] + emulation_nodes()[1:]
    result = gr.rewrite(model_with(nodes, inits), "fuse", verify_result=False)
    assert [d.action for d in result.decisions] == ["fused"]


def test_the_same_emulation_without_the_extra_consumer_is_fused():
    model = model_with([dw_node()] + emulation_nodes(), emulation_inits())
    result = gr.rewrite(model, "fuse", verify_result=False)
    assert [d.action for d in result.decisions] == ["fused"]
    assert "grouped Conv G=4 (Cig=2, Cog=2)" in result.decisions[0].computes
    x = np.random.default_rng(3).standard_normal((1, C, H, H)).astype(np.float32)
    np.testing.assert_allclose(run_ort(result.model, {"x": x})["y"], run_ort(model, {"x": x})["y"],
                               rtol=1e-5, atol=1e-5)
    assert op_counts(result.model) == {"Conv": 1}


def test_constant_added_after_the_sum_and_depthwise_bias_are_folded():
    inits = {**emulation_inits(), "b": np.random.default_rng(5).standard_normal(C * M).astype(np.float32),
             "c": np.arange(G * M, dtype=np.float32).reshape(1, G * M, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["d"], name="dw", group=C, pads=[1, 1, 1, 1])]
    nodes += emulation_nodes("s") + [helper.make_node("Add", ["c", "s"], ["y"])]
    model = model_with(nodes, inits)
    result = gr.rewrite(model, "fuse", verify_result=False)
    assert [d.action for d in result.decisions] == ["fused"]
    assert op_counts(result.model) == {"Conv": 1}
    x = np.random.default_rng(3).standard_normal((1, C, H, H)).astype(np.float32)
    np.testing.assert_allclose(run_ort(result.model, {"x": x})["y"], run_ort(model, {"x": x})["y"],
                               rtol=1e-5, atol=1e-5)


def test_input_permutation_without_a_foldable_producer_uses_a_gather():
    # Interleaved groups (input channel c = i*G + g) read straight from a graph input.
    cig = C // G
    inits = {**dw_inits(), "s": np.array([0, cig, G * M, H, H], np.int64), "ax": np.array([1], np.int64)}
    nodes = [dw_node(), helper.make_node("Reshape", ["d", "s"], ["r"]),
             helper.make_node("ReduceSum", ["r", "ax"], ["y"], keepdims=0)]
    model = model_with(nodes, inits)
    result = gr.rewrite(model, "fuse", verify_result=False)
    (d,) = result.decisions
    assert d.action == "fused" and "input-channel permutation" in d.computes
    assert d.reason == "input permutation applied with a Gather"
    assert op_counts(result.model) == {"Gather": 1, "Conv": 1}
    x = np.random.default_rng(3).standard_normal((1, C, H, H)).astype(np.float32)
    np.testing.assert_allclose(run_ort(result.model, {"x": x})["y"], run_ort(model, {"x": x})["y"],
                               rtol=1e-5, atol=1e-5)


def test_plain_depthwise_feeding_a_flatten_is_not_reported():
    model = model_with([dw_node(), helper.make_node("Flatten", ["d"], ["y"])], dw_inits())
    assert gr.rewrite(model, "fuse", verify_result=False).decisions == []


def test_rewriting_twice_changes_nothing():
    model = model_with([dw_node()] + emulation_nodes(), emulation_inits())
    once = gr.rewrite(model, "auto", verify_result=False).model
    twice = gr.rewrite(once, "auto", verify_result=False)
    assert [d.action for d in twice.decisions] == ["kept"]
    assert twice.model.SerializeToString() == once.SerializeToString()
    again = gr.rewrite(model, "auto", verify_result=False).model
    assert again.SerializeToString() == once.SerializeToString()  # deterministic


def test_quantized_and_transposed_convs_are_reported_not_rewritten():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((C, C // G, 3, 3)).astype(np.float32)
    inits = {"w": w, "s": np.array(0.1, np.float32), "z": np.array(0, np.int8),
             "wq": (w * 10).astype(np.int8), "wt": rng.standard_normal((C, C // G, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wdq"]),
             helper.make_node("Conv", ["x", "wdq"], ["a"], name="qdq_conv", group=G, pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["a", "wt"], ["y"], name="deconv", group=G, pads=[1, 1, 1, 1])]
    model = model_with(nodes, inits)
    result = gr.rewrite(model, "expand", verify_result=False)
    codes = {d.node: (d.action, d.code) for d in result.decisions}
    assert codes == {"qdq_conv": ("skipped", "quantized"), "deconv": ("skipped", "transposed")}
    assert result.model.SerializeToString() == model.SerializeToString()


def test_grouped_conv_whose_output_is_a_graph_output_keeps_its_name():
    w = np.random.default_rng(0).standard_normal((C, C // G, 3, 3)).astype(np.float32)
    model = model_with([helper.make_node("Conv", ["x", "w"], ["y"], name="", group=G, pads=[1, 1, 1, 1]),
                        helper.make_node("Relu", ["y"], ["z"], name="")], {"w": w}, outputs=("y", "z"))
    result = gr.rewrite(model, "expand", verify_result=False)
    assert [d.action for d in result.decisions] == ["expanded"]
    assert [o.name for o in result.model.graph.output] == ["y", "z"]
    x = np.random.default_rng(3).standard_normal((1, C, H, H)).astype(np.float32)
    want, got = run_ort(model, {"x": x}), run_ort(result.model, {"x": x})
    for k in ("y", "z"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)


def test_custom_domain_ops_empty_and_duplicate_names_are_fine():
    w = np.random.default_rng(0).standard_normal((C, C // G, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="same", group=G, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w"], ["b"], name="same", group=G, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "w"], ["c"], name="", group=G, pads=[1, 1, 1, 1]),
             helper.make_node("Gelu", ["c"], ["y"], domain="com.microsoft")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, H, H])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(GconvError, match="onnxruntime cannot load the original model: .*same node name"):
        gr.rewrite(model, "expand", verify_result=True, provider="cpu", latency=False)
    result = gr.rewrite(model, "expand", verify_result=False)
    assert [d.action for d in result.decisions] == ["expanded"] * 3
    onnx.checker.check_model(result.model)
    names = [n.name for n in result.model.graph.node if n.name]
    assert len(names) == len(set(names)) + 1  # the two input nodes named "same" stay as they were
    back = gr.rewrite(result.model, "fuse", verify_result=False)
    assert op_counts(back.model) == op_counts(model)


def test_empty_graph_is_passed_through():
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    result = gr.rewrite(model, "auto", verify_result=True, provider="cpu")
    assert result.decisions == [] and result.verification is None
    assert result.model.SerializeToString() == model.SerializeToString()

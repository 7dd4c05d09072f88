"""Bugs found by review and fuzzing, each pinned by a test."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import gconv_rewrite as gr

from helpers import op_counts, run_ort

G, CIG, COG = 2, 2, 3
C = G * CIG


def build(tail, x_dims=("N", C, "H", "W"), opset=17, ir=8, extra_inputs=()):
    """x -> depthwise Conv (multiplier COG) -> `tail(y, const)` -> out."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((C * COG, 1, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=C, pads=[1, 1, 1, 1])]
    counter = iter(range(1000))

    def const(values):
        name = f"c{next(counter)}"
        inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def node(op, inputs, out=None, **attrs):
        out = out or f"t{next(counter)}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    tail(node, const)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_dims))] + list(extra_inputs)
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              inits)
    if ir < 4:
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


def emulation(node, const, last="out"):
    r = node("Reshape", ["y", const([0, G, CIG, COG, -1])])
    s = node("ReduceSum", [r, const([2])], keepdims=0)
    shape = node("Concat", [const([0, G * COG]), node("Slice", [node("Shape", ["y"]), const([2]), const([4])])], axis=0)
    return node("Reshape", [s, shape], last)


def decision(model, direction="fuse"):
    result = gr.rewrite(model, direction, verify_result=False)
    (d,) = result.decisions
    return d, result.model


def _same_at_sizes(model, out, sizes):
    for n, h, w in sizes:
        x = np.random.default_rng(n * h * w).standard_normal((n, C, h, w)).astype(np.float32)
        a, b = run_ort(model, {"x": x})["out"], run_ort(out, {"x": x})["out"]
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), (n, h, w)


def test_squeeze_without_axes_depends_on_the_batch_and_is_not_fused():
    # The Squeeze removes the batch dim only where it is 1: it stays, and the emulation before it is fused.
    model = build(lambda node, const: node("Squeeze", [emulation(node, const, None)], "out"))
    d, out = decision(model)
    assert d.action == "fused" and op_counts(out)["Squeeze"] == 1
    _same_at_sizes(model, out, [(1, 5, 5), (3, 6, 4)])


def test_slice_of_a_symbolic_spatial_axis_is_not_fused():
    model = build(lambda node, const: node("Slice", [emulation(node, const, None), const([0]), const([5]), const([2])],
                                           "out"))
    d, out = decision(model)
    assert d.action == "fused" and op_counts(out)["Slice"] == 1
    _same_at_sizes(model, out, [(1, 4, 4), (2, 9, 7)])


def test_flatten_with_a_negative_axis_is_traced_as_onnx_defines_it():
    # Flatten(-1) on [N, C*M, H, W] gives [N*C*M*H, W]; a Transpose and the emulation reshape after it
    # mix positions, so it must not be fused as a grouped conv.
    def tail(node, const):
        f = node("Flatten", ["y"], axis=-1)
        t = node("Transpose", [f], perm=[1, 0])
        r = node("Reshape", [t, const([2, G, CIG, COG, -1])])
        node("ReduceSum", [r, const([2])], "out", keepdims=0)
    d, _ = decision(build(tail, x_dims=(2, C, 5, 6)))
    assert d.action == "skipped"


def test_non_constant_bias_of_a_frozen_1x1_conv_is_refused():
    matrix = np.zeros((G * COG, C * COG, 1, 1), np.float32)
    for o in range(G * COG):
        g, m = divmod(o, COG)
        for i in range(CIG):
            matrix[o, (g * CIG + i) * COG + m] = 1

    def tail(node, const):
        bias = node("Cast", [node("Slice", [node("Shape", ["z"]), const([0]), const([G * COG])])], to=TensorProto.FLOAT)
        node("Conv", ["y", "m", bias], "out")
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["a", "b", "c", "d", "e", "f"])
    model = build(tail, x_dims=(2, C, 5, 5), extra_inputs=[z])
    model.graph.initializer.append(numpy_helper.from_array(matrix, "m"))
    d, _ = decision(model)
    assert d.action == "skipped" and d.code == "size_dependent"  # the bias is a size, cast to float


def test_dead_shape_reader_of_the_depthwise_output_is_removed_too():
    def tail(node, const):
        node("Shape", ["y"])  # read by nothing
        emulation(node, const)
    model = build(tail, x_dims=(2, C, 5, 5))
    d, out = decision(model)
    assert d.action == "fused" and "Shape" not in op_counts(out)
    x = np.random.default_rng(2).standard_normal((2, C, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})["out"], run_ort(model, {"x": x})["out"], rtol=1e-5, atol=1e-5)


def test_split_sizes_that_cannot_be_computed_are_a_skip_not_a_crash():
    def tail(node, const):
        sizes = node("Slice", [node("Shape", ["z"]), const([0]), const([2])])
        a = f"a{id(sizes)}"
        node("Identity", ["y"], "yy")
        node("Split", ["yy", sizes], a, axis=1)
        node("Add", [a, a], "out")
    z = helper.make_tensor_value_info("z", TensorProto.INT64, ["p", "q"])
    model = build(tail, x_dims=(2, C, 5, 5), extra_inputs=[z])
    result = gr.rewrite(model, "fuse", verify_result=False)
    assert all(d.action == "skipped" for d in result.decisions)


def native_ir3_model(opset):
    """A grouped Conv in IR 3 style: the weight is an initializer and also a graph input."""
    w = np.random.default_rng(0).standard_normal((G * COG, CIG, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["out"], group=G, pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 5, 5]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape))],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, G * COG, 5, 5])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=3)


def test_expand_before_opset_5_is_skipped_with_the_reason():
    d, out = decision(native_ir3_model(4), "expand")
    assert d.action == "skipped" and d.code == "opset_too_old"


def test_ir3_models_with_initializers_listed_as_inputs_are_rewritten_validly():
    model = native_ir3_model(8)
    d, out = decision(model, "expand")
    assert d.action == "expanded"
    onnx.checker.check_model(out)
    assert {i.name for i in out.graph.input} == {"x"} | {t.name for t in out.graph.initializer}
    x = np.random.default_rng(2).standard_normal((1, C, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})["out"], run_ort(model, {"x": x})["out"], rtol=1e-5, atol=1e-5)


def test_nan_and_inf_at_the_same_places_compare_equal():
    from gconv_rewrite.verify import _compare
    a = np.array([1.0, np.nan, np.inf, -np.inf, 2.0], np.float32)
    assert _compare("o", [a], [a.copy()], None).passed
    b = a.copy()
    b[2] = -np.inf
    assert not _compare("o", [a], [b], None).passed


def test_frozen_1x1_kernels_of_wide_stages_are_read_at_any_size():
    """A frozen 0/1 1x1 kernel of 128 x 4096 (ResNeXt-50's wide stages have millions of entries) was
    taken for a non-constant (the shape evaluator's size cap) and the region skipped."""
    from gconv_rewrite.samples import grouped_conv_model
    sample = grouped_conv_model("frozen_1x1", in_channels=128, groups=4, spatial=(4, 4), batch=1)
    frozen = next(t for t in sample.model.graph.initializer if np.prod(t.dims) > 1 << 16)
    assert np.prod(frozen.dims) == 128 * 128 * 32
    result = gr.rewrite(sample.model, "fuse", provider="cpu", latency=False)
    (d,) = result.decisions
    assert d.action == "fused", d.reason
    assert result.verification.passed
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]

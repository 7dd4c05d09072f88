"""Grouped convs written with other ops: the split form (slices -> G Convs -> Concat, in every layout
the exporters write), dense Convs with block-diagonal weights, grouped Convs whose groups split
further, and a depthwise Conv mixed by a 1x1 Conv. Each is recognised from what it computes, fused
(checked against onnxruntime), and each near-miss is refused with its reason."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import gconv_rewrite as gr
from gconv_rewrite.lowering import dense_weights

from helpers import max_rel_err, op_counts, run_ort

RNG = np.random.default_rng(7)


def _model(nodes, inits, x_shape, y_shape, opset=17, x="x", y="y"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, 1, x_shape)],
                              [helper.make_tensor_value_info(y, 1, y_shape)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _weights(group, cig, cog, k=3, bias=True):
    ws = [RNG.standard_normal((cog, cig, k, k)).astype(np.float32) for _ in range(group)]
    bs = [RNG.standard_normal(cog).astype(np.float32) for _ in range(group)] if bias else None
    return ws, bs


def split_model(group=4, cig=8, cog=8, how="split", order=None, bias=True, k=3, stride=1, hw=12,
                per_slice_group=1, concat_order=None):
    """x -> slices (Split / Slice / Gather) -> G Convs -> Concat. `order`: the slice each Conv reads;
    `concat_order`: the Conv each Concat input comes from."""
    c = group * cig
    order = list(range(group)) if order is None else order
    concat_order = list(range(group)) if concat_order is None else concat_order
    ws, bs = _weights(group, cig // per_slice_group, cog, k, bias)
    inits, nodes = {}, []
    parts = [f"s{g}" for g in range(group)]
    if how == "split":
        inits["sizes"] = np.array([cig] * group, np.int64)
        nodes.append(helper.make_node("Split", ["x", "sizes"], parts, axis=1))
    elif how in ("slice", "gather"):
        for g in range(group):
            if how == "slice":
                inits[f"st{g}"], inits[f"en{g}"] = np.array([g * cig], np.int64), np.array([(g + 1) * cig], np.int64)
                inits[f"ax{g}"] = np.array([1], np.int64)
                nodes.append(helper.make_node("Slice", ["x", f"st{g}", f"en{g}", f"ax{g}"], [parts[g]]))
            else:
                inits[f"ix{g}"] = np.arange(g * cig, (g + 1) * cig, dtype=np.int64)
                nodes.append(helper.make_node("Gather", ["x", f"ix{g}"], [parts[g]], axis=1))
    elif how == "nhwc":  # tf.split: Transpose -> Split on the last axis -> Transpose back per group
        inits["sizes"] = np.array([cig] * group, np.int64)
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1]))
        nodes.append(helper.make_node("Split", ["xt", "sizes"], [p + "t" for p in parts], axis=3))
        for p in parts:
            nodes.append(helper.make_node("Transpose", [p + "t"], [p], perm=[0, 3, 1, 2]))
    pad = (k - 1) // 2
    for i, g in enumerate(order):
        inputs = [parts[g], f"w{i}"] + ([f"b{i}"] if bias else [])
        inits[f"w{i}"] = ws[i]
        if bias:
            inits[f"b{i}"] = bs[i]
        nodes.append(helper.make_node("Conv", inputs, [f"c{i}"], name=f"conv{i}", pads=[pad] * 4,
                                      strides=[stride] * 2, group=per_slice_group))
    nodes.append(helper.make_node("Concat", [f"c{i}" for i in concat_order], ["y"], axis=1))
    out_hw = (hw + 2 * pad - k) // stride + 1
    return _model(nodes, inits, ["N", c, hw, hw], ["N", group * cog, out_hw, out_hw])


def _feed(model, batch=2):
    shape = [d.dim_value or batch for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {model.graph.input[0].name: RNG.standard_normal(shape).astype(np.float32)}


def _fused(model, form="native", **kw):
    result = gr.rewrite(model, form=form, verify_result=False, **kw)
    onnx.checker.check_model(result.model, full_check=True)
    feed = _feed(model)
    want, got = run_ort(model, feed), run_ort(result.model, feed)
    for name in want:
        assert max_rel_err(got[name], want[name]) < 2e-6, name
    return result


def _only(result):
    decisions = [d for d in result.decisions if d.action != "skipped"]
    assert len(decisions) == 1, [d.line() for d in result.decisions]
    return decisions[0]


@pytest.mark.parametrize("how", ["split", "slice", "gather", "nhwc"])
@pytest.mark.parametrize("bias", [True, False])
def test_split_forms_fuse_to_one_grouped_conv(how, bias):
    model = split_model(how=how, bias=bias)
    result = _fused(model)
    d = _only(result)
    assert (d.kind, d.was, d.action, d.form) == ("split", "split", "fused", "native")
    assert d.spec.group == 4 and d.spec.c_in == 32 and d.spec.c_out == 32
    counts = op_counts(result.model)
    assert counts["Conv"] == 1 and "Concat" not in counts and "Split" not in counts and "Slice" not in counts
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "group")) == 4


@pytest.mark.parametrize("group", [2, 3, 7, 13, 64])
def test_split_forms_of_any_group_count(group):
    model = split_model(group=group, cig=2, cog=3, how="split", hw=6)
    d = _only(_fused(model))
    assert d.spec.group == group and d.spec.cig == 2 and d.spec.cog == 3


def test_split_weights_are_copied_bit_for_bit_and_permutations_applied():
    """Convs reading the slices in another order and joined in another order: the fused Conv's
    weights are the originals, bit for bit; the orders are folded into Gathers (no Conv upstream)."""
    model = split_model(group=4, order=[2, 0, 3, 1], concat_order=[1, 0, 3, 2])
    result = _fused(model)
    d = _only(result)
    assert "permutation" in d.reason
    originals = {numpy_helper.to_array(t).tobytes() for t in model.graph.initializer if t.name.startswith("w")}
    fused = next(numpy_helper.to_array(t) for t in result.model.graph.initializer
                 if t.dims and len(t.dims) == 4)
    assert {fused[i * 8:(i + 1) * 8].tobytes() for i in range(4)} == originals


def test_split_with_grouped_convs_per_slice():
    model = split_model(group=4, cig=8, cog=8, per_slice_group=2)
    d = _only(_fused(model))
    assert d.spec.group == 8


def test_split_stride_2_and_other_forms():
    model = split_model(group=4, stride=2)
    for form in ("dw", "dense", "split"):
        result = gr.rewrite(model, form=form, verify_result=False)
        d = _only(result)
        assert d.form == form
        feed = _feed(model)
        assert max_rel_err(run_ort(result.model, feed)["y"], run_ort(model, feed)["y"]) < 2e-6
    kept = _only(gr.rewrite(model, form="split", verify_result=False))
    assert kept.action == "kept"


# -- near-misses --------------------------------------------------------------------------------

def _skip(model):
    skipped = [d for d in gr.rewrite(model, form="native", verify_result=False).decisions]
    assert len(skipped) == 1 and skipped[0].action == "skipped", [d.line() for d in skipped]
    return skipped[0]


def test_mixconv_kernels_differ():
    model = split_model(group=2)
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "w1"))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((w.shape[0], w.shape[1], 5, 5), np.float32), "w1"))
    conv = next(n for n in model.graph.node if n.name == "conv1")
    conv.attribute.remove(next(a for a in conv.attribute if a.name == "pads"))
    conv.attribute.append(helper.make_attribute("pads", [2] * 4))
    d = _skip(model)
    assert d.code == "unequal_convs" and "kernel" in d.reason and d.kind == "split"


def test_overlapping_missing_and_unequal_slices():
    def sliced(bounds):
        c = 16
        inits, nodes = {}, []
        for g, (a, b) in enumerate(bounds):
            inits[f"st{g}"], inits[f"en{g}"] = np.array([a], np.int64), np.array([b], np.int64)
            inits[f"ax{g}"] = np.array([1], np.int64)
            inits[f"w{g}"] = RNG.standard_normal((4, b - a, 3, 3)).astype(np.float32)
            nodes.append(helper.make_node("Slice", ["x", f"st{g}", f"en{g}", f"ax{g}"], [f"s{g}"]))
            nodes.append(helper.make_node("Conv", [f"s{g}", f"w{g}"], [f"c{g}"], name=f"conv{g}", pads=[1] * 4))
        nodes.append(helper.make_node("Concat", [f"c{g}" for g in range(len(bounds))], ["y"], axis=1))
        return _model(nodes, inits, ["N", c, 8, 8], ["N", 4 * len(bounds), 8, 8])

    overlapping = _skip(sliced([(0, 8), (4, 12)]))
    missing = _skip(sliced([(0, 4), (4, 8)]))  # channels 8..15 read by no Conv
    unequal = _skip(sliced([(0, 4), (4, 16)]))
    assert overlapping.code == missing.code == unequal.code == "not_a_single_conv"
    assert "overlap: channel 4 is read by Conv conv0 and Conv conv1" in overlapping.reason
    assert "channel 8 of 16 is read by no Conv" in missing.reason
    assert "unequal sizes" in unequal.reason


def test_per_group_output_used_elsewhere():
    model = split_model(group=2)
    model.graph.node.append(helper.make_node("Relu", ["c0"], ["side"]))
    model.graph.output.append(helper.make_tensor_value_info("side", 1, ["N", 8, 12, 12]))
    d = _skip(model)
    assert d.code == "no_single_exit" and "Relu" in d.reason


def test_non_constant_weight():
    model = split_model(group=2, bias=False)
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "w1"))
    model.graph.input.append(helper.make_tensor_value_info("w1", 1, [8, 8, 3, 3]))
    d = _skip(model)
    assert d.code == "weight_not_constant"


def test_concat_over_another_axis():
    model = split_model(group=2)
    concat = model.graph.node[-1]
    concat.attribute[0].i = 2
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 8
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 24
    d = _skip(model)
    assert d.code in ("not_a_channel_map", "not_a_channel_move") and "join" in d.reason


def test_inception_style_concat_of_whole_tensor_convs_is_not_a_candidate():
    """Convs that all read the whole tensor (SqueezeNet fire, Inception): not a split form, no noise."""
    inits = {"w0": RNG.standard_normal((4, 8, 1, 1)).astype(np.float32),
             "w1": RNG.standard_normal((4, 8, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"]), helper.make_node("Conv", ["x", "w1"], ["b"], pads=[1] * 4),
             helper.make_node("Concat", ["a", "b"], ["y"], axis=1)]
    model = _model(nodes, inits, [1, 8, 6, 6], [1, 8, 6, 6])
    assert gr.rewrite(model, verify_result=False).decisions == []


def test_slices_that_also_feed_other_nodes_stay():
    model = split_model(group=2, how="slice")
    model.graph.node.append(helper.make_node("Relu", ["s0"], ["side"]))
    model.graph.output.append(helper.make_tensor_value_info("side", 1, ["N", 8, 12, 12]))
    result = _fused(model)
    assert _only(result).action == "fused"
    assert op_counts(result.model)["Slice"] == 1  # the slice the Relu reads stays; the other is gone


# -- dense and finer grouped Convs ---------------------------------------------------------------

def _conv_model(weight, group=1, bias=None):
    inits = {"w": weight} | ({"b": bias} if bias is not None else {})
    node = helper.make_node("Conv", ["x", "w"] + (["b"] if bias is not None else []), ["y"], name="conv",
                            pads=[1] * 4, group=group)
    c_in, c_out = weight.shape[1] * group, weight.shape[0]
    return _model([node], inits, ["N", c_in, 10, 10], ["N", c_out, 10, 10])


@pytest.mark.parametrize("group", [2, 8, 32])
def test_dense_block_diagonal_is_a_grouped_conv(group):
    grouped = RNG.standard_normal((64, 64 // group, 3, 3)).astype(np.float32)
    model = _conv_model(dense_weights(grouped, group), bias=RNG.standard_normal(64).astype(np.float32))
    report = gr.inspect(model)
    (finding,) = report.findings
    assert finding.status == "dense" and finding.spec.group == group
    assert "dense Conv with block-diagonal weights: a grouped Conv" in finding.line()
    assert f"G={group} " in finding.line()
    result = _fused(model)
    d = _only(result)
    assert (d.kind, d.was, d.form, d.spec.group) == ("dense", "dense", "native", group)
    fused = next(numpy_helper.to_array(t) for t in result.model.graph.initializer if len(t.dims) == 4)
    assert fused.tobytes() == grouped.tobytes()  # bit for bit


def test_dense_up_to_permutations_and_one_nonzero_too_many():
    grouped = RNG.standard_normal((16, 4, 3, 3)).astype(np.float32)
    dense = dense_weights(grouped, 4)
    rows, cols = RNG.permutation(16), RNG.permutation(16)
    permuted = np.ascontiguousarray(dense[rows][:, cols])
    d = _only(_fused(_conv_model(permuted)))
    assert d.spec.group == 4 and "permutation" in d.reason
    spoiled = dense.copy()
    spoiled[0, 15, 1, 1] = 1e-30  # one tiny nonzero: exactly not block-diagonal any more
    assert gr.rewrite(_conv_model(spoiled), verify_result=False).decisions == []


def test_grouped_conv_with_finer_blocks_gets_more_groups():
    inner = RNG.standard_normal((32, 2, 3, 3)).astype(np.float32)  # G=16 ...
    weight = np.concatenate([dense_weights(inner[g * 8:(g + 1) * 8], 4) for g in range(4)])  # ... written as G=4
    d = _only(_fused(_conv_model(weight, group=4)))
    assert (d.kind, d.was, d.action, d.spec.group) == ("grouped_conv", "native", "fused", 16)


# -- a depthwise Conv mixed by a 1x1 Conv (a BatchNormalization folded into the frozen 1x1) -------------

def test_depthwise_mixed_by_scaled_selector_1x1():
    group, cig, cog = 4, 4, 4
    c = group * cig
    dw = RNG.standard_normal((c * cog, 1, 3, 3)).astype(np.float32)
    select = np.zeros((group * cog, c * cog, 1, 1), np.float32)
    for g in range(group):
        for m in range(cog):
            for i in range(cig):
                select[g * cog + m, (g * cig + i) * cog + m] = 1.0
    scale = RNG.uniform(0.5, 1.5, group * cog).astype(np.float32)
    mixed = select * scale[:, None, None, None]
    inits = {"dw": dw, "mix": mixed, "mb": RNG.standard_normal(group * cog).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "dw"], ["d"], name="dwconv", group=c, pads=[1] * 4),
             helper.make_node("Conv", ["d", "mix", "mb"], ["y"], name="mix")]
    model = _model(nodes, inits, ["N", c, 8, 8], ["N", group * cog, 8, 8])
    result = _fused(model)
    d = _only(result)
    assert (d.kind, d.was, d.action, d.spec.group) == ("emulation", "dw", "fused", group)
    assert op_counts(result.model) == {"Conv": 1}
    # a 0/1 selector is the classic frozen 1x1: still the emulation path
    plain = _model(nodes, {**inits, "mix": select}, ["N", c, 8, 8], ["N", group * cog, 8, 8])
    assert _only(_fused(plain)).spec.group == group


def test_a_concat_that_also_joins_other_tensors_keeps_them():
    """Fuse what can be fused: the Convs' outputs become one input of the Concat, the others stay."""
    model = split_model(group=4, bias=True)
    concat = model.graph.node[-1]
    concat.input.insert(0, "x")  # the block's input joined in front (DenseNet-style), and its Relu behind
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["r"]))
    concat.input.append("r")
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 32 + 32 + 32
    result = _fused(model)
    d = _only(result)
    assert (d.kind, d.action, d.spec.group) == ("split", "fused", 4) and "inputs 1..4 of 6" in d.computes
    (joined,) = [n for n in result.model.graph.node if n.op_type == "Concat"]
    assert len(joined.input) == 3 and joined.input[0] == "x" and joined.input[2] == "r"
    assert op_counts(result.model)["Conv"] == 1


def test_split_joined_channels_last_in_another_order():
    """Keras' layout: each Conv's output to NHWC, concatenated on the last axis, in another order."""
    model = split_model(group=4, how="nhwc")
    nodes = [n for n in model.graph.node if n.op_type != "Concat"]
    nodes += [helper.make_node("Transpose", [f"c{i}"], [f"t{i}"], perm=[0, 2, 3, 1]) for i in range(4)]
    nodes.append(helper.make_node("Concat", [f"t{i}" for i in (2, 0, 1, 3)], ["y"], axis=3))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[1].dim_value, dims[3].dim_value = 12, 32
    result = _fused(model)
    d = _only(result)
    assert d.spec.group == 4 and "permutation" in d.computes
    assert op_counts(result.model) == {"Gather": 1, "Conv": 1, "Transpose": 1}


def test_densenet_style_concat_with_convs_of_other_tensors():
    """The Concat also joins a Conv of the whole input and a Conv of another tensor: the split form's
    Convs are fused, the other two stay inputs of the Concat."""
    model = split_model(group=2, cig=4, cog=4, bias=False)
    concat = model.graph.node[-1]
    extra = {"wz": RNG.standard_normal((4, 8, 3, 3)).astype(np.float32),
             "wr": RNG.standard_normal((4, 8, 1, 1)).astype(np.float32)}
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in extra.items())
    nodes = [helper.make_node("Conv", ["x", "wz"], ["whole"], name="whole", pads=[1] * 4),
             helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Conv", ["r", "wr"], ["other"], name="other")]
    for n in reversed(nodes):
        model.graph.node.insert(0, n)
    concat.input.extend(["whole", "other"])
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 16
    d = _only(_fused(model))
    assert (d.kind, d.spec.group) == ("split", 2) and "inputs 0..1 of 4" in d.computes


def test_an_op_after_the_concat_that_sums_channels_leaves_the_concat_fused():
    model = split_model(group=2, cig=4, cog=4)
    concat = model.graph.node[-1]
    concat.output[0] = "joined"
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    model.graph.node.append(helper.make_node("ReduceSum", ["joined", "axes"], ["y"], keepdims=1))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    result = _fused(model)
    assert _only(result).spec.group == 2 and op_counts(result.model)["ReduceSum"] == 1


def test_float16_kernels_that_would_overflow_are_refused():
    """Add(concat, concat) doubles every kernel: 60000 fits float16, 120000 does not."""
    model = split_model(group=2, cig=4, cog=4, bias=False)
    for t in model.graph.initializer:
        if t.name.startswith("w"):
            t.CopyFrom(numpy_helper.from_array(np.full((4, 4, 3, 3), 6e4, np.float16), t.name))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    concat = model.graph.node[-1]
    concat.output[0] = "joined"
    model.graph.node.append(helper.make_node("Add", ["joined", "joined"], ["y"]))
    d = _skip(model)
    assert d.code == "overflow" and "float16" in d.reason


def test_a_bias_that_is_not_constant_says_so():
    model = split_model(group=2)
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "b1"))
    model.graph.input.append(helper.make_tensor_value_info("b1", 1, [8]))
    assert _skip(model).code == "bias_not_constant"


@pytest.mark.parametrize("opset", [11, 17])
def test_a_split_of_a_fused_emulations_output_does_not_reach_into_it(opset):
    """Depthwise Conv -> channel shuffle (an emulation region, fused) -> Split -> 2 Convs -> Concat: the
    split form reads the region's exit, never a tensor inside it that the other fusion removes (found by
    benchmarks/fuzz_composites.py: the rewritten model read a tensor nothing produced)."""
    inits = {"dw": RNG.standard_normal((8, 1, 3, 3)).astype(np.float32),
             "w0": RNG.standard_normal((3, 4, 1, 1)).astype(np.float32),
             "w1": RNG.standard_normal((3, 4, 1, 1)).astype(np.float32),
             "r1": np.array([2, 2, 4, 49], np.int64), "sz": np.array([4, 4], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "dw"], ["d"], group=8, pads=[1] * 4),
             helper.make_node("Shape", ["d"], ["dsh"]), helper.make_node("Reshape", ["d", "r1"], ["d1"]),
             helper.make_node("Transpose", ["d1"], ["d2"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["d2", "dsh"], ["m"]),
             helper.make_node("Split", ["m", "sz"] if opset >= 13 else ["m"], ["a", "b"], axis=1,
                              **({} if opset >= 13 else {"split": [4, 4]})),
             helper.make_node("Conv", ["a", "w0"], ["c0"]), helper.make_node("Conv", ["b", "w1"], ["c1"]),
             helper.make_node("Concat", ["c0", "c1"], ["y"], axis=1)]
    if opset < 13:
        del inits["sz"]
    model = _model(nodes, inits, [2, 8, 7, 7], [2, 6, 7, 7], opset=opset)
    result = _fused(model)  # a valid model that computes the same, whatever was fused
    assert any(d.action == "fused" for d in result.decisions)

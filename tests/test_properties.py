"""Property tests over random Conv geometries, dtypes and layouts: onnxruntime's outputs of the
original and the rewritten model agree, relative to the output's magnitude, in both directions."""

import os

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gconv_rewrite as gr
from gconv_rewrite.samples import EQUIVALENT_LAYOUTS, grouped_conv_model

from helpers import canonical, max_rel_err, op_counts, run_ort

TOLERANCE = {np.float32: 1e-5, np.float16: 1e-2}
# GCONV_EXAMPLES=2000 for a long run; CI runs the default.
SETTINGS = settings(max_examples=int(os.environ.get("GCONV_EXAMPLES", 60)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def geometries(draw, native=False):
    rank = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.integers(2, 4))
    cig = draw(st.integers(2 if native else 1, 3))
    cog = draw(st.integers(1, 3))
    if not native and cig == 1 and cog == 1:
        cog = 2
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    # onnxruntime has no dilated Conv with SAME auto_pad
    dilations = tuple(draw(st.integers(1, 1 if auto_pad.startswith("SAME") else 2)) for _ in range(rank))
    size_max = 6 if rank == 3 else 9
    spatial = tuple(draw(st.integers(max((k - 1) * d + 1, 3), size_max)) for k, d in zip(kernel, dilations))
    pads = None
    if auto_pad == "NOTSET":
        pads = tuple(draw(st.integers(0, 2)) for _ in range(2 * rank))
    return dict(in_channels=groups * cig, out_channels=groups * cog, groups=groups, spatial=spatial,
                kernel_shape=kernel, strides=strides, dilations=dilations, pads=pads, auto_pad=auto_pad,
                bias=draw(st.booleans()), dtype=draw(st.sampled_from([np.float32, np.float32, np.float16])),
                weights=draw(st.sampled_from(["initializer", "constant"])),
                dynamic_spatial=draw(st.booleans()), opset=draw(st.sampled_from([11, 13, 17])),
                seed=draw(st.integers(0, 1000)))


def random_input(sample, geometry, batch=2):
    shape = (batch, geometry["in_channels"]) + tuple(geometry["spatial"])
    return {sample.input_name: np.random.default_rng(0).standard_normal(shape).astype(geometry["dtype"])}


def assert_same_outputs(a, b, feed, dtype):
    out_a, out_b = run_ort(a, feed), run_ort(b, feed)
    assert out_a.keys() == out_b.keys()
    for name in out_a:
        assert out_a[name].shape == out_b[name].shape and out_a[name].dtype == out_b[name].dtype
        assert max_rel_err(out_b[name], out_a[name]) < TOLERANCE[dtype], name


@SETTINGS
@given(geometries(native=True))
def test_expand_then_fuse(geometry):
    sample = grouped_conv_model("native", **geometry)
    expanded = gr.rewrite(sample.model, "expand", verify_result=False)
    assert [d.action for d in expanded.decisions] == ["expanded"]
    onnx.checker.check_model(expanded.model, full_check=True)
    assert expanded.model.ir_version == sample.model.ir_version
    assert list(expanded.model.opset_import) == list(sample.model.opset_import)
    feed = random_input(sample, geometry)
    assert_same_outputs(sample.model, expanded.model, feed, geometry["dtype"])
    fused = gr.rewrite(expanded.model, "fuse", verify_result=False)
    assert [d.action for d in fused.decisions] == ["fused"]
    assert op_counts(fused.model) == op_counts(sample.model) or geometry["weights"] == "constant"
    conv = next(n for n in fused.model.graph.node if n.op_type == "Conv")
    w_name = conv.input[1]
    w = onnx.numpy_helper.to_array(next(t for t in fused.model.graph.initializer if t.name == w_name))
    assert w.tobytes() == sample.weight.tobytes()  # bit-identical round trip
    assert_same_outputs(sample.model, fused.model, feed, geometry["dtype"])


@SETTINGS
@given(geometries(), st.sampled_from([lay for lay in EQUIVALENT_LAYOUTS if lay != "native"]), st.booleans())
def test_fuse_every_layout(geometry, layout, pad_node):
    if layout == "interleaved" and geometry["in_channels"] == geometry["groups"]:
        return  # Cig = 1: interleaving is the identity
    sample = grouped_conv_model(layout, pad_node=pad_node and geometry["auto_pad"] == "NOTSET", **geometry)
    result = gr.rewrite(sample.model, "fuse", verify_result=False)
    cig = geometry["in_channels"] // geometry["groups"]
    if cig == 1 and layout in ("frozen_1x1", "split_slices", "split_nhwc", "dense"):
        # G = C_in: a depthwise Conv and a 1x1 Conv that only permutes, or C_in one-channel Convs
        assert [d.action for d in result.decisions] == ["fused"], [d.line() for d in result.decisions]
        assert result.decisions[0].form == "depthwise" and op_counts(result.model)["Conv"] == 1
        assert_same_outputs(sample.model, result.model, random_input(sample, geometry), geometry["dtype"])
        return
    if cig == 1:  # G = C_in: the "emulation" sums nothing and is the depthwise Conv itself
        assert [d.action for d in result.decisions] == ["skipped"], [d.line() for d in result.decisions]
        assert result.decisions[0].code == "nothing_summed"
        return
    assert [d.action for d in result.decisions] == ["fused"], [d.line() for d in result.decisions]
    assert f"grouped Conv G={geometry['groups']}" in result.decisions[0].computes
    onnx.checker.check_model(result.model, full_check=True)
    assert not {"ReduceSum", "Squeeze", "Reshape"} & set(op_counts(result.model))
    feed = random_input(sample, geometry)
    assert_same_outputs(sample.reference_model(), result.model, feed, geometry["dtype"])
    assert_same_outputs(sample.model, result.model, feed, geometry["dtype"])


@SETTINGS
@given(geometries(native=True))
def test_wrong_emulation_becomes_the_depthwise_conv_it_is(geometry):
    if geometry["out_channels"] == geometry["groups"]:
        return  # Cog = 1: nothing is summed over the multiplier axis
    sample = grouped_conv_model("wrong_sum_multiplier", **geometry)
    result = gr.rewrite(sample.model, "fuse", verify_result=False)
    (decision,) = result.decisions
    assert decision.action == "fused" and "NOT a grouped conv" in decision.computes
    assert_same_outputs(sample.model, result.model, random_input(sample, geometry), geometry["dtype"])


def test_float64_is_kept_and_checked():
    sample = grouped_conv_model("native", in_channels=6, groups=3, dtype=np.float64)
    expanded = gr.rewrite(sample.model, "expand", verify_result=False)
    onnx.checker.check_model(expanded.model, full_check=True)
    back = gr.rewrite(expanded.model, "fuse", verify_result=False)
    w = [onnx.numpy_helper.to_array(t) for t in back.model.graph.initializer if t.dims and len(t.dims) == 4]
    assert len(w) == 1 and w[0].dtype == np.float64 and w[0].tobytes() == sample.weight.tobytes()


@SETTINGS
@given(geometries(native=True), st.sampled_from(["native", "nhwc_tf2onnx", "interleaved"]),
       st.sampled_from(["native", "dw", "split", "dense"]))
def test_every_form_from_every_source(geometry, layout, form):
    """Forced forms (for experiments and the cost model): each computes the same function."""
    sample = grouped_conv_model(layout, **geometry)
    result = gr.rewrite(sample.model, form=form, verify_result=False)
    (d,) = result.decisions
    expected = "kept" if (layout == "native" and form == "native") else (
        "fused" if form == "native" else "expanded" if (form == "dw" and layout == "native") else "converted")
    assert d.action == expected, d.line()
    onnx.checker.check_model(result.model, full_check=True)
    ops = op_counts(result.model)
    if form == "split":
        assert ops["Split"] == 1 and ops["Concat"] == 1 and ops["Conv"] == geometry["groups"]
    if form == "dense":
        conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
        assert all(a.i == 1 for a in conv.attribute if a.name == "group")
    feed = random_input(sample, geometry)
    assert_same_outputs(sample.model, result.model, feed, geometry["dtype"])


FORMS = ("native", "dw", "split", "dense")


@SETTINGS
@given(geometries(native=True), st.sampled_from(FORMS), st.sampled_from(FORMS))
def test_any_form_in_any_form_out_and_auto_the_same(geometry, first, then):
    """A grouped conv written in form `first` comes out in form `then` when forced, computing the same;
    and `auto` makes the same model of it (ops, bit-identical weights) as of the native original."""
    sample = grouped_conv_model("native", **geometry)
    written = gr.rewrite(sample.model, form=first, verify_result=False)
    assert {d.form for d in written.decisions} == {first}, [d.line() for d in written.decisions]
    out = gr.rewrite(written.model, form=then, verify_result=False)
    assert {d.form for d in out.decisions} == {then}, [d.line() for d in out.decisions]
    onnx.checker.check_model(out.model, full_check=True)
    assert_same_outputs(sample.model, out.model, random_input(sample, geometry), geometry["dtype"])
    auto_native = gr.rewrite(sample.model, verify_result=False)
    auto_written = gr.rewrite(written.model, verify_result=False)
    assert canonical(auto_written.model) == canonical(auto_native.model)

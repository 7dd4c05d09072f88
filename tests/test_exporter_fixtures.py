"""Models produced by the real exporters (tf2onnx, keras-applications, torch.onnx): each emulation
layout is recognised, fused to what it really computes, and the fused model reproduces the
framework's own outputs (saved beside each fixture) on onnxruntime."""

import numpy as np
import onnx
import pytest

import gconv_rewrite as gr

from helpers import FIXTURES, MODELS, canonical, max_rel_err, op_counts, run_ort

# fixture -> (what the fused region computes, substring of the decision's text)
EMULATIONS = {
    "tf_reshape_reducesum": "grouped Conv G=8 (Cig=4, Cog=8)",
    "tf_reshape_reducesum_dynshape": "grouped Conv G=8 (Cig=4, Cog=8)",
    "tf_stride2_pad": "grouped Conv G=4 (Cig=8, Cog=8)",
    "tf_stride2_same": "grouped Conv G=4 (Cig=8, Cog=8)",
    "keras_app_block3_sum_slices": "grouped Conv G=8 (Cig=4, Cog=4)",
    "keras215_block3_dynamic": "grouped Conv G=8 (Cig=4, Cog=4)",
    "keras_block3_frozen_1x1": "grouped Conv G=8 (Cig=4, Cog=4)",
    "tf_interleaved_cig_c": "grouped Conv G=4 (Cig=8, Cog=4) up to an input-channel permutation",
    "tf_wrong_sum_multiplier": "depthwise Conv (Cout=32, multiplier 1) with kernels summed 4 at a time: "
                               "NOT a grouped conv",
    "torch_dw_reshape_sum": "grouped Conv G=8 (Cig=4, Cog=8)",
    "torch_dw_reshape_sum_stride2": "grouped Conv G=4 (Cig=8, Cog=8)",
    "torch_dynamo_dw_reshape_sum": "grouped Conv G=8 (Cig=4, Cog=8)",
}
NATIVE = ["torch_native_grouped", "torch_native_grouped_stride2", "torch_native_grouped_shared_bias",
          "torch_conv1d_grouped", "torch_conv3d_grouped", "torch_dynamo_native_grouped"]
TOLERANCE = 2e-6  # relative to the output's magnitude; float32 reordering noise is ~1e-7 here


def load_fixture(name):
    data = np.load(FIXTURES / f"{name}.npz")
    model = onnx.load(FIXTURES / f"{name}.onnx")
    inputs = {i.name: data[i.name] for i in model.graph.input if i.name in data}
    outputs = {o.name: data[o.name] for o in model.graph.output}
    return model, inputs, outputs


def assert_matches_framework(model, inputs, expected):
    got = run_ort(model, inputs)
    for name, want in expected.items():
        assert max_rel_err(got[name], want) < TOLERANCE, name


@pytest.mark.parametrize("name", sorted(EMULATIONS))
def test_emulation_is_fused_and_matches_the_framework(name):
    model, inputs, expected = load_fixture(name)
    result = gr.rewrite(model, "fuse", verify_result=False)
    fused = [d for d in result.decisions if d.action == "fused"]
    assert len(fused) == 1, [d.line() for d in result.decisions]
    assert EMULATIONS[name] in fused[0].computes
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == model.ir_version and list(out.opset_import) == list(model.opset_import)
    counts = op_counts(out)
    assert not {"ReduceSum", "Squeeze"} & set(counts), counts
    assert_matches_framework(out, inputs, expected)


@pytest.mark.parametrize("name", sorted(EMULATIONS))
def test_auto_fuses_emulations(name):
    model, _, _ = load_fixture(name)
    result = gr.rewrite(model, "auto", verify_result=False)
    assert [d.action for d in result.decisions] == ["fused"]


@pytest.mark.parametrize("name", NATIVE)
def test_native_expand_matches_framework_and_fuses_back_bit_for_bit(name):
    model, inputs, expected = load_fixture(name)
    expanded = gr.rewrite(model, "expand", verify_result=False)
    assert [d.action for d in expanded.decisions] == ["expanded"]
    onnx.checker.check_model(expanded.model, full_check=True)
    assert op_counts(expanded.model)["ReduceSum"] == 1
    assert_matches_framework(expanded.model, inputs, expected)
    back = gr.rewrite(expanded.model, "fuse", verify_result=False)
    assert [d.action for d in back.decisions] == ["fused"]
    # torch feeds a deduplicated bias through an Identity: once the grouped conv holds its own copy,
    # the Identity is dead and goes, and that bias exists twice (shared, and the fused conv's)
    no_identity = lambda m: {op: n for op, n in op_counts(m).items() if op != "Identity"}  # noqa: E731
    assert no_identity(back.model) == no_identity(model)
    weights = lambda m: sorted(onnx.numpy_helper.to_array(t).tobytes() for t in m.graph.initializer)  # noqa: E731
    if "Identity" in op_counts(model):
        assert set(weights(back.model)) == set(weights(model))
    else:
        assert weights(back.model) == weights(model)
    assert_matches_framework(back.model, inputs, expected)


@pytest.mark.parametrize("name", NATIVE)
def test_auto_and_fuse_keep_native_grouped_convs(name):
    model, _, _ = load_fixture(name)
    for direction in ("auto", "fuse"):
        result = gr.rewrite(model, direction, verify_result=False)
        assert [d.action for d in result.decisions] == ["kept"]
        assert result.model.SerializeToString() == model.SerializeToString()


def test_plain_depthwise_model_is_left_alone():
    model, _, _ = load_fixture("tf_plain_depthwise")
    result = gr.rewrite(model, "auto", verify_result=False)
    assert result.decisions == []
    assert result.model.SerializeToString() == model.SerializeToString()


def test_interleaved_permutation_is_folded_into_the_producer():
    model, inputs, expected = load_fixture("tf_interleaved_cig_c")
    result = gr.rewrite(model, "fuse", verify_result=False)
    assert "folded into the producing Conv" in result.decisions[0].reason
    assert "Gather" not in op_counts(result.model)
    assert_matches_framework(result.model, inputs, expected)


def test_tf2onnx_shape_consumers_of_the_conv_output_are_removed():
    model, _, _ = load_fixture("tf_reshape_reducesum_dynshape")
    assert op_counts(model)["Shape"] >= 1
    out = gr.rewrite(model, "fuse", verify_result=False).model
    assert op_counts(out)["Shape"] == 0


# -- the split form, as the exporters write it ------------------------------------------------------

SPLITS = {
    "keras_lambda_split_block": "grouped Conv G=8 (Cig=4, Cog=4)",
    "keras_lambda_split_block_s2": "grouped Conv G=8 (Cig=4, Cog=4)",
    "tf_split_concat": "grouped Conv G=4 (Cig=8, Cog=8)",
    "torch_chunk_cat": "grouped Conv G=8 (Cig=4, Cog=4)",
    "torch_dynamo_chunk_cat": "grouped Conv G=8 (Cig=4, Cog=4)",
    "torch_split_odd_groups": "grouped Conv G=3 (Cig=8, Cog=8)",
}


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_split_form_is_fused_and_matches_the_framework(name):
    model, inputs, expected = load_fixture(name)
    result = gr.rewrite(model, "fuse", verify_result=False)
    fused = [d for d in result.decisions if d.action == "fused"]
    assert len(fused) == 1 and len(result.decisions) == 1, [d.line() for d in result.decisions]
    assert (fused[0].kind, fused[0].was) == ("split", "split")
    assert SPLITS[name] in fused[0].computes
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == model.ir_version and list(out.opset_import) == list(model.opset_import)
    counts = op_counts(out)
    assert not {"Split", "Slice", "Concat", "Shape"} & set(counts), counts  # torch's Shape->Slice bounds go too
    assert counts["Conv"] == op_counts(model)["Conv"] - int(SPLITS[name].split("G=")[1].split()[0]) + 1
    assert_matches_framework(out, inputs, expected)


def test_mixconv_kernels_are_a_near_miss_with_the_reason():
    model, _, _ = load_fixture("torch_chunk_cat_mixed_kernels")
    (decision,) = gr.rewrite(model, "fuse", verify_result=False).decisions
    assert (decision.kind, decision.action, decision.code) == ("split", "skipped", "unequal_convs")
    assert "kernel (3, 3)" in decision.reason and "(5, 5)" in decision.reason


# -- closure: whatever form a model arrives in, auto makes the same model of it ---------------------------

CLOSED = sorted(set(EMULATIONS) - {"tf_wrong_sum_multiplier"}) + NATIVE + sorted(SPLITS) + [
    f"models/{p.stem}" for p in sorted(MODELS.glob("*.onnx")) if p.stem != "resnext_wrong_emulation"]


def _closure_case(name):
    """A fixture with the framework's outputs, or a bundled sample with its own onnxruntime outputs."""
    if not name.startswith("models/"):
        return load_fixture(name)
    model = onnx.load(MODELS / f"{name[len('models/'):]}.onnx")
    rng = np.random.default_rng(0)
    inputs = {i.name: rng.standard_normal([d.dim_value or 2 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
              for i in model.graph.input}
    return model, inputs, run_ort(model, inputs)


@pytest.mark.parametrize("name", CLOSED)
def test_every_form_in_gives_the_same_auto_model_out(name):
    model, inputs, expected = _closure_case(name)
    auto = gr.rewrite(model, "auto", verify_result=False)
    want = canonical(auto.model)
    for form in ("native", "dw", "split", "dense"):
        written = gr.rewrite(model, form=form, verify_result=False)
        assert {d.form for d in written.decisions} == {form}, [d.line() for d in written.decisions]
        assert_matches_framework(written.model, inputs, expected)
        again = gr.rewrite(written.model, "auto", verify_result=False)
        assert canonical(again.model) == want, form
        for other in ("native", "dw", "split", "dense"):  # form Y in, form X out
            if other != form:
                converted = gr.rewrite(written.model, form=other, verify_result=False)
                assert {d.form for d in converted.decisions} == {other}, (form, other)

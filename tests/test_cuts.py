"""Where a region ends: the exit tensor the channel map names, shallower cuts when the deepest is
not a conv, and a rewritten model that does not load is the tool's failure (issue 13 items 4, 5a)."""

import importlib

import pytest
from onnx import TensorProto, helper
from test_sizes import COG, Builder, C, G, fuse, same_wherever_the_original_runs

import gconv_rewrite as gr
from gconv_rewrite.errors import InternalError

from helpers import op_counts

surgery_module = importlib.import_module("gconv_rewrite.surgery")

STATIC = (2, C, 5, 5)


def _model(b: Builder, extra_nodes, out_name):
    for n in extra_nodes:
        b.nodes.append(n)
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(b.x_dims))],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)], ir_version=8)


def split_after_emulation(sizes=(2, 0)):
    """The emulation, then a Split whose first output only feeds a dead Shape."""
    b = Builder(x_dims=STATIC)
    e = b.emulation()
    nodes = [helper.make_node("Split", [e, b.const(list(sizes))], ["sa", "sb"], axis=0),
             helper.make_node("Shape", ["sa"], ["dead"]),
             helper.make_node("Relu", ["sb"], ["out"])]
    return _model(b, nodes, "out")


@pytest.mark.parametrize("sizes", [(2, 0), (0, 2), (1, 1)])
def test_a_region_ending_in_a_split_is_wired_by_its_exit_tensor(sizes):
    model = split_after_emulation(sizes)
    result = gr.rewrite(model, "fuse", provider="cpu", latency=False)
    (d,) = result.decisions
    assert d.action == "fused" and result.verification.passed
    assert same_wherever_the_original_runs(model, result.model, [STATIC[:1] + STATIC[2:]]) == 1


def test_an_emulation_followed_by_a_channel_slice_is_fused_before_the_slice():
    b = Builder(x_dims=STATIC)
    model = b.model(b.slice(b.emulation(), [1], [G * COG - 2], [1]))  # 2 channels of group 0, 1 of group 1
    d, out = fuse(model)
    assert d.action == "fused", d.reason
    assert op_counts(out)["Slice"] == 1 and op_counts(out)["ReduceSum"] == 0
    assert same_wherever_the_original_runs(model, out, [(2, 5, 5)]) == 1


def test_a_rewritten_model_that_does_not_load_is_an_internal_error(monkeypatch):
    # A bug injected into the graph surgery: the fused Conv writes a tensor nobody reads.
    real = surgery_module.emit

    def broken(form, opset, out_shape, x, weight, bias, group, template, out, base, names):
        return real(form, opset, out_shape, x, weight, bias, group, template, out + "_lost", base, names)
    monkeypatch.setattr(surgery_module, "emit", broken)
    b = Builder(x_dims=STATIC)
    model = b.model(b.emulation())
    for verify_result in (True, False):
        with pytest.raises(InternalError, match="invalid model"):
            gr.rewrite(model, "fuse", provider="cpu", latency=False, verify_result=verify_result)


def test_a_rewritten_model_onnxruntime_cannot_run_is_an_internal_error(monkeypatch):
    from gconv_rewrite import api
    monkeypatch.setattr(api, "_check_rewritten", lambda model: None)  # let the broken model reach onnxruntime
    real = surgery_module.emit

    def broken(form, opset, out_shape, x, weight, bias, group, template, out, base, names):
        return real(form, opset, out_shape, x, weight, bias, group, template, out + "_lost", base, names)
    monkeypatch.setattr(surgery_module, "emit", broken)
    b = Builder(x_dims=STATIC)
    with pytest.raises(InternalError, match="cannot run"):
        gr.rewrite(b.model(b.emulation()), "fuse", provider="cpu", latency=False)


def test_verify_of_two_user_models_still_blames_the_input(tmp_path):
    from gconv_rewrite.errors import GconvError
    b = Builder(x_dims=STATIC)
    good = b.model(b.emulation())
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["missing"], ["out"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(STATIC))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(GconvError) as info:
        gr.verify(good, bad, provider="cpu", latency=False)
    assert not isinstance(info.value, InternalError) and info.value.exit_code == 2


def test_verification_samples_two_sizes_per_symbolic_dim_and_says_which():
    b = Builder()
    model = b.model(b.emulation())
    result = gr.rewrite(model, "fuse", provider="cpu", latency=False, input_shapes={"x": (2, C, 6, 7)})
    notes = " ".join(result.verification.notes)
    assert result.verification.samples == 3
    assert "(N=2, H=6, W=7); (N=1, H=6, W=7); (N=3, H=41, W=41)" in notes, notes


def test_a_size_the_original_does_not_run_at_is_dropped_with_a_note():
    b = Builder(x_dims=("N", C, 5, 5))
    model = b.model(b.node("Reshape", [b.emulation(), b.const([2, G * COG * 25])]))  # runs at batch 2 only
    result = gr.rewrite(model, "fuse", provider="cpu", latency=False)
    assert result.count("fused") == 1 and op_counts(result.model)["Reshape"] == 1
    assert result.verification.passed and result.verification.samples == 1
    assert any("the original itself does not run at N=1" in n for n in result.verification.notes)


def test_an_infinite_tolerance_is_refused():
    from gconv_rewrite.errors import GconvError
    b = Builder(x_dims=STATIC)
    with pytest.raises(GconvError, match="finite"):
        gr.rewrite(b.model(b.emulation()), "fuse", provider="cpu", tolerance=float("inf"))


def test_skip_codes_are_documented_and_reach_the_json_reports():
    import re
    from pathlib import Path

    from gconv_rewrite.analysis import SKIP_CODES
    docs = (Path(__file__).resolve().parent.parent / "docs" / "reports.md").read_text()
    table = docs.split("**Skip codes**")[1].split("\n\n")[1]
    documented = {c for row in table.splitlines()[2:] for c in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert documented == SKIP_CODES
    b = Builder()
    model = b.model(b.emulation(b.slice("y", [0], [2], [0])))
    report = gr.rewrite(model, "fuse", verify_result=False).to_dict()
    assert report["decisions"][0]["code"] == "size_dependent"
    assert gr.inspect(model, provider="cpu").to_dict()["findings"][0]["code"] == "size_dependent"


def test_a_dead_shape_chain_reading_a_fused_tensor_goes_with_it():
    # Found by the generated-model fuzzer: Shape(y) -> Slice whose result nothing reads.
    b = Builder(x_dims=STATIC)
    b.slice(b.node("Shape", ["y"]), [2], [3], [0])
    model = b.model(b.emulation())
    result = gr.rewrite(model, "fuse", provider="cpu", latency=False)
    assert result.count("fused") == 1 and result.verification.passed
    assert op_counts(result.model)["Shape"] == 0


def test_a_valid_model_onnxruntime_cannot_run_is_not_called_bad(tmp_path):
    import numpy as np
    from onnx import numpy_helper

    from gconv_rewrite.errors import GconvError
    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float64), "w")  # no float64 Conv kernel on CPU
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], group=2)], "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)], [w]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(GconvError, match="valid ONNX, which this onnxruntime cannot run.*--no-verify"):
        gr.rewrite(model, "expand", provider="cpu", latency=False)
    assert gr.rewrite(model, "expand", verify_result=False).count("expanded") == 1
    with pytest.raises(GconvError, match="seed must be a non-negative integer"):
        gr.rewrite(model, "expand", provider="cpu", seed=-1)

"""The verifier itself: strict enough to catch one wrong weight in a ResNeXt-50, loose enough for
float32 reordering noise; a timing harness whose A-vs-A ratio is 1 within its own noise."""

import numpy as np
import onnx
import pytest

import gconv_rewrite as gr
from gconv_rewrite.errors import GconvError
from gconv_rewrite.samples import resnext_block_model, resnext_model, swap_input_channels
from gconv_rewrite.verify import WEAKEST_MUTATION_FLOAT32, float32_twin, generate_inputs, tolerance_for

from helpers import MODELS


@pytest.fixture(scope="module")
def resnext50_pair():
    """A tf2onnx-style emulated ResNeXt-50 32x4d at 224x224, and its fused rewrite."""
    emulated = resnext_model(50, "32x4d", "nhwc_tf2onnx", batch=1)
    fused = gr.rewrite(emulated, "fuse", verify_result=False)
    assert fused.count("fused") == 16
    return emulated, fused.model


@pytest.mark.parametrize("provider", ["cpu", "cuda"])
def test_reordering_noise_passes_and_one_swapped_pair_fails(resnext50_pair, provider):
    """With each provider's float32 limit (CUDA's applied to the CPU's numbers: no GPU here)."""
    emulated, fused = resnext50_pair
    limit = tolerance_for("float32", provider)
    assert limit < WEAKEST_MUTATION_FLOAT32 / 2  # the evidence's least visible wrong model must fail
    ok = gr.verify(emulated, fused, "cpu", latency=False, tolerance=limit)
    assert ok.passed and ok.outputs[0].max_rel < limit / 5
    # The first, the least visible (benchmarks/parity_evidence.py) and the last grouped Conv.
    for conv_index in (0, 7, 15):
        bad = gr.verify(emulated, swap_input_channels(fused, conv_index), "cpu", latency=False, tolerance=limit)
        assert not bad.passed and bad.outputs[0].max_rel > limit, bad.lines()


def test_compare_all_names_the_first_diverging_node(resnext50_pair):
    emulated, fused = resnext50_pair
    bad = gr.verify(emulated, swap_input_channels(fused, 3), "cpu", latency=False, compare_all=True)
    assert not bad.passed and bad.divergence is not None
    conv = [n for n in fused.graph.node
            if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)][3]
    assert bad.divergence.tensor == conv.output[0]
    assert (bad.divergence.rewritten_op_type, bad.divergence.rewritten_node) == ("Conv", conv.name)
    assert bad.divergence.op_type == "Transpose"  # the end of the emulation in the original


def test_a_against_itself_is_within_noise():
    """A ~95% interval misjudges identical models about one run in twenty by design, and shared
    machines add drift: so up to three independent runs, of which one must say "within noise"
    (all three wrong by chance: ~1e-4), and none may be off by more than 15%."""
    model = resnext_block_model("native", num_blocks=2, image=28, batch=1)
    verdicts = []
    for _ in range(3):
        report = gr.verify(model, model, "cpu", rounds=30)
        lat = report.latency
        assert report.passed and 0.85 < lat.ratio < 1.15, report.lines()
        verdicts.append(lat.verdict)
        if lat.verdict == "within noise":
            break
    assert verdicts[-1] == "within noise", verdicts
    assert abs(lat.ratio - 1) <= max(lat.noise, 0.03)
    assert lat.settings["intra_op_spinning"] is False and lat.runs_per_round >= 1


def test_fp16_is_judged_against_a_float32_twin():
    model = resnext_block_model("nchw_reducesum", num_blocks=1, image=14, dtype=np.float16, batch=1)
    twin = float32_twin(model)
    onnx.checker.check_model(twin, full_check=True)
    fused = gr.rewrite(model, "fuse", verify_result=False).model
    report = gr.verify(model, fused, "cpu", latency=False)
    assert report.passed, report.lines()
    assert report.outputs[0].reference == "float32 twin of the original"
    bad = gr.verify(model, swap_input_channels(fused), "cpu", latency=False)
    assert not bad.passed


def test_every_input_dtype_is_generated_reproducibly():
    from onnx import TensorProto, helper
    dtypes = [TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT32, TensorProto.INT64,
              TensorProto.BOOL]
    inputs = [helper.make_tensor_value_info(f"x{i}", t, ["N", 3]) for i, t in enumerate(dtypes)]
    graph = helper.make_graph([], "g", inputs, [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    a, b = generate_inputs(model, {}, 0), generate_inputs(model, {}, 0)
    assert [a[f"x{i}"].dtype for i in range(6)] == [np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_]
    assert all(v.shape == (2, 3) for v in a.values())  # symbolic batch -> 2
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert generate_inputs(model, {"x0": (5, 3)}, 0)["x0"].shape == (5, 3)
    with pytest.raises(GconvError, match="rank"):
        generate_inputs(model, {"x0": (5,)}, 0)


def test_user_inputs_from_npz_and_their_errors(tmp_path):
    model = MODELS / "resnext_native.onnx"
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 64, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "a.npz", input=x)
    np.savez(tmp_path / "b.npz", input=x[:1])
    from gconv_rewrite.verify import load_inputs
    samples = load_inputs([tmp_path / "a.npz", tmp_path / "b.npz"])
    report = gr.verify(model, MODELS / "resnext_emulated_nchw.onnx", "cpu", inputs=samples, latency=False)
    assert report.passed and report.samples == 2
    with pytest.raises(GconvError, match="missing"):
        gr.verify(model, model, "cpu", inputs=[{"other": x}], latency=False)


def test_different_outputs_are_refused():
    a = onnx.load(MODELS / "resnext_native.onnx")
    b = onnx.ModelProto()
    b.CopyFrom(a)
    b.graph.output[0].name = "renamed"
    b.graph.node[-1].output[0] = "renamed"
    with pytest.raises(GconvError, match="different outputs"):
        gr.verify(a, b, "cpu", latency=False)


def test_auto_never_regresses(monkeypatch):
    """auto mode undoes a rewrite that the interleaved timing cannot show to be faster."""
    import sys
    from dataclasses import replace
    verify_module = sys.modules["gconv_rewrite.verify"]  # the package's `verify` is the function
    real = verify_module.measure_latency
    model = onnx.load(MODELS / "resnext_emulated_nchw.onnx")
    faster = gr.rewrite(model, "auto", provider="cpu", rounds=10)
    assert faster.verification.latency.verdict == "faster" and faster.count("fused") == 2

    def no_gain(*args, **kwargs):  # the real measurement, read as if it had found no difference
        return replace(real(*args, **kwargs), ratio=1.0, verdict="within noise")

    monkeypatch.setattr(verify_module, "measure_latency", no_gain)
    same = gr.rewrite(model, "auto", provider="cpu", rounds=5)
    assert [d.action for d in same.decisions] == ["reverted", "reverted"]
    assert "not faster beyond the noise" in same.decisions[0].reason
    assert same.model.SerializeToString() == model.SerializeToString()
    forced = gr.rewrite(model, "fuse", provider="cpu", rounds=5)  # an explicit direction is obeyed
    assert forced.count("fused") == 2

"""Pipelines simplify before they rewrite. Every layout the tool fuses still fuses after onnxsim,
onnxslim and onnxruntime's basic optimizer (which fold a BatchNormalization into keras' frozen 0/1
1x1 Conv, making its rows scaled selectors: still one grouped Conv), and the result matches the
framework's outputs. A model saved by onnxruntime's extended optimizer keeps what it can (shapes are
inferred through com.microsoft FusedConv) and says why for the rest."""

import numpy as np
import onnx
import onnxruntime as ort
import onnxsim
import onnxslim
import pytest
from test_exporter_fixtures import EMULATIONS, NATIVE, SPLITS

import gconv_rewrite as gr

from helpers import FIXTURES, MODELS, max_rel_err, run_ort

NAMES = sorted(EMULATIONS) + NATIVE + sorted(SPLITS) + sorted(p.stem for p in MODELS.glob("*.onnx"))


def _load(name):
    if (FIXTURES / f"{name}.onnx").exists():
        model = onnx.load(FIXTURES / f"{name}.onnx")
        data = np.load(FIXTURES / f"{name}.npz")
        return model, {i.name: data[i.name] for i in model.graph.input}
    model = onnx.load(MODELS / f"{name}.onnx")
    rng = np.random.default_rng(0)
    feed = {}
    for i in model.graph.input:
        shape = [d.dim_value or 2 for d in i.type.tensor_type.shape.dim]
        feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return model, feed


def _ort_saved(model, level, tmp_path):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(tmp_path / "optimized.onnx")


SIMPLIFIERS = {
    "onnxsim": lambda model, tmp: onnxsim.simplify(model)[0],
    "onnxslim": lambda model, tmp: onnxslim.slim(model),
    "ort_basic": lambda model, tmp: _ort_saved(model, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, tmp),
}


def _found(result):
    """What was fused, independent of node names and layouts: action and geometry per decision."""
    return sorted((d.action, d.spec.group, d.spec.c_in, d.spec.c_out, d.spec.kernel) for d in result.decisions)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("simplifier", sorted(SIMPLIFIERS))
def test_every_layout_still_fuses_after_simplifying(name, simplifier, tmp_path):
    model, feed = _load(name)
    want = _found(gr.rewrite(model, "fuse", verify_result=False))
    simplified = SIMPLIFIERS[simplifier](model, tmp_path)
    result = gr.rewrite(simplified, "fuse", verify_result=False)
    assert _found(result) == want, [d.line() for d in result.decisions]
    expected = run_ort(model, feed)
    got = run_ort(result.model, feed)
    for out, value in expected.items():
        assert max_rel_err(got[out], value) < 2e-6, out


def test_folded_batchnorm_frozen_1x1_is_fused_as_a_mixed_depthwise_conv(tmp_path):
    model, feed = _load("keras_block3_frozen_1x1")
    simplified = onnxsim.simplify(model)[0]
    (decision,) = gr.rewrite(simplified, "fuse", verify_result=False).decisions
    assert (decision.kind, decision.was, decision.action) == ("emulation", "dw", "fused")
    assert "mixed by 1x1 Conv" in decision.computes and "grouped Conv G=8 (Cig=4, Cog=4)" in decision.computes


@pytest.mark.parametrize("name", NAMES)
def test_onnxruntime_extended_output_is_recognised_or_refused_with_the_reason(name, tmp_path):
    model, _ = _load(name)
    before = gr.rewrite(model, "fuse", verify_result=False).decisions
    saved = _ort_saved(model, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, tmp_path)
    after = gr.rewrite(saved, "fuse", verify_result=False).decisions
    assert len(after) == len(before), [d.line() for d in after]
    fused_convs = {n.op_type for n in saved.graph.node if n.domain == "com.microsoft"}
    for d in after:
        if d.action == "skipped" and d.code == "optimized":
            assert "FusedConv" in fused_convs and "ConvActivationFusion" in d.reason
        else:
            assert d.action in ("fused", "kept"), d.line()
    assert {d.code for d in after} <= {"", "optimized"}

"""TensorRT pipelines hold their models as onnx_graphsurgeon Graphs: rewrite, inspect and verify take one, and
rewrite gives one back. Checked with graphsurgeon's own import/export and onnxruntime's numbers."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import gconv_rewrite as gr

from helpers import MODELS, max_rel_err, op_counts, run_ort

SAMPLE = MODELS / "resnext_emulated_tf.onnx"


def _feed(model):
    x = model.graph.input[0]
    dims = [d.dim_value or 1 for d in x.type.tensor_type.shape.dim]
    return {x.name: np.random.default_rng(0).standard_normal(dims).astype(np.float32)}


def test_rewrite_takes_a_graph_and_gives_one_back():
    original = onnx.load(SAMPLE)
    graph = gs.import_onnx(original)
    nodes_before = len(graph.nodes)
    result = gr.rewrite(graph, "fuse", verify_result=False)
    assert len(graph.nodes) == nodes_before  # the caller's Graph is not changed
    out = result.graph
    assert isinstance(out, gs.Graph)
    exported = gs.export_onnx(out)
    assert exported.ir_version == original.ir_version
    assert {o.domain: o.version for o in exported.opset_import}[""] == \
        {o.domain: o.version for o in original.opset_import}[""]
    assert "ReduceSum" not in op_counts(exported) and op_counts(exported)["Conv"] < op_counts(original)["Conv"] + 1
    feed = _feed(original)
    want, got = run_ort(original, feed), run_ort(exported, feed)
    for name in want:
        assert max_rel_err(got[name], want[name]) < 3e-6


def test_inspect_and_verify_take_graphs():
    graph = gs.import_onnx(onnx.load(SAMPLE))
    report = gr.inspect(graph, provider="cpu")
    assert len(report.findings) == 2
    fused = gr.rewrite(graph, "fuse", verify_result=False).graph
    verdict = gr.verify(graph, fused, provider="cpu", latency=False)
    assert verdict.passed


def test_a_graph_graphsurgeon_cannot_export_is_a_one_line_error():
    graph = gs.import_onnx(onnx.load(SAMPLE))
    graph.inputs[0].dtype = None  # graphsurgeon's exporter refuses a graph input without a dtype
    with pytest.raises(gr.GconvError, match="cannot export the onnx-graphsurgeon Graph"):
        gr.rewrite(graph, verify_result=False)

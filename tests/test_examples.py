"""The examples/ pipelines, run on what the real exporters produced (tests/fixtures/exporters)."""

import importlib.util
import subprocess
import sys

import onnx
from test_exporter_fixtures import load_fixture

from helpers import FIXTURES, ROOT, max_rel_err, op_counts, run_ort


def example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_pipeline_optimise_on_a_torch_onnx_export(tmp_path):
    for name in ("torch_native_grouped", "torch_dw_reshape_sum"):
        model, inputs, outputs = load_fixture(name)
        out = tmp_path / f"{name}.onnx"
        result = example("torch_pipeline").optimise(str(FIXTURES / f"{name}.onnx"), str(out), provider="cpu")
        written = onnx.load(out)
        assert written.ir_version == model.ir_version
        assert op_counts(written)["Conv"] >= 1 and all(d.action != "skipped" for d in result.decisions)
        for key, value in run_ort(written, inputs).items():
            assert max_rel_err(value, outputs[key]) < 2e-6  # torch's own output


def test_tf2onnx_example_fuses_the_keras_export(tmp_path):
    out = tmp_path / "fused.onnx"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "tf2onnx_fuse.py"),
                           str(FIXTURES / "keras_app_block3_sum_slices.onnx"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 emulated grouped conv(s)" in proc.stdout and "fused " in proc.stdout and "PASS" in proc.stdout
    model, inputs, outputs = load_fixture("keras_app_block3_sum_slices")
    fused = onnx.load(out)
    assert "ReduceSum" not in op_counts(fused) and op_counts(fused)["Add"] < op_counts(model)["Add"]
    for key, value in run_ort(fused, inputs).items():
        assert max_rel_err(value, outputs[key]) < 2e-6  # keras' own output

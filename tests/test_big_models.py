"""Past protobuf's 2 GB limit: load, rewrite, verify and save through external data, with memory
near one copy of the weights (plus the largest tensor while it is read or written)."""

import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gconv_rewrite import model_io

ROWS, COLS = 4096, 140_000  # a 2.29 GB float32 classifier weight


def big_model():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 8, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="gconv", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, COLS])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    fc = model.graph.initializer.add()  # filled in place: protobuf cannot copy a message past 2 GB
    fc.name, fc.data_type = "fc", TensorProto.FLOAT
    fc.dims.extend([ROWS, COLS])
    fc.raw_data = rng.random((ROWS, COLS), dtype=np.float32).tobytes()
    return model


def peak_rss_mb(cmd):
    proc = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True)
    return proc, int(proc.stderr.strip().splitlines()[-1]) // 1024


def test_over_2gb_model_end_to_end(tmp_path):
    src = tmp_path / "in" / "big.onnx"
    src.parent.mkdir()
    model = big_model()
    assert model_io.needs_external_data(model)
    model_io.save(model, src)  # too big for one protobuf: external data, chosen automatically
    del model
    weights_mb = ROWS * COLS * 4 / 2**20
    out = tmp_path / "out" / "big.expanded.onnx"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "gconv_rewrite", str(src), "-o", str(out), "--direction", "expand"]
    proc, rss = peak_rss_mb(cmd + ["--no-verify"])
    assert proc.returncode == 0, proc.stderr
    assert rss < 2.3 * weights_mb, f"peak RSS {rss} MB for {weights_mb:.0f} MB of weights"
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.expanded.onnx", "big.expanded.onnx.data"]
    header = onnx.load(out, load_external_data=False)
    locations = {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"big.expanded.onnx.data"}  # relative, beside OUT
    assert [n.op_type for n in header.graph.node].count("ReduceSum") == 1
    verify = subprocess.run([sys.executable, "-m", "gconv_rewrite", "verify", str(src), str(out), "--provider", "cpu",
                             "--no-latency"], capture_output=True, text=True)
    assert verify.returncode == 0 and "PASS" in verify.stdout, verify.stdout + verify.stderr

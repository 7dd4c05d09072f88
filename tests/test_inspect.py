"""`inspect`: a read-only survey of grouped Convs and emulations."""

import json

import onnx
from click.testing import CliRunner

import gconv_rewrite as gr
from gconv_rewrite.cli import main

from helpers import FIXTURES, MODELS


def test_inspect_reports_native_emulated_and_wrong_emulations():
    native = gr.inspect(MODELS / "resnext_native.onnx")
    assert [f.status for f in native.findings] == ["native", "native"]
    first = native.findings[0]
    assert first.spec.group == 8 and first.spec.cig == 8 and first.spec.output_shape[2:] == (14, 14)
    # The emulation of that conv would hold Cig x the output: 8 * 64 * 14 * 14 floats per image.
    assert abs(first.intermediate_mb_per_image - 8 * 64 * 14 * 14 * 4 / 2**20) < 1e-9
    wrong = gr.inspect(MODELS / "resnext_wrong_emulation.onnx")
    assert all(f.status == "emulated" and "NOT a grouped conv" in f.computes for f in wrong.findings)
    # A wrong emulation materialises as much as a right one: its depthwise Conv has multiplier 8.
    assert [f.intermediate_mb_per_image for f in wrong.findings] == [first.intermediate_mb_per_image] * 2
    tf = gr.inspect(FIXTURES / "tf_interleaved_cig_c.onnx")
    assert [f.computes for f in tf.findings] == [
        "grouped Conv G=4 (Cig=8, Cog=4) up to an input-channel permutation"]
    assert tf.findings[0].emulation_nodes == 5  # Conv, Transpose, Reshape, ReduceSum, Transpose


def test_inspect_writes_nothing_and_prints_json(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes((MODELS / "resnext_emulated_tf.onnx").read_bytes())
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, ["inspect", str(src)])
    assert result.exit_code == 0 and result.output.count("emulated ") == 4  # a table row and a block each
    assert "2 candidate(s): 0 native grouped, 2 emulated, 0 skipped" in result.output
    # The whole geometry, spatial sizes in (after the folded Pad) and out included.
    assert "Cin=64 Cout=64 G=8 (Cig=8, Cog=8) k=3x3 s=2x2, 30x30 -> 14x14" in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    as_json = CliRunner().invoke(main, ["inspect", str(src), "--json"])
    data = json.loads(as_json.output)
    assert [f["status"] for f in data["findings"]] == ["emulated", "emulated"]
    spec = data["findings"][1]["spec"]  # the conv the emulation equals, not the depthwise one
    assert (spec["c_in"], spec["c_out"], spec["group"]) == (64, 64, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert onnx.load(src).SerializeToString() == (MODELS / "resnext_emulated_tf.onnx").read_bytes()


def test_inspect_opens_with_one_row_per_finding():
    report = gr.inspect(MODELS / "resnext_wrong_emulation.onnx", "cpu")
    table = report.table()
    assert table[0].split() == ["status", "node", "G", "CigxCog", "k", "s", "pick", "(ms)"]
    assert len(table) == 2 + len(report.findings) and table[-1] == "-" * 79
    assert all(row.startswith("emulated") and row.endswith("NOT grouped") for row in table[1:-1])
    native = gr.inspect(MODELS / "resnext_native.onnx", "cpu")
    rows = native.table()[1:-1]
    assert [row.split()[2:6] for row in rows] == [["8", "8x8", "3x3", "2x2"], ["8", "8x8", "3x3", "1x1"]]
    assert all(row.split()[-2] == "native" and float(row.split()[-1].rstrip("*")) > 0 for row in rows)
    assert native.lines()[: len(native.table())] == native.table()
    assert max(map(len, native.lines()[0].splitlines())) <= 80

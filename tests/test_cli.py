"""The command line, through click's runner and through the installed console script."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from gconv_rewrite.cli import main

from helpers import FIXTURES, MODELS, op_counts

SAMPLE = MODELS / "resnext_emulated_tf.onnx"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_rewrite_fuses_verifies_and_writes(tmp_path):
    out = tmp_path / "out.onnx"
    result = invoke(SAMPLE, "-o", out, "--provider", "cpu")
    assert result.exit_code == 0, result.output
    assert result.output.count("fused ") == 2
    assert "parity on cpu" in result.output and "PASS" in result.output
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert "ReduceSum" not in op_counts(model)


def test_expand_direction_and_no_verify(tmp_path):
    out = tmp_path / "out.onnx"
    result = invoke(MODELS / "resnext_native.onnx", "-o", out, "--direction", "expand", "--no-verify")
    assert result.exit_code == 0, result.output
    assert result.output.count("expanded ") == 2 and "parity" not in result.output
    assert op_counts(onnx.load(out))["ReduceSum"] == 2


def test_skips_are_printed_with_their_reason(tmp_path):
    result = invoke(FIXTURES / "torch_native_grouped.onnx", "-o", tmp_path / "o.onnx", "--direction", "fuse")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("kept      /conv2/Conv"))
    assert lines[row].split()[2] == "native" and "->" in lines[row]
    assert lines[row + 1].strip() == "direction=fuse keeps native grouped Convs"
    assert all(len(line) <= 80 for line in lines if not line.startswith("wrote"))
    verbose = invoke(FIXTURES / "torch_native_grouped.onnx", "-o", tmp_path / "o.onnx", "--direction", "fuse", "-v",
                     "--no-verify")
    assert all(len(line) <= 80 for line in verbose.output.splitlines() if not line.startswith("wrote"))
    unwrapped = " ".join(verbose.output.split())
    assert "kept /conv2/Conv: grouped Conv Cin=32 Cout=32 G=8 (Cig=4, Cog=4) k=3x3, 8x8 -> 8x8 - direction=fuse" \
        in unwrapped
    assert "grouped Conv Cin=32 Cout=32 G=8 (Cig=4, Cog=4) k=3x3, 8x8 -> 8x8 - direction" in unwrapped
    assert "predicted ms: native " in unwrapped and "cost model: cpu " in unwrapped
    # What the times stand on: Cig = 4, so the emulation's intermediate is 4x the output.
    assert "dw moves" in unwrapped and "dense does 8x the FLOPs of native" in unwrapped


def test_a_wrong_emulation_is_flagged_in_every_report(tmp_path):
    wrong = MODELS / "resnext_wrong_emulation.onnx"
    for direction, action in (("auto", "fused"), ("expand", "kept")):
        result = invoke(wrong, "-o", tmp_path / "o.onnx", "--direction", direction, "--no-verify")
        assert result.exit_code == 0, result.output
        assert result.output.count(f"{action:<10}block") == 2
        assert "warning: 2 emulation(s) sum over the multiplier axis: NOT grouped convs" in result.output
    fused = invoke(wrong, "-o", tmp_path / "o.onnx", "--no-verify")
    assert "NOT a grouped conv: it sums over the multiplier axis" in " ".join(fused.output.split())
    # Its form afterwards is a plain depthwise Conv, not a "native" grouped one.
    assert [line.split()[2] for line in fused.output.splitlines() if line.startswith("fused ")] == ["depthwise"] * 2
    inspected = invoke("inspect", wrong)
    assert "warning: 2 emulation(s) sum over the multiplier axis: NOT grouped convs" in inspected.output
    ops = op_counts(onnx.load(tmp_path / "o.onnx"))
    assert "ReduceSum" not in ops
    convs = [n for n in onnx.load(tmp_path / "o.onnx").graph.node if n.op_type == "Conv" and "conv2" in n.name]
    groups = [next(a.i for a in n.attribute if a.name == "group") for n in convs]
    assert groups == [64, 64]  # the depthwise Convs the regions equal, not grouped ones


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    (b"", "empty file"),
    (b"\xff\x00garbage" * 10, "not a valid ONNX model"),
    (SAMPLE.read_bytes()[:5000], "not a valid ONNX model"),
], ids=["missing", "empty", "junk", "truncated"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "in.onnx"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out.onnx"
    result = invoke(path, "-o", out)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_output_equal_to_input_needs_in_place(tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(SAMPLE, model)
    before = model.read_bytes()
    result = invoke(model, "-o", model)
    assert result.exit_code == 2 and "--in-place" in result.output
    assert model.read_bytes() == before
    result = invoke(model, "-o", model, "--in-place", "--provider", "cpu")
    assert result.exit_code == 0 and model.read_bytes() != before


def test_cuda_where_it_does_not_work_is_an_error_not_a_cpu_run(tmp_path):
    from gconv_rewrite.runtime import _cuda_problem
    result = invoke(SAMPLE, "-o", tmp_path / "o.onnx", "--provider", "cuda", "--rounds", "3")
    if _cuda_problem():  # CI and CPU machines: the reason, exit 2, nothing written
        assert result.exit_code == 2 and "--provider cuda:" in result.output
        assert not (tmp_path / "o.onnx").exists()
    else:  # a working CUDA provider: it is really used
        assert result.exit_code == 0 and "parity on cuda" in result.output


def test_planning_for_cuda_needs_no_gpu(tmp_path):
    """A CPU-only build machine prepares a GPU deployment: inspect and --no-verify plan for CUDA."""
    inspected = invoke("inspect", MODELS / "resnext_native.onnx", "--provider", "cuda")
    assert inspected.exit_code == 0 and "cost model: cuda" in inspected.output
    out = tmp_path / "o.onnx"
    planned = invoke(SAMPLE, "-o", out, "--provider", "cuda", "--no-verify")
    assert planned.exit_code == 0 and "grouped convs on cuda:" in planned.output and out.exists()
    data = json.loads(invoke(SAMPLE, "-o", out, "--provider", "cuda", "--no-verify", "--json").output)
    assert data["provider"] == "cuda" and data["verification"] is None


def test_verify_command_detects_a_different_model():
    same = invoke("verify", SAMPLE, MODELS / "resnext_emulated_nchw.onnx", "--provider", "cpu")
    assert same.exit_code == 0 and "PASS" in same.output
    wrong = invoke("verify", SAMPLE, MODELS / "resnext_wrong_emulation.onnx", "--provider", "cpu")
    assert wrong.exit_code == 1 and "FAIL" in wrong.output


def test_verify_command_writes_versioned_json_and_names_a_differing_input(tmp_path):
    report = tmp_path / "v.json"
    result = invoke("verify", SAMPLE, MODELS / "resnext_emulated_nchw.onnx", "--provider", "cpu", "--no-latency",
                    "--json", "--report", report)
    data = json.loads(result.output)
    assert result.exit_code == 0 and data == json.loads(report.read_text())
    assert data["schema"] == "gconv-rewrite/verify-report" and data["version"] == 1 and data["passed"] is True
    quiet = invoke("verify", SAMPLE, MODELS / "resnext_wrong_emulation.onnx", "--provider", "cpu", "--no-latency", "-q")
    assert quiet.exit_code == 1 and quiet.output.splitlines()[0].startswith("parity on cpu, 3 sample(s): FAIL")
    loud = invoke("verify", SAMPLE, MODELS / "resnext_wrong_emulation.onnx", "--rounds", "3", "--compare-all")
    assert loud.exit_code == 1 and max(map(len, loud.output.splitlines())) <= 80, loud.output
    assert len(quiet.output.splitlines()) == 1
    # Same input name, other channel count: said plainly, before onnxruntime's own message.
    other = tmp_path / "other.onnx"
    m = onnx.load(SAMPLE)
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 32
    onnx.save(m, other)
    clash = invoke("verify", SAMPLE, other, "--provider", "cpu")
    assert clash.exit_code == 2 and "input 'input' differs: float32[" in clash.output
    assert "32" in clash.output.split("in the first model,")[1]


def test_unresolved_symbolic_dims_name_the_dims(tmp_path):
    model = FIXTURES / "keras215_block3_dynamic.onnx"
    result = invoke(model, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "--input-shape input:" in result.output
    ok = invoke(model, "-o", tmp_path / "o.onnx", "--input-shape", "input:2x8x8x32", "--provider", "cpu")
    assert ok.exit_code == 0, ok.output
    bad = invoke(model, "-o", tmp_path / "o.onnx", "--input-shape", "nope:2x8x8x32")
    assert bad.exit_code == 2 and "unknown input 'nope'" in bad.output
    for command in (["inspect", model], ["verify", model, model]):  # planning and input generation: one check
        rank = invoke(*command, "--input-shape", "input:2x8x8")
        assert rank.exit_code == 2 and "--input-shape input: rank 3, but the input has rank 4" in rank.output
    clash = invoke("inspect", model, "--input-shape", "input:2x8x8x16")
    assert clash.exit_code == 2 and "dim 3 is 16, but the model fixes it to 32" in clash.output


def test_the_suggested_input_shape_is_a_template_that_works_once_filled(tmp_path):
    model = FIXTURES / "keras215_block3_dynamic.onnx"
    message = invoke(model, "-o", tmp_path / "o.onnx").output
    suggested = message.split("--input-shape ")[1].split(",")[0]
    assert suggested == "input:2x<unk__568>x<unk__569>x32"
    filled = suggested.replace("<unk__568>", "8").replace("<unk__569>", "8")
    assert invoke(model, "-o", tmp_path / "o.onnx", "--input-shape", filled, "--no-latency").exit_code == 0


def test_input_shapes_inform_planning_while_the_graph_stays_symbolic(tmp_path):
    model = FIXTURES / "keras215_block3_dynamic.onnx"
    out = tmp_path / "o.onnx"
    blind = invoke("inspect", model)
    assert "spatial size unknown" in blind.output and "predicted ms" not in blind.output
    seen = invoke("inspect", model, "--input-shape", "input:1x8x8x32")
    assert "10x10 -> 8x8" in seen.output and "predicted ms: native" in seen.output
    result = invoke(model, "-o", out, "--input-shape", "input:2x8x8x32", "--form", "dw", "--no-latency")
    assert result.exit_code == 0, result.output
    rewritten = onnx.load(out)
    assert [d.dim_param for d in rewritten.graph.input[0].type.tensor_type.shape.dim][1:3] == ["unk__568", "unk__569"]
    # The rewrite must still run, and agree, at another size than the one planned with.
    x = np.random.default_rng(0).standard_normal((1, 13, 11, 32)).astype(np.float32)
    (want,) = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    (got,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert want.shape == got.shape == (1, 13, 11, 256) and np.abs(want - got).max() <= 3e-6 * np.abs(want).max()
    tuned = invoke("tune", model, "--input-shape", "input:1x8x8x32", "--cache", tmp_path / "t.json", "--rounds", "3")
    assert tuned.exit_code == 0 and "1 geometry: 1 measured" in tuned.output
    assert max(map(len, tuned.output.splitlines() + seen.output.splitlines())) <= 80


def test_console_script_and_module_entry_points(tmp_path):
    exe = shutil.which("gconv-rewrite", path=os.path.dirname(sys.executable)) or shutil.which("gconv-rewrite")
    assert exe, "the console script is installed with the package"
    out = tmp_path / "out.onnx"
    proc = subprocess.run([exe, str(SAMPLE), "-o", str(out), "--no-verify"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no onnxruntime log spill
    assert out.exists()
    proc = subprocess.run([sys.executable, "-m", "gconv_rewrite", "missing.onnx", "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: missing.onnx: no such file"


def test_a_closed_pipe_drops_the_output_not_the_work(tmp_path):
    """`gconv-rewrite ... | head -1`: quiet exit 0 and the model written, no BrokenPipe error."""
    exe = shutil.which("gconv-rewrite", path=os.path.dirname(sys.executable)) or shutil.which("gconv-rewrite")
    out = tmp_path / "out.onnx"
    proc = subprocess.Popen([exe, str(SAMPLE), "-o", str(out), "-v", "--no-verify"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()  # what `head` does after its first line
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_failed_parity_writes_nothing_unless_forced(tmp_path):
    out = tmp_path / "out.onnx"
    strict = ("--tolerance", "1e-15", "--provider", "cpu", "--no-latency")
    result = invoke(SAMPLE, "-o", out, *strict)
    assert result.exit_code == 1 and "FAIL" in result.output and "not written" in result.output
    assert not out.exists()
    forced = invoke(SAMPLE, "-o", out, *strict, "--force")
    # written, but the failure still reaches a pipeline through the exit code
    assert forced.exit_code == 1 and out.exists() and "written anyway" in forced.output
    onnx.checker.check_model(onnx.load(out), full_check=True)


@pytest.mark.parametrize("args, complaint", [(("-q", "-v"), "exclude each other"),
                                             (("--tolerance", "-1"), "--tolerance"),
                                             (("--tolerance", "0"), "--tolerance")])
def test_contradictory_or_impossible_options_are_usage_errors(tmp_path, args, complaint):
    out = tmp_path / "out.onnx"
    result = invoke(SAMPLE, "-o", out, *args)
    assert result.exit_code == 2 and complaint in result.output and not out.exists()
    assert len(result.output.strip().splitlines()) == 1


def test_verification_reports_latency_with_a_verdict(tmp_path):
    result = invoke(SAMPLE, "-o", tmp_path / "o.onnx", "--provider", "cpu", "--rounds", "5")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("latency on cpu"))
    assert any(word in lines[at] for word in ("faster", "slower", "noise"))
    assert "original" in lines[at + 1] and "rewritten" in lines[at + 1]
    assert all(len(line) <= 80 for line in lines if not line.startswith("wrote"))


def test_auto_provider_fallback_prints_nothing_from_onnxruntime(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(SAMPLE), "-o", str(tmp_path / "o.onnx"),
                           "--rounds", "3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "parity on " in proc.stdout and "PASS" in proc.stdout


def test_rewriting_twice_gives_the_same_bytes(tmp_path):
    once, twice, again = tmp_path / "1.onnx", tmp_path / "2.onnx", tmp_path / "3.onnx"
    for src, out in ((SAMPLE, once), (once, twice), (SAMPLE, again)):
        assert invoke(src, "-o", out, "--no-verify").exit_code == 0
    assert once.read_bytes() == twice.read_bytes() == again.read_bytes()


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "No such option '--bogus'"),
    ([], "Missing option '-o'"),
    (["-o", "/nonexistent-folder/out.onnx"], "output folder does not exist"),
    (["-o", "{tmp}"], "is a directory"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "gconv_rewrite", str(SAMPLE)] + args, capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_json_and_report_carry_the_same_versioned_report(tmp_path):
    import json
    report = tmp_path / "report.json"
    result = invoke(SAMPLE, "-o", tmp_path / "o.onnx", "--provider", "cpu", "--rounds", "3", "--json",
                    "--report", report)
    assert result.exit_code == 0
    printed = json.loads(result.output)  # nothing but JSON on stdout
    written = json.loads(report.read_text())
    assert printed == written
    assert (written["schema"], written["version"]) == ("gconv-rewrite/rewrite-report", 1)
    assert written["counts"]["fused"] == 2 and written["written"] is True
    assert written["verification"]["passed"] is True and written["verification"]["latency"]["verdict"] in (
        "faster", "slower", "within noise")
    quiet = invoke(SAMPLE, "-o", tmp_path / "o.onnx", "-q", "--no-verify")
    assert quiet.exit_code == 0 and "fused " not in quiet.output and "2 candidate(s)" in quiet.output


@pytest.mark.parametrize("case", ["rewrite-ok", "rewrite-parity-fails", "rewrite-bad-input", "inspect", "inspect-json",
                                  "tune-json", "verify-same", "verify-different", "verify-bad-provider", "help",
                                  "version"])
def test_every_command_and_exit_code_through_the_console_script(tmp_path, case):
    """Each command as a user runs it: the installed script, a real process, documented exit codes."""
    exe = shutil.which("gconv-rewrite", path=os.path.dirname(sys.executable)) or shutil.which("gconv-rewrite")
    out = tmp_path / "o.onnx"
    wrong = MODELS / "resnext_wrong_emulation.onnx"
    native = MODELS / "resnext_native.onnx"
    cases = {
        "rewrite-ok": ([str(SAMPLE), "-o", str(out), "--provider", "cpu", "--rounds", "3"], 0, "PASS"),
        "rewrite-parity-fails": ([str(SAMPLE), "-o", str(out), "--tolerance", "1e-15", "--no-latency"], 1,
                                 "not written"),
        "rewrite-bad-input": ([str(tmp_path / "nothing.onnx"), "-o", str(out)], 2, "no such file"),
        "inspect": (["inspect", str(SAMPLE), "--provider", "cpu"], 0, "predicted ms: native"),
        "inspect-json": (["inspect", str(SAMPLE), "--json"], 0, '"schema": "gconv-rewrite/inspect-report"'),
        "tune-json": (["tune", str(native), "--provider", "cpu", "--rounds", "3", "--json",
                       "--cache", str(tmp_path / "c.json")], 0, '"best": '),
        "verify-same": (["verify", str(native), str(SAMPLE), "--no-latency"], 0, "PASS"),
        "verify-different": (["verify", str(native), str(wrong), "--no-latency"], 1, "FAIL"),
        "verify-bad-provider": (["verify", str(native), str(SAMPLE), "--provider", "tpu"], 2, "--provider"),
        "help": (["--help"], 0, "Exit codes: 0 success, 1 verification failed"),
        "version": (["--version"], 0, "version"),
    }
    args, code, text = cases[case]
    proc = subprocess.run([exe] + args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert text in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    if code == 2:
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
    if code != 0 and case.startswith("rewrite"):
        assert not out.exists()
    if case.endswith("json"):
        import json
        json.loads(proc.stdout)  # nothing but JSON on stdout


def test_help_fits_80_columns_and_a_bare_call_shows_it():
    exe = shutil.which("gconv-rewrite", path=os.path.dirname(sys.executable)) or shutil.which("gconv-rewrite")
    env = dict(os.environ, COLUMNS="80")
    for command in ([], ["rewrite"], ["inspect"], ["tune"], ["verify"]):
        text = subprocess.run([exe, *command, "--help"], capture_output=True, text=True, env=env).stdout
        assert "Usage:" in text and max(map(len, text.splitlines())) <= 80, command
    bare = subprocess.run([exe], capture_output=True, text=True, env=env)
    assert bare.returncode == 2 and bare.stderr.startswith("Usage:") and "error:" not in bare.stderr


def test_progress_bars_appear_on_a_terminal_only(tmp_path):
    import pty
    exe = shutil.which("gconv-rewrite", path=os.path.dirname(sys.executable)) or shutil.which("gconv-rewrite")
    args = [exe, str(SAMPLE), "-o", str(tmp_path / "o.onnx"), "--provider", "cpu", "--rounds", "3", "--tune",
            "--cache"]
    piped = subprocess.run(args + [str(tmp_path / "c1.json")], capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and piped.stderr == "" and "[#" not in piped.stdout
    main_fd, tty_fd = pty.openpty()
    proc = subprocess.Popen(args + [str(tmp_path / "c2.json")], stdout=subprocess.PIPE, stderr=tty_fd)
    os.close(tty_fd)
    stdout, _ = proc.communicate(timeout=300)
    seen = b""
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # the terminal's other side closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(main_fd)
    assert proc.returncode == 0 and b"[#" not in stdout
    assert b"tuning   [" in seen and b"timing   [####" in seen and b"] 3/3" in seen


def test_a_report_never_lands_on_a_model_and_says_whether_the_model_was_written(tmp_path):
    model = tmp_path / "in.onnx"
    shutil.copy(SAMPLE, model)
    before = model.read_bytes()
    for report in (model, tmp_path / "out.onnx"):
        result = invoke(model, "-o", tmp_path / "out.onnx", "--report", report, "--no-verify")
        assert result.exit_code == 2 and "is also a model path" in result.output
    assert model.read_bytes() == before and not (tmp_path / "out.onnx").exists()
    clash = invoke("verify", model, SAMPLE, "--report", model)
    assert clash.exit_code == 2 and model.read_bytes() == before


def test_a_failed_save_is_in_the_report(tmp_path, monkeypatch):
    """The save fails after the work (a full disk, say): the report records it, not "written": true."""
    from gconv_rewrite import model_io
    from gconv_rewrite.errors import GconvError

    def full_disk(*args, **kwargs):
        raise GconvError("out.onnx: cannot write (No space left on device)")
    monkeypatch.setattr(model_io, "save", full_disk)
    report = tmp_path / "r.json"
    result = invoke(SAMPLE, "-o", tmp_path / "out.onnx", "--report", report, "--no-verify")
    data = json.loads(report.read_text())
    assert result.exit_code == 2 and data["written"] is False and "No space left" in data["error"]


def test_form_and_an_explicit_direction_exclude_each_other(tmp_path):
    result = invoke(SAMPLE, "-o", tmp_path / "o.onnx", "--form", "dw", "--direction", "fuse")
    assert result.exit_code == 2 and "cannot be combined with --direction fuse" in result.output
    bad_shape = invoke("inspect", SAMPLE, "--input-shape", "foo")
    assert bad_shape.exit_code == 2 and "Invalid value for --input-shape" in bad_shape.output


def test_auto_without_timing_says_the_guard_did_not_run(tmp_path):
    result = invoke(SAMPLE, "-o", tmp_path / "o.onnx", "--no-latency")
    assert result.exit_code == 0 and "the never-regress guard did not run" in " ".join(result.output.split())


# -- whose fault: bad input (exit 2) vs a bug of the tool (exit 3) ---------------------------------------------------

def _broken_rewrite(*args, **kwargs):
    raise ZeroDivisionError("a bug planted by the test")


def test_a_bug_is_an_internal_error_not_bad_input(tmp_path, monkeypatch):
    """Any exception that is not a GconvError says it is the tool's fault, with the version, and no traceback."""
    from gconv_rewrite import __version__, api
    monkeypatch.setattr(api, "rewrite", _broken_rewrite)
    monkeypatch.delenv("GCONV_REWRITE_DEBUG", raising=False)
    result = invoke(SAMPLE, "-o", tmp_path / "o.onnx", "--provider", "cpu")
    assert result.exit_code == 3, result.output
    line, = result.output.strip().splitlines()
    assert line.startswith(f"internal error in gconv-rewrite {__version__} (ZeroDivisionError: a bug planted")
    assert "not a problem with your model" in line and "--debug" in line
    assert "Traceback" not in result.output and not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("how", ["flag-first", "flag-last", "env"])
def test_debug_shows_the_traceback_of_an_internal_error(tmp_path, monkeypatch, how):
    from gconv_rewrite import api
    monkeypatch.setattr(api, "rewrite", _broken_rewrite)
    monkeypatch.setenv("GCONV_REWRITE_DEBUG", "")  # recorded, so what --debug sets is undone after the test
    monkeypatch.delenv("GCONV_REWRITE_DEBUG")
    args = [SAMPLE, "-o", tmp_path / "o.onnx"]
    if how == "env":
        monkeypatch.setenv("GCONV_REWRITE_DEBUG", "1")
    args = ["--debug"] + args if how == "flag-first" else args + ["--debug"] if how == "flag-last" else args
    result = invoke(*args)
    assert result.exit_code == 3, result.output
    assert "Traceback" in result.output and "_broken_rewrite" in result.output
    assert "internal error in gconv-rewrite" in result.output.strip().splitlines()[-1]


def test_internal_error_raised_by_the_tool_exits_3(tmp_path, monkeypatch):
    from gconv_rewrite import api
    from gconv_rewrite.errors import InternalError

    def fail(*a, **k):
        raise InternalError("the rewritten model does not load in onnxruntime")
    monkeypatch.setattr(api, "inspect", fail)
    result = invoke("inspect", SAMPLE)
    assert result.exit_code == 3 and "the rewritten model does not load" in result.output


def test_a_name_that_is_not_utf8_is_bad_input(tmp_path):
    """protobuf parses a damaged name and fails only when it is read: refused at load, one line, exit 2."""
    model = onnx.load(SAMPLE)
    model.graph.node[0].name = "PLACEHOLDER-NAME"
    damaged = model.SerializeToString().replace(b"PLACEHOLDER-NAME", b"\xccLACEHOLDER-NAME")
    src = tmp_path / "damaged.onnx"
    src.write_bytes(damaged)
    result = invoke(src, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {src}: not a valid ONNX model (a name or string is not UTF-8 at byte 0: " \
                                    "a damaged file?)"
    assert not (tmp_path / "o.onnx").exists()

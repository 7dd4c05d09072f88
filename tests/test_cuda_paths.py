"""The CUDA paths, exercised without a GPU (issue 17): onnxruntime's silent fallback to CPU is
simulated through its own Python wrapper, library prints through real file descriptors."""

import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnxruntime.capi import onnxruntime_inference_collection as collection
from onnxruntime.capi import onnxruntime_pybind11_state as state

import gconv_rewrite as gr
from gconv_rewrite import geometry, runtime, tune_cache, tuning
from gconv_rewrite.cli import main
from gconv_rewrite.errors import GconvError
from gconv_rewrite.samples import resnext_block_model

from helpers import MODELS, ROOT

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="")


class _FailingRuns:
    """A real CPU session whose run() raises EPFail, as the CUDA provider does when the cuDNN
    frontend cannot be initialised; everything else is the real session."""

    def __init__(self, sess):
        self._real = sess

    def run(self, *args):
        raise state.EPFail("Failed to initialize CUDNN Frontend")

    run_with_iobinding = run

    def __getattr__(self, name):
        return getattr(self._real, name)


def _wants_cuda(providers) -> bool:
    return any((p[0] if isinstance(p, tuple) else p) == CUDA for p in providers or [])


@pytest.fixture
def simulated_cuda(monkeypatch):
    """CUDA 'works' here: sessions asked for CUDA are real CPU sessions that claim CUDA and whose
    runs fail with EPFail. onnxruntime's own wrapper (its fallback code included) runs unchanged."""
    original = collection.InferenceSession._create_inference_session

    def create(self, providers, provider_options, disabled_optimizers=None):
        original(self, [CPU], None, disabled_optimizers)
        if _wants_cuda(providers):
            self._providers = [CUDA, CPU]
            self._sess = _FailingRuns(self._sess)

    monkeypatch.setattr(collection.InferenceSession, "_create_inference_session", create)
    monkeypatch.setattr(runtime, "_cuda_problem", lambda: "")


@pytest.fixture
def model_pair():
    model = resnext_block_model("native", num_blocks=1, image=14, batch=1)
    return model, gr.rewrite(model, "expand", verify_result=False).model


def test_the_simulation_reproduces_onnxruntimes_silent_fallback(simulated_cuda, model_pair, capsys):
    """Control: left to its defaults, onnxruntime 1.31.1 answers a CUDA failure with CPU numbers."""
    model, _ = model_pair
    sess = ort.InferenceSession(model.SerializeToString(), providers=[CUDA, CPU])
    assert sess.get_providers() == [CUDA, CPU]
    feed = gr.verify.__globals__["generate_inputs"](model, {}, 0)
    out = sess.run(None, feed)
    assert np.isfinite(out[0]).all() and sess.get_providers() == [CPU]
    assert "Falling back to ['CPUExecutionProvider']" in capsys.readouterr().out


def test_a_cuda_failure_while_running_is_an_error_never_cpu_numbers(simulated_cuda, model_pair, capsys):
    model, expanded = model_pair
    with pytest.raises(runtime.CudaFallbackError, match="CUDA provider failed running .*CUDNN Frontend.*not retried"):
        gr.verify(model, expanded, "cuda", latency=False)
    assert "Falling back" not in capsys.readouterr().out


def test_the_cli_says_so_in_one_line(simulated_cuda, model_pair, tmp_path):
    paths = []
    for name, m in zip("ab", model_pair):
        paths.append(str(tmp_path / f"{name}.onnx"))
        with open(paths[-1], "wb") as f:
            f.write(m.SerializeToString())
    result = CliRunner().invoke(main, ["verify", *paths, "--provider", "cuda", "--no-latency"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.count("\n") == 1 and "CUDA provider failed running" in result.output


def test_a_failure_at_creation_is_an_error_never_a_cpu_session(monkeypatch, model_pair, capsys):
    original = collection.InferenceSession._create_inference_session

    def create(self, providers, provider_options, disabled_optimizers=None):
        if _wants_cuda(providers):
            self._fallback_providers = [CPU]  # as the real method sets it before creating anything
            raise RuntimeError("Failed to initialize CUDNN Frontend")
        original(self, providers, provider_options, disabled_optimizers)

    monkeypatch.setattr(collection.InferenceSession, "_create_inference_session", create)
    model, _ = model_pair
    plain = ort.InferenceSession(model.SerializeToString(), providers=[CUDA, CPU])  # control: falls back
    assert plain.get_providers() == [CPU] and "EP Error" in capsys.readouterr().out
    choice = runtime.ProviderChoice("cuda", (CUDA, CPU), "simulated")
    with pytest.raises(runtime.CudaFallbackError, match="CUDA provider cannot load the model: .*CUDNN Frontend"):
        runtime.session(model, choice)
    assert "EP Error" not in capsys.readouterr().out


def test_a_cuda_provider_that_does_not_load_is_refused_at_creation(model_pair):
    """Real onnxruntime on this CPU-only machine: CUDA's libraries are missing, so the C++ session
    drops the provider (fallback disabled or not) and would run on CPU."""
    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider")
    choice = runtime.ProviderChoice("cuda", (CUDA, CPU), "asked for CUDA")
    with pytest.raises(runtime.CudaFallbackError, match="not running the model \\(created with CPUExecutionProvider"):
        runtime.session(model_pair[0], choice)


def test_providers_are_checked_again_after_running(simulated_cuda, monkeypatch, model_pair):
    """Defence in depth: were fallback still enabled (another onnxruntime), the run itself would
    switch to CPU; the check after the run catches it."""
    monkeypatch.setattr(runtime, "_new_session", lambda source, opts, providers: ort.InferenceSession(
        source, opts, providers=providers))
    model, expanded = model_pair
    with pytest.raises(runtime.CudaFallbackError, match="not running the original model \\(after running with "
                                                        "CPUExecutionProvider only\\)"):
        gr.verify(model, expanded, "cuda", latency=False)


def test_io_binding_needs_a_cuda_session(model_pair):
    sess = runtime.session(model_pair[0], runtime.choose_provider("cpu"))
    with pytest.raises(GconvError, match="IO binding on CUDA needs a CUDA session"):
        runtime.Runner(sess, {}, runtime.ProviderChoice("cuda", (CUDA, CPU), "test"))


# -- machine-readable output (item 3): real file descriptors, a subprocess each ---------------------

_NOISY = """
import os, sys
from gconv_rewrite import runtime, tuning
original = runtime._new_session
def noisy(*args):
    print("EP Error: simulated provider message")            # what onnxruntime's wrapper does
    os.write(1, b"Failed to load libcublasLt.so.13 (native)\\n")  # what a native loader does
    return original(*args)
runtime._new_session = noisy
from gconv_rewrite.cli import main
sys.argv = ["gconv-rewrite"] + sys.argv[1:]
main()
"""


def _noisy_cli(*args):
    return subprocess.run([sys.executable, "-c", _NOISY, *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("command", ["verify", "rewrite"])
def test_json_stays_exactly_json_whatever_libraries_print(command, tmp_path):
    model = MODELS / "resnext_emulated_tf.onnx"
    args = ([command, model, model] if command == "verify" else [model, "-o", tmp_path / "out.onnx"])
    done = _noisy_cli(*args, "--provider", "cpu", "--no-latency", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)  # the whole of stdout, nothing before or after
    assert data["schema"] in ("gconv-rewrite/verify-report", "gconv-rewrite/rewrite-report")
    assert "EP Error: simulated" in done.stderr and "libcublasLt" in done.stderr  # moved, not lost


def test_the_cuda_probe_prints_nothing_even_into_a_buffered_file(tmp_path):
    """print()s inside the quiet block must not surface later, when Python flushes its buffer."""
    script = ("import os, sys\nfrom gconv_rewrite import runtime\n"
              "with runtime._quiet_native_output():\n"
              "    print('preload_dlls: Failed to load libcudnn.so.9')\n"
              "    os.write(1, b'native stdout\\n'); os.write(2, b'native stderr\\n')\n"
              "    print('to stderr', file=sys.stderr)\n"
              "print('after')\n")
    out = tmp_path / "stdout.txt"
    with open(out, "w") as f:
        done = subprocess.run([sys.executable, "-c", script], stdout=f, stderr=subprocess.PIPE, text=True, env=ENV,
                              timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    assert out.read_text() == "after\n"


def test_inspect_json_with_a_cuda_probe_that_prints(tmp_path):
    """The issue's case: CUDA_VISIBLE_DEVICES set on a CPU-only machine, stdout a file."""
    script = ("import os, sys\nfrom gconv_rewrite import runtime\n"
              "def probe(ort):\n"
              "    print('Failed to load libcublasLt.so.13'); os.write(1, b'native loader\\n')\n"
              "    return 'simulated: no CUDA'\n"
              "runtime._cuda_run_probe = probe\n"
              "from gconv_rewrite.cli import main\nsys.argv = ['gconv-rewrite'] + sys.argv[1:]\nmain()\n")
    out = tmp_path / "inspect.json"
    env = dict(ENV, CUDA_VISIBLE_DEVICES="0")
    with open(out, "w") as f:
        done = subprocess.run([sys.executable, "-c", script, "inspect", MODELS / "resnext_emulated_tf.onnx", "--json"],
                              stdout=f, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["provider"] == "cpu"


# -- which GPU (item 5) -----------------------------------------------------------------------------

class _FakeDriver:
    """The CUDA driver API's four calls, over a list of devices in CUDA's order."""

    def __init__(self, names):
        self.names = names

    def cuInit(self, flags):
        return 0

    def cuDeviceGetCount(self, count):
        count._obj.value = len(self.names)
        return 0

    def cuDeviceGet(self, device, ordinal):
        device._obj.value = ordinal
        return 0

    def cuDeviceGetName(self, buffer, size, device):
        buffer.value = self.names[device.value].encode()
        return 0


@pytest.fixture
def fresh_gpu_name():
    runtime._gpu_name.cache_clear()
    yield
    runtime._gpu_name.cache_clear()


def test_the_gpu_is_the_one_cuda_calls_device_id(fresh_gpu_name, monkeypatch):
    """PCI order (/proc) would name the H100; CUDA's device 0 is the H200."""
    monkeypatch.setattr(runtime, "_load_cuda_driver", lambda: _FakeDriver(["NVIDIA H200", "NVIDIA H100 80GB HBM3"]))
    monkeypatch.setattr(runtime, "_proc_gpu_models", lambda: ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
    assert runtime.device_name("cuda") == "NVIDIA H200"
    runtime._gpu_name.cache_clear()
    monkeypatch.setattr(runtime, "CUDA_DEVICE_ID", 1)
    assert runtime.device_name("cuda") == "NVIDIA H100 80GB HBM3"
    assert runtime.cuda_options("timing")["device_id"] == "1"


@pytest.mark.parametrize("models, visible, expected", [
    (["NVIDIA H200"], None, "NVIDIA H200"),
    (["NVIDIA H200", "NVIDIA H200"], "1", "NVIDIA H200"),
    (["NVIDIA H100 80GB HBM3", "NVIDIA H200"], None,
     "unknown NVIDIA GPU (one of 2: NVIDIA H100 80GB HBM3, NVIDIA H200)"),
    (["NVIDIA H200"], "", "unknown NVIDIA GPU (CUDA_VISIBLE_DEVICES hides every GPU)"),
    ([], None, "unknown NVIDIA GPU"),
])
def test_without_the_driver_the_name_is_only_given_when_unambiguous(fresh_gpu_name, monkeypatch, models, visible,
                                                                    expected):
    monkeypatch.setattr(runtime, "_load_cuda_driver", lambda: None)
    monkeypatch.setattr(runtime, "_proc_gpu_models", lambda: models)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert runtime.device_name("cuda") == expected


@pytest.fixture
def h200_profile(tmp_path, monkeypatch):
    """A CUDA profile 'shipped' for an H200 (none ships yet): the CPU fit, relabelled, in a temp folder."""
    from gconv_rewrite import cost
    with open(os.path.join(cost._PROFILES, "cpu.json")) as f:
        data = json.load(f)
    data.update(provider="cuda", device="NVIDIA H200", note="test profile")
    with open(tmp_path / "cuda-h200.json", "w") as f:
        json.dump(data, f)
    monkeypatch.setattr(cost, "_PROFILES", str(tmp_path))
    cost.load_profile.cache_clear()
    yield "NVIDIA H200"
    cost.load_profile.cache_clear()


def test_planning_for_a_named_gpu_uses_its_shipped_profile(h200_profile):
    model = MODELS / "resnext_emulated_tf.onnx"
    report = gr.inspect(model, "cuda", device="nvidia h200")
    assert "planning for NVIDIA H200 as asked (--device), not run here" in report.cost_model
    assert {f.prediction.basis for f in report.findings} == {"calibrated"}
    assert "planning for NVIDIA H200" in report.findings[0].prediction.source


def test_the_only_shipped_cuda_profile_is_used_when_no_gpu_runs_here(h200_profile, monkeypatch):
    monkeypatch.setattr(runtime, "_cuda_problem", lambda: "no NVIDIA GPU found")
    result = gr.rewrite(MODELS / "resnext_emulated_tf.onnx", provider="cuda", verify_result=False)
    assert "the only GPU model with a shipped CUDA profile" in result.planner
    assert all(d.prediction.basis == "calibrated" for d in result.decisions if d.prediction)


def test_without_a_matching_profile_planning_for_cuda_stays_on_the_prior(monkeypatch):
    monkeypatch.setattr(runtime, "_cuda_problem", lambda: "no NVIDIA GPU found")
    report = gr.inspect(MODELS / "resnext_emulated_tf.onnx", "cuda")
    assert {f.prediction.basis for f in report.findings} == {"prior"}
    with pytest.raises(GconvError, match="--device 'NVIDIA B200': no CUDA profile ships for that GPU model"):
        gr.inspect(MODELS / "resnext_emulated_tf.onnx", "cuda", device="NVIDIA B200")


@pytest.mark.parametrize("args, message", [
    (["inspect", MODELS / "resnext_emulated_tf.onnx", "--provider", "cpu", "--device", "NVIDIA H200"],
     "needs --provider cuda"),
    (["inspect", MODELS / "resnext_emulated_tf.onnx", "--provider", "cuda", "--device", "NVIDIA A100"],
     "shipped: 'NVIDIA H200'"),
])
def test_device_misuse_is_one_line(h200_profile, args, message):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output


def test_rewrite_plans_for_the_named_gpu_and_says_so(h200_profile, tmp_path):
    out = tmp_path / "out.onnx"
    args = [MODELS / "resnext_emulated_tf.onnx", "-o", out, "--provider", "cuda", "--no-verify", "-v",
            "--device", "NVIDIA H200"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0 and out.exists(), result.output
    assert "planning for NVIDIA H200 as asked" in " ".join(result.output.split())
    verified = CliRunner().invoke(main, [str(a) for a in args if a != "--no-verify"])
    assert verified.exit_code == 2 and "use it with --no-verify" in verified.output


# -- settings (item 4): parity with TF32 off, timing and tuning as deployed ----------------------------

class _ClaimsCuda:
    """A real CPU session that reports CUDA: what a working CUDA session looks like to the tool."""

    def __init__(self, sess):
        self._real = sess

    def get_providers(self):
        return [CUDA, CPU]

    def __getattr__(self, name):
        return getattr(self._real, name)


class _HostRunner:
    """Runner without IO binding (no CUDA memory here); the timing harness around it is the real one."""

    def __init__(self, sess, feed, choice):
        self.sess, self.feed = sess, feed

    def __call__(self):
        self.sess.run(None, self.feed)


@pytest.fixture
def recorded_cuda_options(monkeypatch):
    options = []

    def create(source, opts, providers):
        options.append(dict(providers[0][1]))
        return _ClaimsCuda(ort.InferenceSession(source, opts, providers=[CPU]))

    monkeypatch.setattr(runtime, "_new_session", create)
    monkeypatch.setattr(runtime, "_cuda_problem", lambda: "")
    monkeypatch.setattr(runtime, "Runner", _HostRunner)
    return options


def test_parity_runs_without_tf32_and_timing_runs_as_deployed(recorded_cuda_options, model_pair):
    report = gr.verify(*model_pair, "cuda", rounds=3)
    assert [o["use_tf32"] for o in recorded_cuda_options] == ["0", "0", "1", "1"]  # 2 parity, then 2 timing
    assert all(o["cudnn_conv_algo_search"] == "EXHAUSTIVE" and o["device_id"] == "0" for o in recorded_cuda_options)
    assert report.latency.settings["tf32"] is True and report.latency.settings["as_deployed"] is True
    assert "heuristic" in report.latency.settings["cudnn_conv_algo_search"]
    assert any("TF32 off for float32 parity" in note for note in report.notes)


def test_tuning_measures_as_deployed_and_its_cache_key_says_so(recorded_cuda_options):
    probe = geometry.Probe(32, 32, 4, (7, 7), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), "NOTSET", "float32", 1)
    tuning.measure(probe, runtime.choose_provider("cuda"), rounds=3)
    assert recorded_cuda_options and {o["use_tf32"] for o in recorded_cuda_options} == {"1"}
    assert "as deployed (TF32 on" in tune_cache.target_key("cuda") and "TF32" not in tune_cache.target_key("cpu")

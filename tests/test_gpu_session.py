"""The prepared GPU session (benchmarks/gpu_session.sh, calibrate.py), dry-run here on the CPU
provider under time limits (issue 17): results are kept when time runs out, failures are loud."""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gconv_rewrite import geometry, runtime, tuning

from helpers import ROOT

BENCH = ROOT / "benchmarks"
SHIPPED = ROOT / "gconv_rewrite" / "profiles" / "cpu.json"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def _session(out, limit_s, **env):
    return subprocess.run(["timeout", str(limit_s), "bash", str(BENCH / "gpu_session.sh")], capture_output=True,
                          text=True, cwd=ROOT, env=dict(ENV, GPU_SESSION_DRY_RUN="1", OUT=str(out), **env))


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_whole_session_dry_runs_on_cpu_within_its_limit(tmp_path):
    shipped = _digest(SHIPPED)
    start = time.monotonic()
    done = _session(tmp_path, 300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all steps passed" in done.stdout and not (tmp_path / "FAILED.txt").exists()
    assert time.monotonic() - start < 300
    profile = json.loads((tmp_path / "cpu.json").read_text())
    assert profile["calibrated"] and profile["native"]
    assert "cost model" in (tmp_path / "accuracy.txt").read_text()
    assert "smallest mutation error" in (tmp_path / "parity.txt").read_text()
    assert "models/resnext_emulated_tf.onnx" in (tmp_path / "end_to_end.txt").read_text()
    assert _digest(SHIPPED) == shipped  # a dry run never touches the shipped profile


def test_a_failed_calibration_is_loud_and_its_accuracy_is_not_scored(tmp_path):
    done = _session(tmp_path, 120, CAL_BUDGET="0", GPU_SESSION_STEPS="calibrate accuracy")
    assert done.returncode == 1
    assert "STEP FAILED: calibrate: exit 1" in done.stderr
    assert "STEP FAILED: accuracy: no fitted profile" in done.stderr
    assert "too few to fit" in (tmp_path / "calibrate.txt").read_text()
    assert (tmp_path / "FAILED.txt").read_text().count("STEP FAILED") == 2
    assert not (tmp_path / "cpu.json").exists() and not (tmp_path / "cost_accuracy_cpu.csv").exists()


def _calibrate(tmp_path, *args):
    csv_path, profile = tmp_path / "cal.csv", tmp_path / "profile.json"
    cmd = [sys.executable, str(BENCH / "calibrate.py"), "--provider", "cpu", "--tiny", "200", "--rounds", "3",
           "--no-wait", "--csv", str(csv_path), "--profile", str(profile), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV), \
        csv_path, profile


def _rows(path) -> int:
    try:
        with open(path) as f:
            return max(0, sum(1 for _ in csv.reader(f)) - 1)
    except OSError:
        return 0


def test_calibration_stopped_by_sigterm_fits_what_was_measured(tmp_path):
    proc, csv_path, profile = _calibrate(tmp_path)
    deadline = time.monotonic() + 120
    while _rows(csv_path) < 20 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)  # rows appear as they are measured, not at the end
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    measured = _rows(csv_path)
    assert proc.returncode == 0, err[-2000:]
    assert 20 <= measured < 200 and f"SIGTERM: stopped after {measured} of 200" in err
    assert f"fitted on {measured} geometries" in out and json.loads(profile.read_text())["native"]


def test_calibration_stops_measuring_within_its_budget(tmp_path):
    start = time.monotonic()
    proc, csv_path, profile = _calibrate(tmp_path, "--budget-s", "6")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "time budget of 6s reached" in err and 0 < _rows(csv_path) < 200
    assert time.monotonic() - start < 6 + 20  # start-up and the fit included
    assert f"fitted on {_rows(csv_path)} geometries" in out


@pytest.mark.parametrize("script", ["calibrate", "cost_accuracy"])
def test_cuda_measurements_do_not_wait_for_a_quiet_cpu(script, monkeypatch, tmp_path):
    """Other processes' CPU load says nothing about GPU kernels: on CUDA the wait is skipped."""
    monkeypatch.syspath_prepend(str(BENCH))
    module = __import__(script)
    cuda = runtime.ProviderChoice("cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"), "simulated")
    monkeypatch.setattr(runtime, "choose_provider", lambda provider: cuda)
    monkeypatch.setattr(runtime, "_gpu_name", lambda: "NVIDIA H200")

    def no_wait(*args, **kwargs):
        raise AssertionError("waited for a quiet CPU on CUDA")

    def measure(probe, choice, rounds=9):
        assert choice.name == "cuda"
        return tuning.Measurement(probe.key(), {f: 1.0 for f in geometry.FORMS})

    monkeypatch.setattr(tuning, "wait_for_quiet", no_wait)
    monkeypatch.setattr(tuning, "measure", measure)
    path = str(tmp_path / "m.csv")
    if script == "calibrate":
        assert module.measure_all(path, module.tiny_grid(3), 3, provider="cuda") == 3
    else:
        module.measure_all(path, 3, "cuda", every=50)
    assert _rows(path) >= 3


def test_without_cuda_the_real_session_stops_at_once_and_says_why(tmp_path):
    if runtime.cuda_runs_here():
        pytest.skip("CUDA runs here: the real session would measure")
    done = subprocess.run(["timeout", "120", "bash", str(BENCH / "gpu_session.sh")], capture_output=True, text=True,
                          cwd=ROOT, env=dict(ENV, OUT=str(tmp_path), GPU_SESSION_STEPS="env calibrate"))
    assert done.returncode == 2 and "STEP FAILED: env" in done.stderr
    assert "error: --provider cuda:" in (tmp_path / "env.txt").read_text()
    assert not (tmp_path / "calibrate.txt").exists()  # nothing measured on a substitute provider

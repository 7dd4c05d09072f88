"""What planning rests on (issue 16): machine classes, this device's calibration, auto-tuning, `calibrate`.

Nothing here depends on the host CPU: devices are given by name, and where a test needs "this
machine" to be uncalibrated it names this machine (runtime.device_name) a test CPU.
"""

import csv
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from test_cost import probe, synthetic_rows

import gconv_rewrite as gr
from gconv_rewrite import basis, calibration, cost, cost_fit, geometry, runtime
from gconv_rewrite.cli import main

from helpers import MODELS, ROOT

ZEN3 = "AMD EPYC (family 25 model 1) AVX2, 2 threads"
ZEN5 = "AMD EPYC (family 26 model 2) AVX-512, 2 threads"
TEST_CPU = "Test CPU (family 1 model 2) AVX2, 2 threads"


@pytest.fixture
def unpinned(monkeypatch):
    """The basis as a user gets it: no profile pinned."""
    monkeypatch.delenv("GCONV_REWRITE_PROFILE", raising=False)


@pytest.fixture
def test_cpu(monkeypatch, unpinned):
    """This machine, renamed: a device no shipped profile or cached measurement was made on."""
    real = runtime.device_name
    monkeypatch.setattr(runtime, "device_name", lambda choice: TEST_CPU if (
        choice if isinstance(choice, str) else choice.name) == "cpu" else real(choice))
    monkeypatch.delenv("GCONV_REWRITE_AUTOTUNE", raising=False)


def test_machine_class_is_read_from_the_device_text():
    zen5 = basis.machine_of(ZEN5)
    assert (zen5.isa, zen5.threads, zen5.block, zen5.family) == ("AVX-512", 2, 16, "AMD EPYC family 26")
    intel = basis.machine_of("Intel(R) Xeon(R) Platinum (family 6 model 167) AVX-512, 2 threads")
    assert intel.isa == "AVX-512" and intel.family.startswith("Intel(R) Xeon(R) Platinum family 6")
    arm = basis.machine_of("aarch64, 4 threads")
    assert (arm.isa, arm.threads, arm.block) == ("", 4, 8)


@pytest.mark.parametrize("device, shipped, block", [
    ("Intel(R) Xeon(R) (family 6 model 167) AVX-512, 2 threads", ZEN5, 16),
    ("AMD EPYC (family 25 model 17) AVX-512, 2 threads", ZEN5, 16),
    ("AMD EPYC (family 23 model 49) AVX2, 4 threads", ZEN3, 8)])
def test_another_machine_gets_the_profile_of_its_class_and_its_kernel_path_flag(unpinned, device, shipped, block):
    chosen = basis.select("cpu", device)
    assert chosen.profile.device == shipped and not chosen.this_device
    assert chosen.profile.block == block  # the NCHWc flag of the profile's machine, never the host's
    assert "no calibration for this device" in chosen.why and basis.machine_of(device).isa in chosen.why
    pred = chosen.profile.choose(probe(cin=256, cout=256, g=8, size=28, k=5, s=2, n=8), current_device=device)
    assert pred.basis == "similar" and chosen.profile.device in pred.source and chosen.why in pred.source


def test_the_profiles_own_machine_is_calibrated_and_an_unknown_class_keeps_native(unpinned):
    exact = basis.select("cpu", ZEN3)
    assert exact.this_device and exact.profile.choose(probe(), current_device=ZEN3).basis == "calibrated"
    arm = basis.select("cpu", "aarch64, 4 threads")
    big = probe(cin=256, cout=256, g=8, size=28, k=5, s=2, n=8)
    pred = arm.profile.choose(big, current_device="aarch64, 4 threads")
    assert not arm.this_device and pred.basis == "prior" and pred.form == "native"
    assert "no shipped profile of its class" in arm.why


def _user_profile(device: str, ort_version: str | None = None) -> str:
    """A fitted profile saved where `calibrate` keeps this device's calibration; returns its path."""
    profile = cost_fit.fit(synthetic_rows(), "cpu", device, ort_version or runtime.ort_version(), block=16)
    path = basis.user_paths("cpu", device)[1]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    profile.save(path)
    return path


def test_this_devices_calibration_wins_and_bad_files_are_one_line_warnings(unpinned):
    device = "AMD EPYC (family 25 model 17) AVX-512, 2 threads"
    path = _user_profile(device)
    mine = basis.select("cpu", device)
    assert mine.this_device and mine.profile.device == device and not mine.warnings
    assert "calibrated on this device by `gconv-rewrite calibrate`" in mine.why
    assert mine.profile.choose(probe(cin=128, cout=128, g=16, size=20, k=5), current_device=device).form == "split"
    cases = {"damaged": lambda: open(path, "wb").write(b"\x00{not json"),
             "stale (onnxruntime 0.1": lambda: _user_profile(device, "0.1"),
             "measured on " + ZEN3: lambda: open(path, "w").write(open(_user_profile(ZEN3)).read())}
    for message, damage in cases.items():
        damage()
        fallback = basis.select("cpu", device)
        assert not fallback.this_device and fallback.profile.device == ZEN5  # the class profile, not the file
        assert len(fallback.warnings) == 1 and message in fallback.warnings[0] and path in fallback.warnings[0]
        assert "\n" not in fallback.warnings[0]


def test_a_damaged_calibration_is_a_warning_in_the_reports_not_a_traceback(test_cpu):
    path = basis.user_paths("cpu", TEST_CPU)[1]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write('{"schema": "gconv-rewrite/cost-profile", "version": 1, "provider": "cpu"')
    out = CliRunner().invoke(main, ["inspect", str(MODELS / "resnext_native.onnx"), "--provider", "cpu"])
    assert out.exit_code == 0 and "Traceback" not in out.output
    assert f"calibration {path} ignored: damaged" in " ".join(out.output.split())
    assert "cost model: cpu profile of another machine" in out.output  # and says what it fell back to


def test_a_named_profile_plans_for_that_machine_and_bad_names_are_errors(unpinned):
    model = str(MODELS / "resnext_native.onnx")
    out = CliRunner().invoke(main, ["inspect", model, "--provider", "cpu", "--profile", "cpu-zen5-avx512"])
    assert out.exit_code == 0 and "family 26 model 2" in out.output and "--profile cpu-zen5-avx512" in out.output
    for name, message in (("nonsense", "no such profile (shipped: cpu, cpu-zen5-avx512"),
                          (str(MODELS / "resnext_native.onnx"), "not a readable cost profile")):
        out = CliRunner().invoke(main, ["inspect", model, "--provider", "cpu", "--profile", name])
        assert out.exit_code == 2 and message in out.output and len(out.output.strip().splitlines()) == 1


def test_the_default_command_tunes_first_on_an_uncalibrated_device_once(test_cpu, tmp_path):
    model = str(MODELS / "resnext_native.onnx")
    first = gr.rewrite(model, provider="cpu", rounds=3)
    assert first.tuning is not None and "this device is not calibrated" in first.tuning.why
    assert [e.cached for e in first.tuning.entries] == [False, False] and not first.tuning.over_budget
    assert all(d.prediction.basis == "measured" for d in first.decisions)
    second = gr.rewrite(model, provider="cpu", rounds=3)
    assert [e.cached for e in second.tuning.entries] == [True, True]  # nothing measured again
    assert [d.prediction.form for d in second.decisions] == [d.prediction.form for d in first.decisions]
    for kwargs in ({"auto_tune": False}, {"verify_result": False}, {"profile": "cpu"}):
        if os.path.exists(os.environ["GCONV_REWRITE_CACHE"]):
            os.unlink(os.environ["GCONV_REWRITE_CACHE"])
        result = gr.rewrite(model, provider="cpu", rounds=3, **kwargs)
        assert result.tuning is None and all(d.prediction.basis != "measured" for d in result.decisions), kwargs


def test_auto_tuning_keeps_to_its_budget_and_says_what_it_left(test_cpu):
    report = gr.tune(str(MODELS / "resnext_native.onnx"), "cpu", rounds=3, budget_s=0.0)
    assert len(report.entries) + len(report.over_budget) == 2 and len(report.over_budget) >= 1
    assert "not measured (time budget)" in " ".join(report.lines())
    out = CliRunner().invoke(main, [str(MODELS / "resnext_native.onnx"), "-o", "x.onnx", "--tune", "--no-tune"])
    assert out.exit_code == 2 and "--tune and --no-tune exclude each other" in out.output


def test_calibrate_resumes_fits_and_is_used_from_then_on(test_cpu):
    csv_path, profile_path = basis.user_paths("cpu", TEST_CPU)
    os.makedirs(os.path.dirname(csv_path), exist_ok=True)
    with open(csv_path, "w", newline="") as f:  # an interrupted earlier run: 72 geometries measured
        out = csv.writer(f)
        out.writerow(calibration.CSV_HEADER)
        for p, t in synthetic_rows():
            out.writerow([p.key()] + [f"{t[form]:.6f}" for form in geometry.FORMS] + ["0.00", ""])
    with open(calibration.machine_path(csv_path), "w") as f:
        json.dump(calibration.machine_record(runtime.choose_provider("cpu")), f)
    report = calibration.calibrate("cpu", count=1, rounds=3)
    assert (report.measured_now, report.measured_total, report.profile) == (1, 73, profile_path)
    again = CliRunner().invoke(main, ["calibrate", "--provider", "cpu", "--count", "1", "--rounds", "3", "--json"])
    assert again.exit_code == 0 and json.loads(again.output)["measured_now"] == 0  # resumed: nothing left to do
    chosen = basis.select("cpu")
    assert chosen.this_device and chosen.profile.device == TEST_CPU and len(chosen.profile.points) == 73
    result = gr.rewrite(str(MODELS / "resnext_native.onnx"), provider="cpu", rounds=3)
    assert result.tuning is None and "calibrated on this device" in result.planner  # no auto-tune once calibrated


def test_calibrate_refuses_meaningless_arguments():
    out = CliRunner().invoke(main, ["calibrate", "--minutes", "0"])
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1


@pytest.mark.parametrize("csv_name, profile_name", [("cpu_calibration_zen5.csv", "cpu-zen5-avx512")])
def test_the_zen5_profile_is_reproducible_from_its_converted_measurements(csv_name, profile_name):
    path = str(ROOT / "benchmarks" / "data" / csv_name)
    refit, shipped = calibration.fit_csv(path, "cpu"), cost.load_profile(profile_name)
    np.testing.assert_allclose(np.array(refit.points), np.array(shipped.points), atol=1e-5)  # nan == nan
    assert (refit.device, refit.block, refit.ort_version) == (shipped.device, shipped.block, shipped.ort_version)
    for p, _ in cost_fit.read_measurements(path)[::25]:
        assert refit.native_ms(p) == pytest.approx(shipped.native_ms(p), rel=1e-9)
    held_out = {line.split(",")[1] for line in open(ROOT / "benchmarks" / "data" / "cost_accuracy_cpu.csv")}
    assert not held_out & {p.key() for p, _ in cost_fit.read_measurements(path)}  # nothing held out is fitted on


def test_an_unusable_tune_cache_is_a_warning_and_the_profile_decides(test_cpu):
    with open(os.environ["GCONV_REWRITE_CACHE"], "wb") as f:
        f.write(b"\x00{not json")
    result = gr.rewrite(str(MODELS / "resnext_native.onnx"), provider="cpu", rounds=3)
    assert result.tuning is None and all(d.prediction.basis == "similar" for d in result.decisions)
    assert any(w.startswith("not tuned first (tune cache") and "unreadable" in w for w in result.warnings)
    assert open(os.environ["GCONV_REWRITE_CACHE"], "rb").read() == b"\x00{not json"  # never overwritten


def test_the_sweep_conversion_keeps_the_geometry_and_drops_held_out_rows(tmp_path):
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import convert_sweep
    finally:
        sys.path.pop(0)
    sweep = tmp_path / "sweep.csv"
    sweep.write_text("N,C,Co,G,Cig,H,W,k,stride,t_native_ms,t_dw_ms,t_dense_ms,t_split_ms,best\n"
                     "8,64,32,16,4,28,28,5,2,1.5,3.0,nan,1.2,split\n"  # Co != C, a skipped form
                     "1,128,128,32,4,56,56,3,1,1.3,8.0,8.4,2.5,native\n")  # ResNeXt-50's first conv: held out
    out = tmp_path / "converted.csv"
    assert convert_sweep.convert(str(sweep), str(out)) == (1, 1)
    (p, t), = cost_fit.read_measurements(str(out))
    assert p.key() == "float32 N8 Cin64 Cout32 G16 in28x28 k5x5 s2x2 d1x1 p2x2x2x2" and p.output_spatial() == (14, 14)
    assert t["split"] == 1.2 and t["dense"] != t["dense"]  # columns by name, nan kept
    assert calibration.read_machine(str(out))["block"] == 16

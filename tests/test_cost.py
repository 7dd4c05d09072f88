"""The cost model, the planner and tuning: choices, their reasons, the cache, and the forms they produce."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

import gconv_rewrite as gr
from gconv_rewrite import cost, cost_fit, geometry, lowering, runtime, tune_cache
from gconv_rewrite.rewrite import rewrite_model
from gconv_rewrite.samples import grouped_conv_model

from helpers import MODELS, max_rel_err, run_ort


def probe(cin=64, cout=64, g=16, size=28, k=3, s=1, n=1):
    return geometry.Probe(cin, cout, g, (size, size), (k, k), (s, s), (1, 1), (k // 2,) * 4, "NOTSET", "float32", n)


def synthetic_rows():
    """A world where split is 2x faster than native for big per-group kernels and 3x slower otherwise."""
    rows = []
    for cig in (2, 4, 8, 16):
        for k in (1, 3, 5):
            for size in (14, 28, 56):
                for n in (1, 8):
                    p = probe(cin=cig * 16, cout=cig * 16, g=16, size=size, k=k, n=n)
                    native = 1e-5 * cost.macs(p) ** 0.9
                    split = native * (0.5 if cig * k * k >= 72 else 3.0)
                    rows.append((p, {"native": native, "dw": native * 2.5, "split": split, "dense": native * 4}))
    return rows


def test_probe_key_round_trip_and_output_size_matches_onnxruntime():
    for p in (probe(), probe(k=5, s=2, n=8),
              geometry.Probe(24, 48, 3, (17, 9), (3, 1), (2, 1), (1, 1), None, "SAME_UPPER", "float32", 2),
              geometry.Probe(24, 48, 3, (17, 9), (3, 1), (2, 1), (2, 1), (1, 0, 2, 1), "NOTSET", "float32", 2),
              geometry.Probe(24, 48, 3, (17,), (3,), (2,), (1,), None, "VALID", "float16", 1)):
        assert geometry.parse_probe(p.key()) == p
        model = lowering.probe_model(p)
        x = np.zeros((p.batch, p.c_in, *p.spatial), np.dtype(p.dtype))
        (y,) = run_ort(model, {"x": x}).values()
        assert y.shape[2:] == p.output_spatial()


def test_probe_forms_are_exact_and_written_by_the_rewriter():
    p = probe(cin=32, cout=32, g=4, size=10, k=3)
    models = lowering.form_models(p)
    assert set(models) == set(geometry.FORMS)
    x = np.random.default_rng(0).standard_normal((1, 32, 10, 10)).astype(np.float32)
    ref = run_ort(models["native"], {"x": x})["y"]
    ops = {f: {n.op_type for n in m.graph.node} for f, m in models.items()}
    assert ops["dw"] >= {"Conv", "ReduceSum"} and ops["split"] >= {"Split", "Concat"} and ops["dense"] == {"Conv"}
    for form, m in models.items():
        assert max_rel_err(run_ort(m, {"x": x})["y"], ref) < 3e-6, form


def test_fit_learns_where_split_wins_and_refuses_small_gains():
    profile = cost_fit.fit(synthetic_rows(), "cpu", "test device", "0", block=16)
    big = profile.choose(probe(cin=128, cout=128, g=16, size=20, k=5), current_device="test device")  # Cig=8, k=5
    small = profile.choose(probe(cin=64, cout=64, g=16, size=20, k=1), current_device="test device")
    assert big.form == "split" and big.basis == "calibrated"
    assert math.isclose(big.times_ms["split"] / big.times_ms["native"], 0.5, rel_tol=1e-6)
    assert "split predicted" in big.why and "next native" in big.why
    assert small.form == "native"
    # a predicted gain below the margin keeps native, and says so
    rows = [(p, dict(t, split=t["native"] * 0.97)) for p, t in synthetic_rows()]
    close = cost_fit.fit(rows, "cpu", "test device", "0", block=16).choose(probe(cin=128, cout=128, g=16, size=20, k=5))
    assert close.form == "native" and close.why.startswith("native kept: split predicted only 1.03x faster")
    # a form the caller cannot write is never chosen
    assert profile.choose(probe(cin=128, cout=128, g=16, size=20, k=5), available=("native", "dw")).form == "native"


def test_profile_round_trips_and_other_devices_get_the_prior(tmp_path):
    profile = cost_fit.fit(synthetic_rows(), "cpu", "test device", "0", block=16)
    path = tmp_path / "p.json"
    profile.save(str(path))
    again = cost.Profile.from_dict(json.loads(path.read_text()))
    p = probe(cin=128, cout=128, g=16, size=20, k=5)
    assert again.predict(p) == pytest.approx(profile.predict(p), rel=1e-4)
    elsewhere = again.choose(p, current_device="another CPU")
    assert elsewhere.basis == "prior" and elsewhere.form == "native" and "uncalibrated" in elsewhere.why
    assert "not this device: another CPU" in elsewhere.source
    with pytest.raises(ValueError, match="not a gconv-rewrite cost profile"):
        cost.Profile.from_dict({"schema": "other"})


def test_shipped_cpu_profile_and_the_cuda_prior():
    cpu = cost.load_profile("cpu")
    assert cpu.calibrated and len(cpu.points) >= 300 and set(cpu.native) == {"nchwc", "plain"}
    assert cpu.device and cpu.ort_version and cpu.block in (8, 16)
    times = cpu.predict(probe())
    assert set(times) == set(geometry.FORMS) and all(t > 0 for t in times.values())
    cuda = cost.load_profile("cuda")
    pred = cuda.choose(probe(), current_device=runtime.device_name("cuda"))
    assert not cuda.calibrated and pred.basis == "prior" and pred.form == "native"
    assert "uncalibrated" in cuda.describe()
    # the roofline prior charges the emulation its Cig-times larger intermediate
    assert pred.times_ms["dw"] > pred.times_ms["native"]


def test_reports_that_rely_on_the_cuda_prior_say_uncalibrated():
    """Planning for CUDA (no calibration yet): every row and the summary say the numbers are a prior."""
    from gconv_rewrite import model_io
    from gconv_rewrite.report import RewriteResult
    model, info = model_io.load(MODELS / "resnext_emulated_tf.onnx")
    planner = cost.Planner("cuda")
    decisions = rewrite_model(model, "auto", None, info.value_infos, planner)
    result = RewriteResult(model, decisions, "auto", info, provider="cuda", planner=planner.describe())
    assert [d.action for d in decisions] == ["fused", "fused"]  # the emulations still become one Conv
    assert all(d.prediction.basis == "prior" and "uncalibrated prior" in d.reason for d in decisions)
    assert any("ms predicted, uncalibrated (" in line for line in result.summary())
    assert "uncalibrated" in result.planner and "uncalibrated" in decisions[0].prediction.times_line()


def _forced_profile(winner: str) -> cost.Profile:
    """A calibrated profile, for this device, in which `winner` is 2x faster than native everywhere."""
    rows = [(p, {f: t["native"] * (0.5 if f == winner else 3.0) if f != "native" else t["native"] for f in t})
            for p, t in synthetic_rows()]
    return cost_fit.fit(rows, "cpu", runtime.device_name("cpu"), runtime.ort_version(), block=runtime.nchwc_block())


@pytest.mark.parametrize("winner", ["split", "dense"])
def test_auto_writes_the_predicted_winner_and_it_is_exact(winner):
    sample = grouped_conv_model("native", in_channels=32, out_channels=32, groups=4, spatial=(12, 12), bias=True,
                                batch=1)
    model = onnx.ModelProto()
    model.CopyFrom(sample.model)
    planner = tune_cache.cached_planner("cpu", profile=_forced_profile(winner))
    (d,) = rewrite_model(model, "auto", planner=planner)
    assert d.action == "converted" and d.form == winner and d.prediction.form == winner
    assert f"{winner} predicted" in d.reason
    feed = {sample.model.graph.input[0].name:
            np.random.default_rng(1).standard_normal((1, 32, 12, 12)).astype(np.float32)}
    name = sample.model.graph.output[0].name
    assert max_rel_err(run_ort(model, feed)[name], run_ort(sample.model, feed)[name]) < 3e-6


def test_auto_keeps_an_emulation_predicted_fastest_and_fuses_otherwise():
    sample = grouped_conv_model("nchw_reducesum", in_channels=32, out_channels=32, groups=4, spatial=(12, 12), batch=1)
    model = onnx.ModelProto()
    model.CopyFrom(sample.model)
    (d,) = rewrite_model(model, "auto", planner=tune_cache.cached_planner("cpu", profile=_forced_profile("dw")))
    assert d.action == "kept" and d.form == "dw" and "dw predicted" in d.reason
    assert model.SerializeToString() == sample.model.SerializeToString()
    (d,) = rewrite_model(model, "auto", planner=tune_cache.cached_planner("cpu",
                                                                                 profile=_forced_profile("native")))
    assert d.action == "fused" and d.form == "native"


def test_tune_measures_caches_and_rewrite_uses_the_measurements(tmp_path):
    cache = str(tmp_path / "cache.json")
    path = str(MODELS / "resnext_native.onnx")
    first = gr.tune(path, "cpu", rounds=3, cache=cache)
    assert first.entries and not any(e.cached for e in first.entries)
    for e in first.entries:
        assert set(e.times_ms) == set(geometry.FORMS) and all(t and t > 0 for t in e.times_ms.values())
        assert e.best == min(e.times_ms, key=e.times_ms.get)
    data = json.loads(open(cache).read())
    (target,) = data["targets"]
    assert runtime.device_name("cpu") in target and runtime.ort_version() in target and "| cpu |" in target
    assert set(data["targets"][target]) == {e.probe for e in first.entries}
    again = gr.tune(path, "cpu", rounds=3, cache=cache)
    assert all(e.cached for e in again.entries)
    assert [e.times_ms for e in again.entries] == [e.times_ms for e in first.entries]
    result = gr.rewrite(path, verify_result=False, provider="cpu", cache=cache)
    for d in result.decisions:
        entry = next(e for e in first.entries if d.node in e.nodes)
        assert d.prediction.basis == "measured" and d.prediction.measured_ms == entry.times_ms
        t = entry.times_ms
        margin = cost.load_profile("cpu").margin
        assert d.form == (entry.best if t["native"] > (1 + margin) * t[entry.best] else "native")
    report = gr.inspect(path, "cpu", cache=cache)
    assert all(f.prediction.basis == "measured" for f in report.findings)


def test_time_rotated_rotates_the_order():
    calls = []
    runs = [lambda i=i: calls.append(i) for i in range(3)]
    times, k, warm = runtime.time_rotated(runs, rounds=6, min_round_s=0.0)
    assert [len(t) for t in times] == [6, 6, 6] and k == 3
    timed = calls[sum(warm):]
    firsts = [timed[r * 3 * k] for r in range(6)]
    assert set(firsts) == {0, 1, 2}  # every runner goes first in some round
    followers = {(timed[r * 3 * k + k - 1], timed[r * 3 * k + k]) for r in range(6)}
    assert len(followers) >= 4  # and follows more than one other runner


def test_cli_tune_and_verbose_rewrite_through_the_console_script(tmp_path):
    exe = [shutil.which("gconv-rewrite", path=os.path.dirname(sys.executable)) or "gconv-rewrite"]
    cache = str(tmp_path / "c.json")
    model = str(MODELS / "resnext_emulated_nchw.onnx")
    out = subprocess.run(exe + ["tune", model, "--provider", "cpu", "--rounds", "3", "--cache", cache],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "measured, 0 from the cache" in out.stdout and out.stderr == ""
    out = subprocess.run(exe + ["tune", model, "--provider", "cpu", "--cache", cache, "--json"],
                         capture_output=True, text=True, timeout=300)
    data = json.loads(out.stdout)
    assert all(e["cached"] for e in data["entries"])
    out = subprocess.run(exe + [model, "-o", str(tmp_path / "o.onnx"), "--no-verify", "-v", "--provider", "cpu",
                                "--cache", cache], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "measured ms: native" in out.stdout and "tuned on this machine" not in out.stderr
    assert "(predicted: native" in out.stdout  # both numbers, as the report promises


def test_shipped_profile_is_reproducible_from_the_shipped_measurements(tmp_path):
    """benchmarks/calibrate.py --fit-only on benchmarks/data gives the profile the package ships."""
    from helpers import ROOT
    out = tmp_path / "cpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibrate.py"), "--fit-only",
                           "--profile", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    refit = cost.Profile.from_dict(json.loads(out.read_text()))
    shipped = cost.load_profile("cpu")
    assert refit.points == shipped.points and refit.native.keys() == shipped.native.keys()
    assert (refit.device, refit.block, refit.ort_version) == (shipped.device, shipped.block, shipped.ort_version)
    # Coefficients of collinear terms (Cig == Cog on most rows) differ between BLAS builds at 1e-5; the
    # predictions they make do not: compare what the profile is used for, on every measured geometry.
    for p, _ in cost_fit.read_measurements(str(ROOT / "benchmarks" / "data" / "cpu_calibration.csv")):
        assert refit.native_ms(p) == pytest.approx(shipped.native_ms(p), rel=1e-9)


def test_cost_model_meets_its_accuracy_targets_on_the_recorded_held_out_measurements():
    """The held-out measurements of benchmarks/data, judged with the shipped profile (RESULTS.md)."""
    from helpers import ROOT
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cost_accuracy
    finally:
        sys.path.pop(0)
    summary = cost_accuracy.evaluate(str(ROOT / "benchmarks" / "data" / "cost_accuracy_cpu.csv"),
                                     cost.load_profile("cpu"))
    model = summary["cost model"]
    assert model["n"] == 136
    assert model["within_5pct"] >= 0.95 and model["geomean_slowdown"] <= 0.02
    assert model["geomean_slowdown"] <= summary["always native"]["geomean_slowdown"]


def test_tune_refuses_a_foreign_or_unwritable_cache_before_measuring(tmp_path):
    from click.testing import CliRunner

    from gconv_rewrite.cli import main
    model = str(MODELS / "resnext_native.onnx")
    foreign = tmp_path / "report.json"
    foreign.write_text('{"schema": "something else"}')
    for cache, message in ((foreign, "is not a gconv-rewrite tune cache; not overwritten"),
                           (tmp_path / "garbage.json", "is unreadable"),
                           (tmp_path / "file" / "c.json", "cannot create the tune cache folder")):
        if cache.name == "garbage.json":
            cache.write_bytes(b"\x00{not json")
        (tmp_path / "file").write_text("a file where a folder should be")
        before = cache.read_bytes() if cache.exists() else None
        result = CliRunner().invoke(main, ["tune", model, "--provider", "cpu", "--cache", str(cache)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert (cache.read_bytes() if cache.exists() else None) == before
    # a rewrite only reads the cache: a foreign file is ignored, never written
    result = gr.rewrite(model, verify_result=False, provider="cpu", cache=str(foreign))
    assert all(d.prediction.basis != "measured" for d in result.decisions)
    assert foreign.read_text() == '{"schema": "something else"}'
    # ... but not silently: every report says the measurements were not used
    warning = f"tune cache {foreign} ignored: it is not a gconv-rewrite tune cache"
    assert result.warnings == [warning] and warning in " ".join(" ".join(result.summary()).split())
    assert gr.inspect(model, "cpu", cache=str(foreign)).warnings == [warning]
    # a file of the right version whose entries are damaged: also a warning, not a KeyError
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps({"version": tune_cache.CACHE_VERSION, "targets": {"t": {"p": {"bad": 1}}}}))
    assert "malformed entries" in gr.inspect(model, "cpu", cache=str(damaged)).warnings[0]


def test_the_api_refuses_meaningless_arguments_as_gconv_errors():
    model = str(MODELS / "resnext_native.onnx")
    for kwargs, message in ((dict(rounds=0), "rounds must be at least 3"), (dict(tolerance=-1.0), "tolerance must be"),
                            (dict(form="foo"), "form must be one of"), (dict(direction="sideways"), "direction must")):
        with pytest.raises(gr.GconvError, match=message):
            gr.rewrite(model, **kwargs)
    with pytest.raises(gr.GconvError, match="rounds must be at least 3"):
        gr.tune(model, rounds=0)


def test_uncalibrated_geometries_keep_native_and_say_so():
    """Only 2-D float32 convs are calibrated: 1-D/3-D and float16 get the prior (native kept)."""
    profile = cost.load_profile("cpu")
    here = runtime.device_name("cpu")
    for p in (geometry.Probe(32, 32, 4, (64,), (3,), (1,), (1,), (1, 1), "NOTSET", "float32", 1),
              geometry.Probe(32, 32, 4, (8, 8, 8), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1,) * 6, "NOTSET", "float32", 1),
              geometry.Probe(32, 32, 4, (16, 16), (3, 3), (1, 1), (1, 1), (1,) * 4, "NOTSET", "float16", 1)):
        pred = profile.choose(p, current_device=here)
        assert pred.basis == "prior" and pred.form == "native" and "not calibrated" in pred.source
        measured = profile.choose(p, measured={"native": 2.0, "dw": 1.0, "split": 3.0, "dense": 3.0},
                                  current_device=here)
        assert measured.basis == "measured" and measured.form == "dw"  # a measurement decides anyway


def test_the_work_behind_the_predictions_is_counted_exactly():
    """The explanation each report gives: bytes and FLOPs of every form relative to native."""
    # Cin = Cout = 32, G = 8 (Cig = Cog = 4), 3x3 'same' conv on 8x8: input and output the same size.
    p = geometry.Probe(32, 32, 8, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), "NOTSET", "float32", 1)
    w = cost.work(p)
    x = y = 32 * 8 * 8 * 4
    assert w["native"] == (1, 2.0 * 32 * 4 * 9 * 64, x + y)
    assert w["dw"][2] == x + 2 * (4 * y) + y  # the intermediate, Cig x the output, written and read once
    assert w["dense"][1] == 8 * w["native"][1] and w["split"] == (10, w["native"][1], 2 * (x + y))
    assert cost.explain_work(p) == ("dw moves 5.0x the bytes, split 2.0x the bytes in 10 nodes, "
                                    "dense does 8x the FLOPs of native")
    assert cost.explain_work(p, ("native", "dense")) == "dense does 8x the FLOPs of native"

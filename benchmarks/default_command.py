"""Does the DEFAULT command pick the fastest form on a machine it was never calibrated on? (issue 16, goal 1)

    python benchmarks/default_command.py --out benchmarks/data/default_command_<machine>.csv

1. For each network of the held-out set (benchmarks/cost_accuracy.py: ResNeXt-50/101, SE-ResNeXt,
   RegNetX/Y, ShuffleNet v1; 136 geometries, batch 1 and 8), one model holding its held-out convs
   side by side (one input and one output per conv, random weights), run through the default
   command exactly as a user runs it: `gr.rewrite(path)` (auto, verification and the never-regress
   guard on, auto-tuning on), with an empty tune cache and no calibration of this device, so the
   shipped profile of the closest machine class and the 12 s tuning budget apply. Recorded per
   conv: the form the command delivered (a reverted rewrite delivers native), and the tuning time.
2. Independently, afterwards: every form of every held-out geometry timed interleaved
   (cost_accuracy.measure_all, its own sessions and rounds), the yardstick.
3. Judged: delivered form within 5% of the measured fastest form, geometric-mean slowdown, worst;
   beside it the no-run picks (the profile chosen for this machine, each shipped profile) and
   always-native, on the same yardstick.

The first-run extra time is measured separately (--resnext50): the default command on a native
ResNeXt-50 32x4d (batch 1, 224) with an empty cache, again with the cache filled, and with --no-tune.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gconv_rewrite as gr  # noqa: E402
from gconv_rewrite import basis, cost, geometry, runtime, tuning  # noqa: E402

import cost_accuracy  # noqa: E402
import make_resnext  # noqa: E402

FORMS = geometry.FORMS


def layers_model(probes: list[geometry.Probe], seed: int = 0) -> onnx.ModelProto:
    """One model with every probe's grouped Conv side by side: input x{i} -> Conv -> output y{i}."""
    rng = np.random.default_rng(seed)
    nodes, inputs, outputs, inits = [], [], [], []
    for i, p in enumerate(probes):
        w = (rng.standard_normal((p.c_out, p.cig) + p.kernel) / math.sqrt(p.cig * math.prod(p.kernel)))
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(p.c_out).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [f"x{i}", f"w{i}", f"b{i}"], [f"y{i}"], name=f"conv{i}", group=p.group,
                                      kernel_shape=list(p.kernel), strides=list(p.strides), pads=list(p.pads)))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [p.batch, p.c_in, *p.spatial]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT,
                                                     [p.batch, p.c_out, *p.output_spatial()]))
    graph = helper.make_graph(nodes, "held_out_layers", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def networks() -> dict[tuple[str, int], list[geometry.Probe]]:
    """The held-out geometries grouped by (network, batch), as cost_accuracy.held_out() assigns them."""
    groups: dict[tuple[str, int], list[geometry.Probe]] = {}
    for name, p in cost_accuracy.held_out():
        groups.setdefault((name, p.batch), []).append(p)
    return groups


def run_default(workdir: str, out_csv: str, limit: int | None = None) -> None:
    """Step 1: the default command on every layers model; one CSV row per conv (its delivered form)."""
    with open(out_csv, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["model", "probe", "planned", "delivered", "basis", "action", "tune_s", "run_s", "verdict"])
        for (name, batch), probes in list(networks().items())[:limit]:
            path = os.path.join(workdir, "layers.onnx")
            onnx.save(layers_model(probes), path)
            tuning.wait_for_quiet()
            start = time.monotonic()
            result = gr.rewrite(path, provider="cpu")
            took = time.monotonic() - start
            by_node = {d.node: d for d in result.decisions}
            verdict = result.verification.latency.verdict if result.verification and result.verification.latency else ""
            for i, p in enumerate(probes):
                d = by_node[f"conv{i}"]
                delivered = "native" if d.action in ("kept", "reverted") else d.form
                out.writerow([name, p.key(), d.prediction.form, delivered, d.prediction.basis, d.action,
                              f"{result.tuning.seconds if result.tuning else 0:.2f}", f"{took:.2f}", verdict])
            f.flush()
            print(f"{name} N{batch}: {len(probes)} convs, {took:.1f} s "
                  f"(tuning {result.tuning.seconds if result.tuning else 0:.1f} s), "
                  f"{sum(d.action == 'converted' for d in result.decisions)} converted, {verdict}", file=sys.stderr)


def judge(default_csv: str, measured_csv: str) -> list[tuple[str, dict]]:
    """Step 3: every picker's ratio to the measured best, on the geometries measured."""
    measured = {row["probe"]: {f: float(row[f"t_{f}_ms"]) for f in FORMS} for row in csv.DictReader(open(measured_csv))}
    measured = {k: {f: t for f, t in v.items() if not math.isnan(t)} for k, v in measured.items()}
    rows = list(csv.DictReader(open(default_csv)))
    delivered = {row["probe"]: row["delivered"] for row in rows}
    planned = {row["probe"]: row["planned"] for row in rows}
    probes = {p.key(): p for _, p in cost_accuracy.held_out()}
    here = runtime.device_name("cpu")
    chosen = basis.select("cpu", here)
    pickers = {"default command: delivered (tuned, verified, never-regress guard)": lambda p, t: delivered[p.key()],
               "default command: planned (tuned picks before the guard)": lambda p, t: planned[p.key()],
               f"no run: {chosen.profile.device} profile (chosen here)":
                   lambda p, t: chosen.profile.choose(p, tuple(t), current_device=here).form,
               "no run: Zen 3 profile (cpu)": lambda p, t: cost.load_profile("cpu").choose(p, tuple(t)).form,
               "no run: Zen 5 profile (cpu-zen5-avx512)":
                   lambda p, t: cost.load_profile("cpu-zen5-avx512").choose(p, tuple(t)).form,
               "always native": lambda p, t: "native"}
    keys = [k for k in measured if k in delivered]
    results = []
    for name, pick in pickers.items():
        r = np.array([measured[k][pick(probes[k], measured[k])] / min(measured[k].values()) for k in keys])
        results.append((name, {"within_5pct": float(np.mean(r <= 1.05)),
                               "geomean": float(np.exp(np.mean(np.log(r))) - 1), "worst": float(r.max()), "n": len(r)}))
    return results


def first_run_extra(workdir: str) -> None:
    """The default command's tuning time on a native ResNeXt-50 32x4d: empty cache, filled cache, --no-tune."""
    path = os.path.join(workdir, "resnext50.onnx")
    make_resnext.main(["-o", path, "--batch", "1"])
    for label, kwargs in (("empty cache", {}), ("cached", {}), ("--no-tune", {"auto_tune": False})):
        tuning.wait_for_quiet()
        start = time.monotonic()
        result = gr.rewrite(path, provider="cpu", **kwargs)
        took = time.monotonic() - start
        tuned = result.tuning.summary() if result.tuning else "not tuned"
        print(f"ResNeXt-50, {label}: {took:.1f} s in all; {tuned}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="CSV of the default command's picks")
    parser.add_argument("--measured", default=None,
                        help="CSV of the independent measurements (default: OUT.measured.csv)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of the independent measurements")
    parser.add_argument("--every", type=int, default=1, help="measure every k-th geometry only (a shorter run)")
    parser.add_argument("--limit", type=int, default=None, help="first N (network, batch) models only (a try)")
    parser.add_argument("--step", choices=["all", "default", "measure", "judge", "resnext50"], default="all")
    args = parser.parse_args()
    measured = args.measured or os.path.splitext(args.out)[0] + ".measured.csv"
    for var in ("GCONV_REWRITE_PROFILE", "GCONV_REWRITE_AUTOTUNE"):
        os.environ.pop(var, None)
    with tempfile.TemporaryDirectory() as work:
        os.environ["GCONV_REWRITE_CACHE"] = os.path.join(work, "cache", "tune.json")  # empty; no calibration
        assert not basis.select("cpu").this_device, "this machine has a calibration: not the uncalibrated case"
        print(f"machine: {runtime.device_name('cpu')}; onnxruntime {runtime.ort_version()}", file=sys.stderr)
        if args.step in ("all", "resnext50"):
            first_run_extra(work)
        if args.step in ("all", "default"):
            run_default(work, args.out, args.limit)
        if args.step in ("all", "measure"):
            cost_accuracy.measure_all(measured, args.rounds, "cpu", args.every)
    if args.step in ("all", "judge", "measure"):
        print(f"| picker | within 5% of best | geomean slowdown | worst | n |  ({runtime.device_name('cpu')})")
        print("|---|---|---|---|---|")
        for name, s in judge(args.out, measured):
            print(f"| {name} | {100 * s['within_5pct']:.1f}% | {100 * s['geomean']:.2f}% | {s['worst']:.2f}x "
                  f"| {s['n']} |")


if __name__ == "__main__":
    main()

"""Leave-one-machine-out: how well does a profile fitted on one machine pick forms on another?

    python benchmarks/cross_machine.py [--extra NAME=CSV ...]

Pure computation on stored measurements (no timing). Machines and data:

- Zen 3 (AMD EPYC family 25 model 1, AVX2, 2 threads, onnxruntime 1.31.1): benchmarks/data/
  cpu_calibration.csv (540 grid geometries) and cost_accuracy_cpu.csv (136 held-out real layers);
- Zen 5 (AMD EPYC family 26 model 2, AVX-512, 2 threads, onnxruntime 1.32.0): benchmarks/data/
  cpu_calibration_zen5.csv (910 grid geometries, converted from ../shared/calib by convert_sweep.py);
- Zen 4 (AMD EPYC family 25 model 17, AVX-512, 2 threads, onnxruntime 1.31.1): benchmarks/data/
  cpu_calibration_zen4.csv (159 geometries measured by `gconv-rewrite calibrate` in 3 min, the one
  held-out geometry of its grid dropped) and cost_accuracy_zen4.csv (the 136 held-out layers);
- --extra: more measurements in the calibration or cost_accuracy CSV format (e.g. this machine's
  held-out measurements, written by cost_accuracy.py), judged by both profiles.

Each profile is fitted on one machine's calibration data and judged on every other machine's
measurements: the pick is within 5% of that machine's measured fastest form, and the geometric-mean
slowdown of the picks against always taking the fastest; "always native" beside it. Within one
machine, 5-fold cross-validation over its grid (fit on 4/5, judge the 5th) gives the reference.
"""

from __future__ import annotations

import argparse
import math
import os
import random

import numpy as np

from gconv_rewrite import calibration, cost, cost_fit, geometry

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
FORMS = geometry.FORMS


def rows_of(path: str) -> list[tuple[geometry.Probe, dict[str, float]]]:
    """(probe, measured ms per form) of a calibration or cost-accuracy CSV; forms not measured left out."""
    return [(p, {f: t for f, t in times.items() if not math.isnan(t)}) for p, times in cost_fit.read_measurements(path)
            if not math.isnan(times["native"])]


def judge(rows, pick) -> dict:
    """Share of picks within 5% of the measured best, geometric-mean slowdown vs the best, worst ratio."""
    ratios = np.array([t[pick(p, t)] / min(t.values()) for p, t in rows])
    return {"within_5pct": float(np.mean(ratios <= 1.05)), "geomean": float(np.exp(np.mean(np.log(ratios))) - 1),
            "worst": float(ratios.max()), "n": len(ratios)}


def profile_picker(profile: cost.Profile):
    """The profile's pick among the forms measured (as on its own machine: its block, its picks)."""
    return lambda p, t: profile.choose(p, available=tuple(t)).form


def native(p, t) -> str:
    return "native"


def cross_validated(path: str, folds: int = 5) -> dict:
    """Within one machine: fit on 4/5 of its grid, judge on the held fold; pooled over the folds."""
    machine = calibration.read_machine(path)
    raw = [(p, t) for p, t in cost_fit.read_measurements(path) if not math.isnan(t["native"])]
    rows = rows_of(path)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    pooled = []
    for k in range(folds):
        test = [rows[i] for i in order[k::folds]]
        held = set(order[k::folds])
        train = [raw[i] for i in order if i not in held]
        prof = cost_fit.fit(train, "cpu", machine["device"], machine["ort_version"], machine["block"])
        pick = profile_picker(prof)
        pooled += [t[pick(p, t)] / min(t.values()) for p, t in test]
    r = np.array(pooled)
    return {"within_5pct": float(np.mean(r <= 1.05)), "geomean": float(np.exp(np.mean(np.log(r))) - 1),
            "worst": float(r.max()), "n": len(r)}


def line(name: str, data: str, s: dict) -> str:
    return (f"| {name} | {data} | {100 * s['within_5pct']:.1f}% | {100 * s['geomean']:.2f}% | {s['worst']:.2f}x "
            f"| {s['n']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=CSV")
    args = parser.parse_args()
    fits = {"Zen 3 profile": os.path.join(DATA, "cpu_calibration.csv"),
            "Zen 5 profile": os.path.join(DATA, "cpu_calibration_zen5.csv"),
            "Zen 4 profile": os.path.join(DATA, "cpu_calibration_zen4.csv")}
    profiles = {name: calibration.fit_csv(path, "cpu") for name, path in fits.items()}
    judged = {"Zen 3 held-out layers": (os.path.join(DATA, "cost_accuracy_cpu.csv"), "Zen 3 profile"),
              "Zen 3 grid": (fits["Zen 3 profile"], "Zen 3 profile"),
              "Zen 5 grid": (fits["Zen 5 profile"], "Zen 5 profile"),
              "Zen 4 grid": (fits["Zen 4 profile"], "Zen 4 profile"),
              "Zen 4 held-out layers": (os.path.join(DATA, "cost_accuracy_zen4.csv"), "Zen 4 profile")}
    for extra in args.extra:
        name, _, path = extra.partition("=")
        judged[name] = (path, None)
    print("| picker | judged on | within 5% of best | geomean slowdown | worst | n |")
    print("|---|---|---|---|---|---|")
    for data, (path, own) in judged.items():
        rows = rows_of(path)
        for name, prof in profiles.items():
            if name == own and "grid" in data:
                print(line(f"{name} (5-fold CV, same machine)", data, cross_validated(path)))
            elif name == own:
                print(line(f"{name} (same machine)", data, judge(rows, profile_picker(prof))))
            else:
                print(line(f"**{name} (other machine)**", data, judge(rows, profile_picker(prof))))
        print(line("always native", data, judge(rows, native)))


if __name__ == "__main__":
    main()

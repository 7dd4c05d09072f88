"""How well does the cost model pick forms on conv geometries it was not calibrated on?

Held-out set: the grouped convs of ResNeXt-50 32x4d, ResNeXt-101 32x8d and 64x4d,
SE-ResNeXt-50 32x4d at 256x256, RegNetX-400MF/1.6GF/3.2GF, RegNetY-800MF and ShuffleNet v1
(g=3, g=8; grouped 1x1 convs), each at batch 1 and 8. None of them is in the calibration grid
(benchmarks/calibrate.py excludes them). Every form of every geometry is measured here
(rotated rounds, the verification's session options), the model's pick is compared with the
measured best:

- pick within 5% of the best: fraction of geometries (target >= 95%);
- geometric-mean slowdown of the picks vs always the measured best (target <= 2%);
- the same for "always native" and for the FINDINGS rule, as baselines.

    python benchmarks/cost_accuracy.py                     # measure (~5 min on 2 cores) + evaluate
    python benchmarks/cost_accuracy.py --evaluate CSV      # evaluate saved measurements again
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import numpy as np

from gconv_rewrite import geometry, runtime, tuning

HERE = os.path.dirname(os.path.abspath(__file__))
FORMS = geometry.FORMS


def _stages(name, widths, group_of, spatials, first_stride_in=True):
    """3x3 grouped convs of a ResNeXt/RegNet-style net: per stage, the stride-2 entry conv and the body conv."""
    out = []
    for i, (w, s) in enumerate(zip(widths, spatials)):
        g = group_of(w)
        if i > 0 and first_stride_in:
            out.append((name, w, w, g, s * 2, 3, 2))  # entry block: stride 2 on the 3x3 (torchvision v1.5)
        out.append((name, w, w, g, s, 3, 1))
    return out


def held_out() -> list[tuple[str, tuple]]:
    """(model name, Probe) of every held-out geometry."""
    convs = []
    convs += _stages("ResNeXt-50 32x4d", [128, 256, 512, 1024], lambda w: 32, [56, 28, 14, 7])
    convs += _stages("ResNeXt-101 32x8d", [256, 512, 1024, 2048], lambda w: 32, [56, 28, 14, 7])
    convs += _stages("ResNeXt-101 64x4d", [256, 512, 1024, 2048], lambda w: 64, [56, 28, 14, 7])
    convs += _stages("SE-ResNeXt-50 32x4d @256", [128, 256, 512, 1024], lambda w: 32, [64, 32, 16, 8])
    convs += _stages("RegNetX-400MF", [32, 64, 160, 384], lambda w: w // 16, [56, 28, 14, 7])
    convs += _stages("RegNetX-1.6GF", [72, 168, 408, 912], lambda w: w // 24, [56, 28, 14, 7])
    convs += _stages("RegNetX-3.2GF", [96, 192, 432, 1008], lambda w: w // 48, [56, 28, 14, 7])
    convs += _stages("RegNetY-800MF", [64, 144, 320, 768], lambda w: w // 16, [56, 28, 14, 7])
    for g, widths in ((3, [240, 480, 960]), (8, [384, 768, 1536])):  # ShuffleNet v1: grouped 1x1 in and out
        for w, s in zip(widths, [28, 14, 7]):
            mid = w // 4
            convs.append((f"ShuffleNet v1 g={g}", w, mid, g, s, 1, 1))
            convs.append((f"ShuffleNet v1 g={g}", mid, w, g, s, 1, 1))
    probes, seen = [], set()
    for name, cin, cout, g, size, k, stride in convs:
        for batch in (1, 8):
            p = geometry.Probe(cin, cout, g, (size, size), (k, k), (stride, stride), (1, 1), (k // 2,) * 4, "NOTSET",
                             "float32", batch)
            if p.key() not in seen:
                seen.add(p.key())
                probes.append((name, p))
    return probes


def measure_all(path: str, rounds: int, provider: str = "cpu", every: int = 1, budget_s: float | None = None,
                wait: bool = True) -> None:
    """Measure every `every`-th held-out geometry, one flushed row each; stops in time for `budget_s`.
    Only the CPU waits for a quiet machine (other processes' CPU load says nothing about GPU kernels)."""
    choice = runtime.choose_provider(provider)
    probes = held_out()[::every]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["model", "probe"] + [f"t_{form}_ms" for form in FORMS] + ["background_cores"])
        start, slowest = time.monotonic(), 0.0
        for i, (name, probe) in enumerate(probes):
            if budget_s is not None and time.monotonic() - start + slowest > budget_s:
                print(f"time budget of {budget_s:.0f}s reached: {i} of {len(probes)} measured", file=sys.stderr)
                break
            began = time.monotonic()
            load = tuning.wait_for_quiet() if choice.name == "cpu" and wait else float("nan")
            m = tuning.measure(probe, choice, rounds=rounds)
            out.writerow([name, probe.key()] + [_fmt(m.times_ms[form]) for form in FORMS] + [f"{load:.2f}"])
            f.flush()
            slowest = max(slowest, time.monotonic() - began)
            print(f"[{i + 1}/{len(probes)} {time.monotonic() - start:.0f}s] {probe.key()}: best {m.best()}",
                  file=sys.stderr)


def _fmt(value):
    return "nan" if value is None else f"{value:.5f}"


def evaluate(path: str, profile) -> dict:
    rows = list(csv.DictReader(open(path)))
    probes = dict((p.key(), p) for _, p in held_out())
    picks = {"cost model": [], "always native": [], "FINDINGS rule": []}
    for row in rows:
        probe = probes[row["probe"]]
        t = {form: float(row[f"t_{form}_ms"]) for form in FORMS}
        t = {form: v for form, v in t.items() if not math.isnan(v)}
        best = min(t.values())
        choice = profile.choose(probe, available=tuple(t))
        picks["cost model"].append(t[choice.form] / best)
        picks["always native"].append(t["native"] / best)
        picks["FINDINGS rule"].append(t[_findings_rule(probe)] / best)
    summary = {}
    for name, ratios in picks.items():
        r = np.array(ratios)
        summary[name] = {"within_5pct": float(np.mean(r <= 1.05)),
                         "geomean_slowdown": float(np.exp(np.mean(np.log(r))) - 1),
                         "worst": float(r.max()), "n": len(r)}
    return summary


def _findings_rule(p: geometry.Probe) -> str:
    """The rule of ../shared/calib/FINDINGS.md (measured on an AVX-512 machine; block 16)."""
    ho = p.output_spatial()
    if p.cog == 1:
        return "dw"
    if p.cig % 16 == 0 and p.cog % 16 == 0:
        return "native"
    if p.cig * math.prod(p.kernel) >= 200 and p.batch * math.prod(ho) >= 784:
        return "split"
    if p.c_in <= 32 and max(p.kernel) > 1 and max(p.strides) == 2:
        return "dense"
    return "native"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluate", metavar="CSV", help="only evaluate saved measurements")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default=None, help="default: benchmarks/data/cost_accuracy_<provider>.csv")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--every", type=int, default=1, help="measure every k-th geometry only (short device sessions)")
    parser.add_argument("--profile", default=None,
                        help="judge this profile file (default: the one shipped for the provider)")
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for a quiet CPU before each geometry (dry runs; CUDA never waits)")
    parser.add_argument("--budget-s", type=float, default=None, help="stop measuring in time for this many seconds")
    args = parser.parse_args()
    path = args.evaluate or args.out or os.path.join(HERE, "data", f"cost_accuracy_{args.provider}.csv")
    if not args.evaluate:
        measure_all(path, args.rounds, args.provider, args.every, args.budget_s, not args.no_wait)
    from gconv_rewrite import cost  # noqa: PLC0415
    profile = cost.load_profile(args.provider)
    if args.profile:
        with open(args.profile) as f:
            profile = cost.Profile.from_dict(json.load(f))
    if not profile.calibrated:
        sys.exit(f"cost_accuracy.py: no calibrated {args.provider} profile to judge (only the prior)")
    rows = sum(1 for _ in open(path)) - 1
    if rows < 1:
        sys.exit(f"cost_accuracy.py: nothing measured in {path}")
    print(f"held-out geometries: {path}; profile: {profile.describe()}")
    print(f"{'picker':<16} {'within 5% of best':>18} {'geomean slowdown':>17} {'worst':>7}")
    for name, s in evaluate(path, profile).items():
        print(f"{name:<16} {100 * s['within_5pct']:>17.1f}% {100 * s['geomean_slowdown']:>16.2f}% {s['worst']:>6.2f}x"
              f"  (n={s['n']})")


if __name__ == "__main__":
    main()

"""Calibrate the cost model (CPU; CUDA with --provider cuda): measure every exact form on a grid of
conv geometries, then fit.

    python benchmarks/calibrate.py                 # measure (~10 min on 2 cores), fit, write the profile
    python benchmarks/calibrate.py --fit-only      # fit again from benchmarks/data/cpu_calibration.csv
    python benchmarks/calibrate.py --quick         # 80 geometries, for trying the script
    python benchmarks/calibrate.py --provider cuda --budget-s 170   # stop measuring in time, fit what was measured

The grid is random (seeded) over C_in 32..1024, Cig 2..64 (multiples of the NCHWc block and
not), Cog = Cig, Cig/2, 2 Cig or 1, spatial 7..112, kernel 1/3/5, stride 1/2, batch 1/8; it never
contains a geometry of the held-out set (benchmarks/cost_accuracy.py). A second, model-like
grid (see model_like_grid) adds 120 ResNeXt/RegNet-shaped 3x3 layers. Each geometry: all four
forms, rotated round by round (on the CPU after waiting for a quiet machine), one flushed CSV
row per geometry; on SIGTERM or when --budget-s runs out, measuring stops and what was measured
is fitted. The fitted profile goes to gconv_rewrite/profiles/<provider>.json, which ships with
the package.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import sys
import time

from gconv_rewrite import geometry, runtime, tuning

HERE = os.path.dirname(os.path.abspath(__file__))
PROFILES = os.path.join(HERE, "..", "gconv_rewrite", "profiles")
FORMS = geometry.FORMS


def grid(count: int, seed: int = 0) -> list[geometry.Probe]:
    """`count` distinct calibration geometries, none of them held out."""
    from cost_accuracy import held_out

    excluded = {p.key() for _, p in held_out()}
    rng = random.Random(seed)
    probes, seen = [], set(excluded)
    while len(probes) < count:
        c_in = rng.choice([32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024])
        cig = rng.choice([2, 4, 8, 12, 16, 24, 32, 40, 64])
        if c_in % cig or not 1 < c_in // cig < c_in:
            continue
        g = c_in // cig
        cog = rng.choices([cig, max(1, cig // 2), 2 * cig, 1], weights=[5, 1, 1, 1])[0]
        k = rng.choice([1, 3, 3, 5])
        stride = rng.choice([1, 1, 2])
        size = rng.choice([7, 14, 28, 56, 112])
        batch = rng.choice([1, 1, 8])
        elements = c_in * size * size
        if not 20_000 <= elements <= 1_700_000 or batch * g * cog * cig * k * k * size * size / stride**2 > 4e9:
            continue  # outside what ResNeXt-like layers look like, or a native conv over 4 GMAC
        p = geometry.Probe(c_in, g * cog, g, (size, size), (k, k), (stride, stride), (1, 1), (k // 2,) * 4, "NOTSET",
                         "float32", batch)
        if p.key() not in seen:
            seen.add(p.key())
            probes.append(p)
    return probes


def model_like_grid(count: int, seed: int = 1) -> list[geometry.Probe]:
    """`count` geometries shaped like ResNeXt/RegNet 3x3 layers (any multiple-of-8 width, group width
    8..64, batch 1/8, stride 1/2); added after the first held-out evaluation found split winning at
    batch 8 / stride 2 on few wide groups, where the wide grid had almost no points. None held out."""
    from cost_accuracy import held_out

    rng = random.Random(seed)
    seen = {p.key() for _, p in held_out()} | {p.key() for p in grid(420)}
    probes = []
    while len(probes) < count:
        cig = rng.choice([8, 16, 24, 32, 48, 64])
        g = rng.randint(2, 40)
        size = rng.choice([14, 28, 56])
        if not 20_000 <= g * cig * size * size <= 1_700_000:
            continue
        stride = rng.choice([1, 2])
        p = geometry.Probe(g * cig, g * cig, g, (size * stride, size * stride), (3, 3), (stride, stride), (1, 1),
                         (1, 1, 1, 1), "NOTSET", "float32", rng.choice([1, 8]))
        if p.key() not in seen:
            seen.add(p.key())
            probes.append(p)
    return probes


def machine_path(csv_path: str) -> str:
    """The measurements' machine record beside the CSV (x.csv -> x.machine.json)."""
    return os.path.splitext(csv_path)[0] + ".machine.json"


def write_machine(csv_path: str, choice) -> None:
    """Record which machine measured the CSV: a refit elsewhere must describe that machine, not the host."""
    block = runtime.nchwc_block() if choice.name == "cpu" else 8  # the NCHWc flag is a CPU notion; inert on CUDA
    with open(machine_path(csv_path), "w") as f:
        json.dump({"device": runtime.device_name(choice), "block": block, "ort_version": runtime.ort_version()}, f,
                  indent=1)
        f.write("\n")


def read_machine(csv_path: str) -> dict:
    """The machine that measured the CSV; refuses to guess when the record is missing."""
    try:
        with open(machine_path(csv_path)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"calibrate.py: cannot read {machine_path(csv_path)} ({e}): which machine measured {csv_path}?")


def tiny_grid(count: int, seed: int = 2) -> list[geometry.Probe]:
    """`count` small geometries (tens of ms each on a CPU) for dry runs of the measuring pipeline; none held out."""
    from cost_accuracy import held_out

    rng = random.Random(seed)
    seen, probes = {p.key() for _, p in held_out()}, []
    for _ in range(100 * count):  # about 1,000 distinct geometries exist: never loop forever
        if len(probes) == count:
            break
        c_in, cig, cog_factor = rng.choice([16, 24, 32, 48, 64, 96]), rng.choice([2, 4, 8, 16]), rng.choice([1, 1, 2])
        if c_in % cig or not 1 < c_in // cig < c_in:
            continue
        k, size, stride, batch = rng.choice([1, 3]), rng.choice([7, 10, 14]), rng.choice([1, 2]), rng.choice([1, 2])
        g = c_in // cig
        p = geometry.Probe(c_in, g * cig * cog_factor, g, (size, size), (k, k), (stride, stride), (1, 1), (k // 2,) * 4,
                         "NOTSET", "float32", batch)
        if p.key() not in seen:
            seen.add(p.key())
            probes.append(p)
    return probes


class OutOfTime(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, keep and fit what was measured. A BaseException,
    like KeyboardInterrupt, so that no `except Exception` on the way turns it into a measuring error."""


def _stop_on_sigterm(signum, frame):
    raise OutOfTime


def measure_all(path: str, probes: list[geometry.Probe], rounds: int, append: bool = False, provider: str = "cpu",
                budget_s: float | None = None, wait: bool = True) -> int:
    """Measure `probes` into the CSV, one flushed row per geometry; returns how many were measured.

    Stops early, keeping every row written, when the next geometry would not fit in `budget_s`
    (estimated from the slowest so far) or on SIGTERM. Only the CPU waits for a quiet machine
    first: other processes' CPU load says nothing about GPU kernels.
    """
    choice = runtime.choose_provider(provider)
    write_machine(path, choice)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    start, slowest, done = time.monotonic(), 0.0, 0
    try:
        with open(path, "a" if append else "w", newline="") as f:
            out = csv.writer(f)
            if not append:
                out.writerow(["probe"] + [f"t_{form}_ms" for form in FORMS] + ["background_cores", "notes"])
                f.flush()
            for i, probe in enumerate(probes):
                if budget_s is not None and time.monotonic() - start + slowest > budget_s:
                    print(f"time budget of {budget_s:.0f}s reached: {done} of {len(probes)} geometries measured",
                          file=sys.stderr)
                    break
                began = time.monotonic()
                load = tuning.wait_for_quiet() if choice.name == "cpu" and wait else float("nan")
                m = tuning.measure(probe, choice, rounds=rounds)
                notes = "; ".join(f"{k}: {v}" for k, v in m.notes.items())
                out.writerow([probe.key()] + ["nan" if m.times_ms[form] is None else f"{m.times_ms[form]:.5f}"
                                              for form in FORMS] + [f"{load:.2f}", notes])
                f.flush()
                done += 1
                slowest = max(slowest, time.monotonic() - began)
                print(f"[{i + 1}/{len(probes)} {time.monotonic() - start:.0f}s] {probe.key()}: best {m.best()}",
                      file=sys.stderr)
    except OutOfTime:
        print(f"SIGTERM: stopped after {done} of {len(probes)} geometries; fitting what was measured", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return done


def fit_and_save(csv_path: str, provider: str, profile_path: str):
    """Fit the CSV's rows (whatever was measured) and write the profile; exits non-zero when they cannot be fitted."""
    from gconv_rewrite import cost_fit  # noqa: PLC0415 (measuring needs no cost model)
    try:
        rows = cost_fit.read_measurements(csv_path)
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"calibrate.py: cannot read the measurements {csv_path} ({e})")
    machine = read_machine(csv_path)  # the machine that measured, never the host that refits
    profile = cost_fit.fit(rows, provider=provider, device=machine["device"], ort_version=machine["ort_version"],
                           block=machine["block"], source=os.path.relpath(csv_path, os.path.join(HERE, "..")))
    if not profile.native:
        sys.exit(f"calibrate.py: {len(rows)} geometries measured in {csv_path}: too few to fit a native time "
                 f"(at least {2 * len(cost_fit.NATIVE_TERMS)} on one kernel path); no profile written")
    profile.save(profile_path)
    print(f"fitted on {len(rows)} geometries -> {profile_path}")
    print(profile.describe())
    return profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit-only", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--count", type=int, default=420, help="geometries of the wide grid")
    parser.add_argument("--model-like", type=int, default=120, help="geometries of the model-like grid")
    parser.add_argument("--part", choices=["all", "wide", "model-like"], default="all",
                        help="measure one grid only (with --append: add its rows to the CSV)")
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: calibrate onnxruntime's CUDA provider "
                             "(data/cuda_calibration.csv, profiles/cuda.json)")
    parser.add_argument("--csv", default=None, help="default: benchmarks/data/<provider>_calibration.csv")
    parser.add_argument("--profile", default=None, help="default: gconv_rewrite/profiles/<provider>.json")
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for a quiet CPU before each geometry (dry runs; CUDA never waits)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop measuring when the next geometry would not fit in this many seconds; "
                             "fit what was measured")
    parser.add_argument("--tiny", type=int, default=0, metavar="N",
                        help="measure N small geometries instead of the grids (dry runs of the pipeline)")
    args = parser.parse_args()
    args.csv = args.csv or os.path.join(HERE, "data", f"{args.provider}_calibration.csv")
    args.profile = args.profile or os.path.join(PROFILES, f"{args.provider}.json")
    if not args.fit_only:
        probes = []
        if args.tiny:
            probes += tiny_grid(args.tiny)
        elif args.part in ("all", "wide"):
            probes += grid(60 if args.quick else args.count)
        if args.part in ("all", "model-like") and not args.tiny:
            probes += model_like_grid(20 if args.quick else args.model_like)
        measure_all(args.csv, probes, args.rounds, args.append, args.provider, args.budget_s, not args.no_wait)
    fit_and_save(args.csv, args.provider, args.profile)

if __name__ == "__main__":
    main()

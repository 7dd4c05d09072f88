"""Calibrate the cost model (CPU; CUDA with --provider cuda): measure every exact form on a grid of
conv geometries, then fit.

    python benchmarks/calibrate.py                 # measure (~20 min on 2 cores), fit, write the profile
    python benchmarks/calibrate.py --fit-only      # fit again from benchmarks/data/cpu_calibration.csv
    python benchmarks/calibrate.py --quick         # 80 geometries, for trying the script
    python benchmarks/calibrate.py --provider cuda --budget-s 170   # stop measuring in time, fit what was measured

The grid is random (seeded) over C_in 32..1024, Cig 2..64 (multiples of the NCHWc block and
not), Cog = Cig, Cig/2, 2 Cig or 1, spatial 7..112, kernel 1/3/5, stride 1/2, batch 1/8; it never
contains a geometry of the held-out set (benchmarks/cost_accuracy.py). A second, model-like
grid adds 120 ResNeXt/RegNet-shaped 3x3 layers. Each geometry: all four forms, rotated round by
round (on the CPU after waiting for a quiet machine), one flushed CSV row per geometry; on
SIGTERM or when --budget-s runs out, measuring stops and what was measured is fitted. Grid,
measuring and fitting are those of `gconv-rewrite calibrate` (gconv_rewrite/calibration.py);
this script chooses the bigger grid, the held-out exclusion and the files. The fitted profile
goes to gconv_rewrite/profiles/<provider>.json, which ships with the package.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time

from gconv_rewrite import calibration, cost_fit, geometry, runtime

from cost_accuracy import held_out

HERE = os.path.dirname(os.path.abspath(__file__))
PROFILES = os.path.join(HERE, "..", "gconv_rewrite", "profiles")


def held_out_keys() -> set[str]:
    """Keys of the held-out geometries, which no calibration grid may contain."""
    return {p.key() for _, p in held_out()}


def grid(count: int, seed: int = 0) -> list[geometry.Probe]:
    """`count` distinct calibration geometries of the wide grid, none of them held out."""
    return calibration.grid(count, seed, exclude=held_out_keys())


def model_like_grid(count: int, seed: int = 1) -> list[geometry.Probe]:
    """`count` ResNeXt/RegNet-shaped geometries, none held out nor in the wide grid (added after the first
    held-out evaluation found split winning at batch 8 / stride 2 on few wide groups)."""
    return calibration.model_like_grid(count, seed, exclude=held_out_keys() | {p.key() for p in grid(420)})


def tiny_grid(count: int, seed: int = 2) -> list[geometry.Probe]:
    """`count` small geometries (tens of ms each on a CPU) for dry runs of the measuring pipeline; none held out."""
    rng = random.Random(seed)
    seen, probes = held_out_keys(), []
    for _ in range(100 * count):  # about 1,000 distinct geometries exist: never loop forever
        if len(probes) == count:
            break
        c_in, cig, cog_factor = rng.choice([16, 24, 32, 48, 64, 96]), rng.choice([2, 4, 8, 16]), rng.choice([1, 1, 2])
        if c_in % cig or not 1 < c_in // cig < c_in:
            continue
        k, size, stride, batch = rng.choice([1, 3]), rng.choice([7, 10, 14]), rng.choice([1, 2]), rng.choice([1, 2])
        g = c_in // cig
        p = geometry.Probe(c_in, g * cig * cog_factor, g, (size, size), (k, k), (stride, stride), (1, 1),
                           (k // 2,) * 4, "NOTSET", "float32", batch)
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
    """Measure `probes` into the CSV (calibration.measure_into); returns how many were measured. Stops early,
    keeping every row written, when the next geometry would not fit in `budget_s` or on SIGTERM."""
    if not append and os.path.exists(path):
        os.unlink(path)
    start = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    before = len(calibration.measured_keys(path))
    stopped = ""
    try:
        calibration.measure_into(path, probes, runtime.choose_provider(provider), rounds,
                                 deadline=None if budget_s is None else start + budget_s, wait=wait,
                                 log=lambda line: print(f"{time.monotonic() - start:.0f}s {line}", file=sys.stderr))
    except OutOfTime:
        stopped = "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, previous)
    done = len(calibration.measured_keys(path)) - before
    if stopped:
        print(f"SIGTERM: stopped after {done} of {len(probes)} geometries; fitting what was measured", file=sys.stderr)
    elif done < len(probes) and budget_s is not None:
        print(f"time budget of {budget_s:.0f}s reached: {done} of {len(probes)} geometries measured", file=sys.stderr)
    return done


def fit_and_save(csv_path: str, provider: str, profile_path: str):
    """Fit the CSV's rows (whatever was measured) and write the profile; exits non-zero when they cannot be fitted."""
    try:  # the machine that measured, never the host that refits
        profile = calibration.fit_csv(csv_path, provider, source=os.path.relpath(csv_path, os.path.join(HERE, "..")))
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"calibrate.py: cannot read the measurements {csv_path} ({e})")
    if not profile.native:
        sys.exit(f"calibrate.py: {len(profile.points)} geometries measured in {csv_path}: too few to fit a native "
                 f"time (at least {2 * len(cost_fit.NATIVE_TERMS)} on one kernel path); no profile written")
    profile.save(profile_path)
    print(f"fitted on {len(profile.points)} geometries -> {profile_path}")
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

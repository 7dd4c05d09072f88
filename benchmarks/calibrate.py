"""Calibrate the CPU cost model: measure every exact form on a grid of conv geometries, then fit.

    python benchmarks/calibrate.py                 # measure (~20 min on 2 cores), fit, write the profile
    python benchmarks/calibrate.py --fit-only      # fit again from benchmarks/data/cpu_calibration.csv
    python benchmarks/calibrate.py --quick         # 80 geometries, for trying the script

The grid is random (seeded) over C_in 32..1024, Cig 2..64 (multiples of the NCHWc block and
not), Cog = Cig, Cig/2, 2 Cig or 1, spatial 7..112, kernel 1/3/5, stride 1/2, batch 1/8; it never
contains a geometry of the held-out set (benchmarks/cost_accuracy.py). A second, model-like
grid adds 120 ResNeXt/RegNet-shaped 3x3 layers. Each geometry: all four forms, rotated round by
round, after waiting for a quiet machine. Grid, measuring and fitting are those of
`gconv-rewrite calibrate` (gconv_rewrite/calibration.py); this script only chooses the bigger
grid, the held-out exclusion and the files. The fitted profile ships with the package.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from gconv_rewrite import calibration, runtime

HERE = os.path.dirname(os.path.abspath(__file__))
PROFILES = os.path.join(HERE, "..", "gconv_rewrite", "profiles")


def held_out_keys() -> set[str]:
    """Keys of the held-out geometries, which no calibration grid may contain."""
    from cost_accuracy import held_out

    return {p.key() for _, p in held_out()}


def grid(count: int, seed: int = 0):
    """`count` distinct calibration geometries of the wide grid, none of them held out."""
    return calibration.grid(count, seed, exclude=held_out_keys())


def model_like_grid(count: int, seed: int = 1):
    """`count` ResNeXt/RegNet-shaped geometries, none held out nor in the wide grid."""
    return calibration.model_like_grid(count, seed, exclude=held_out_keys() | {p.key() for p in grid(420)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit-only", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--count", type=int, default=420, help="geometries of the wide grid")
    parser.add_argument("--model-like", type=int, default=120, help="geometries of the model-like grid")
    parser.add_argument("--part", choices=["all", "wide", "model-like"], default="all", help="measure one grid only")
    parser.add_argument("--append", action="store_true", help="keep the rows already in the CSV (it resumes anyway)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: calibrate onnxruntime's CUDA provider (data/cuda_calibration.csv, profiles/cuda.json)")
    parser.add_argument("--csv", default=None, help="default: benchmarks/data/<provider>_calibration.csv")
    parser.add_argument("--profile", default=None, help="default: gconv_rewrite/profiles/<provider>.json")
    args = parser.parse_args()
    args.csv = args.csv or os.path.join(HERE, "data", f"{args.provider}_calibration.csv")
    args.profile = args.profile or os.path.join(PROFILES, f"{args.provider}.json")
    if not args.fit_only:
        probes = []
        if args.part in ("all", "wide"):
            probes += grid(60 if args.quick else args.count)
        if args.part in ("all", "model-like"):
            probes += model_like_grid(20 if args.quick else args.model_like)
        if not args.append and os.path.exists(args.csv):
            os.unlink(args.csv)
        start = time.time()
        calibration.measure_into(args.csv, probes, runtime.choose_provider(args.provider), args.rounds,
                                 log=lambda line: print(f"{time.time() - start:.0f}s {line}", file=sys.stderr))
    try:  # the machine that measured, never the host that refits
        source = os.path.relpath(args.csv, os.path.join(HERE, ".."))
        profile = calibration.fit_csv(args.csv, args.provider, source=source)
    except ValueError as exc:
        sys.exit(f"calibrate.py: {exc}")
    profile.save(args.profile)
    print(f"fitted on {len(profile.points)} geometries -> {args.profile}")
    print(profile.describe())


if __name__ == "__main__":
    main()

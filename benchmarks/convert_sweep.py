"""Convert the shared Zen 5 sweep (../shared/calib/cpu_sweep_nospin.csv) into this project's calibration CSV.

    python benchmarks/convert_sweep.py [SWEEP.csv]    # -> benchmarks/data/cpu_calibration_zen5.csv (+ .machine.json)
    python benchmarks/calibrate.py --fit-only --csv benchmarks/data/cpu_calibration_zen5.csv \
        --profile gconv_rewrite/profiles/cpu-zen5-avx512.json

The sweep (onnxruntime 1.32 CPU, 2-vCPU AMD EPYC family 26 model 2, Zen 5, AVX-512; per-session
pools with spinning off, as this project times) has one row per geometry: N,C,Co,G,Cig,H,W,k,stride
and the median ms of each form (`nan`: skipped as hopeless). Pads are k//2, dilation 1, float32.
Geometries of the held-out set (benchmarks/cost_accuracy.py) are dropped: nothing the tool is
fitted on may be judged.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys

from gconv_rewrite import calibration, geometry

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SWEEP = os.path.join(HERE, "..", "..", "shared", "calib", "cpu_sweep_nospin.csv")
OUT = os.path.join(HERE, "data", "cpu_calibration_zen5.csv")
MACHINE = {"device": "AMD EPYC (family 26 model 2) AVX-512, 2 threads", "block": 16, "ort_version": "1.32.0",
           "origin": "../shared/calib/cpu_sweep_nospin.csv (sweep.py --pool session), converted"}


def sweep_probe(row: dict) -> geometry.Probe:
    """The Probe of one sweep row (pads k//2, dilation 1, float32)."""
    k, s, size = int(row["k"]), int(row["stride"]), (int(row["H"]), int(row["W"]))
    return geometry.Probe(int(row["C"]), int(row["Co"]), int(row["G"]), size, (k, k), (s, s), (1, 1), (k // 2,) * 4,
                        "NOTSET", "float32", int(row["N"]))


def convert(sweep: str, out: str) -> tuple[int, int]:
    """Write the project-format CSV and its machine record; returns (rows written, held-out rows dropped)."""
    sys.path.insert(0, HERE)
    from cost_accuracy import held_out

    excluded = {p.key() for _, p in held_out()}
    written = dropped = 0
    with open(sweep) as f, open(out, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow(calibration.CSV_HEADER)
        for row in csv.DictReader(f):
            p = sweep_probe(row)
            if p.key() in excluded:
                dropped += 1
                continue
            times = [float(row[f"t_{form}_ms"]) for form in geometry.FORMS]
            w.writerow([p.key()] + ["nan" if math.isnan(t) else f"{t:.5f}" for t in times] + ["", "converted sweep"])
            written += 1
    with open(calibration.machine_path(out), "w") as f:
        json.dump(MACHINE, f, indent=1)
        f.write("\n")
    return written, dropped


if __name__ == "__main__":
    n, d = convert(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_SWEEP, OUT)
    print(f"{n} geometries -> {OUT} ({d} held-out geometries dropped)")

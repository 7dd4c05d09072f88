"""Fitting a cost profile to measurements (offline: benchmarks/calibrate.py and the tests that refit the
shipped profile use it; planning only reads the fitted profile, cost.py)."""

from __future__ import annotations

import csv
import datetime
import math

import numpy as np

from .cost import NATIVE_TERMS, Profile, features, native_terms
from .geometry import FORMS, Probe, parse_probe


def read_measurements(path: str) -> list[tuple[Probe, dict[str, float]]]:
    """Rows of a calibration CSV (benchmarks/calibrate.py) as (probe, ms per form; nan = not measured)."""
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            rows.append((parse_probe(row["probe"]), {form: float(row[f"t_{form}_ms"]) for form in FORMS}))
    return rows


def fit(rows: list[tuple[Probe, dict[str, float]]], provider: str, device: str, ort_version: str, block: int,
        source: str = "", neighbours: int = 5, margin: float = 0.05) -> Profile:
    """Fit a profile to measured rows: native power laws per path, and the neighbour table of ratios."""
    native: dict[str, list[float]] = {}
    quality = {}
    for path in ("nchwc", "plain"):
        sel = [(p, t) for p, t in rows if (p.cig % block == 0 and p.cog % block == 0) == (path == "nchwc")
               and not math.isnan(t["native"])]
        if len(sel) < 2 * len(NATIVE_TERMS):
            continue
        X = np.array([native_terms(p) for p, _ in sel])
        y = np.log([t["native"] for _, t in sel])
        coef = np.linalg.solve(X.T @ X + 1e-6 * np.eye(X.shape[1]), X.T @ y)  # tiny ridge: Cig == Cog on most rows
        native[path] = [float(c) for c in coef]
        err = np.abs(np.exp(X @ coef - y) - 1)
        quality[f"native {path}: median |error|"] = round(float(np.median(err)), 3)
        quality[f"native {path}: rows"] = len(sel)
    points = []
    for p, t in rows:
        if math.isnan(t["native"]):
            continue
        ratios = [math.log(t[f] / t["native"]) if not math.isnan(t[f]) else math.nan for f in FORMS[1:]]
        points.append(features(p, block) + ratios)
    return Profile(provider, device, ort_version, block, True, fitted=datetime.date.today().isoformat(),
                   source=source, native=native, neighbours=neighbours, margin=margin, points=points,
                   fit_quality=quality)

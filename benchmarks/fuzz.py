"""Longer fuzzing run: the CI test's mutations, over the sample models and the exporter fixtures,
and generated valid models (tests/fuzzing.py GENERATORS: ops whose meaning depends on symbolic
sizes, If branches that reuse names at other sizes), whose written rewrites are compared with the
original in onnxruntime at sizes beyond the analysis' probes and in both branches.

    python benchmarks/fuzz.py [--minutes 5] [--seed 1] [--generated 0.5]

Prints how many cases ran, their outcomes, and every failure (a traceback, an invalid output,
a left-over file, an input that was modified, a written model that computes something else).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from gconv_rewrite.cli import main as cli  # noqa: E402

from fuzzing import GENERATORS, check_case, check_generated, mutated  # noqa: E402


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", help="folder to keep the inputs whose rewrite failed parity")
    p.add_argument("--generated", type=float, default=0.5, help="share of cases from the model generators")
    args = p.parse_args()
    sources = sorted((ROOT / "models").glob("*.onnx")) + sorted((ROOT / "tests/fixtures/exporters").glob("*.onnx"))
    models = {s.name: onnx.load(s) for s in sources}
    rng = np.random.default_rng(args.seed)
    outcomes, kinds, failures = Counter(), Counter(), []
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        while time.monotonic() - start < args.minutes * 60:
            direction = ["auto", "fuse", "expand"][int(rng.integers(3))]
            if rng.random() < args.generated:
                generator = GENERATORS[int(rng.integers(len(GENERATORS)))]
                name = kind = generator.__name__
                kinds[kind] += 1
                try:
                    outcomes["generated " + check_generated(invoke, generator(rng), rng, Path(tmp), direction)] += 1
                except AssertionError as exc:
                    outcomes["FAILED"] += 1
                    failures.append(f"{kind} ({direction}): {exc}")
                continue
            name = list(models)[int(rng.integers(len(models)))]
            kind, data = mutated(models[name], rng)
            kinds[kind] += 1
            try:
                outcome = check_case(invoke, data, Path(tmp), direction)
                outcomes[outcome] += 1
                if outcome == "parity" and args.keep:  # a rewrite that changed the result: keep it
                    keep = Path(args.keep) / f"parity_{outcomes['parity']}_{kind}_{direction}_{name}"
                    keep.parent.mkdir(parents=True, exist_ok=True)
                    keep.write_bytes(data)
            except AssertionError as exc:
                outcomes["FAILED"] += 1
                failures.append(f"{kind} of {name} ({direction}): {exc}")
            except Exception:  # noqa: BLE001
                outcomes["FAILED"] += 1
                failures.append(f"{kind} of {name} ({direction}): {traceback.format_exc(limit=3)}")
    print(f"{sum(outcomes.values())} cases in {args.minutes:g} min over {len(models)} models: {dict(outcomes)}")
    print(f"mutations: {dict(kinds)}")
    for f in failures[:20]:
        print("FAILURE:", f)


if __name__ == "__main__":
    main()

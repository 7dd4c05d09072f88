"""Bounded fuzzing in CI: mutated sample models either come out checker-valid and proven, or are
refused with exit 1/2 and one clear line; never a traceback, never a file at -o that is invalid.
benchmarks/fuzz.py runs the same for longer."""

import time
from collections import Counter

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from gconv_rewrite.cli import main

from fuzzing import GENERATORS, check_case, check_generated, mutated
from helpers import MODELS

SAMPLES = sorted(MODELS.glob("*.onnx"))
BUDGET_S = 25


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_fuzz_sample_models(tmp_path):
    rng = np.random.default_rng(20261128)
    outcomes = Counter()
    start = time.monotonic()
    while time.monotonic() - start < BUDGET_S:
        sample = SAMPLES[int(rng.integers(len(SAMPLES)))]
        name, data = mutated(onnx.load(sample), rng)
        direction = ["auto", "fuse", "expand"][int(rng.integers(3))]
        try:
            outcomes[check_case(invoke, data, tmp_path, direction)] += 1
        except AssertionError as exc:
            pytest.fail(f"{name} of {sample.name} ({direction}): {exc}")
    print(dict(outcomes))
    assert sum(outcomes.values()) >= 20 and outcomes["refused"] > 0


def test_fuzz_generated_symbolic_sizes_and_sibling_scopes(tmp_path):
    """Valid generated models (size-dependent ops, If branches sharing names): a written model computes
    the same as the original in onnxruntime at sizes the tool never probed, in both branches."""
    rng = np.random.default_rng(20261201)
    outcomes = Counter()
    start = time.monotonic()
    while time.monotonic() - start < 20:
        generator = GENERATORS[int(rng.integers(len(GENERATORS)))]
        model = generator(rng)
        direction = ["auto", "fuse", "expand"][int(rng.integers(3))]
        try:
            outcomes[check_generated(invoke, model, rng, tmp_path, direction)] += 1
        except AssertionError as exc:
            pytest.fail(f"{generator.__name__} ({direction}): {exc}")
    print(dict(outcomes))
    assert sum(outcomes.values()) >= 10 and outcomes["ok"] > 0

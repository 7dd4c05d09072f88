import os
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "exporters"
MODELS = ROOT / "models"

ort.set_default_logger_severity(3)


def run_ort(model, feed):
    """Outputs of `model` (ModelProto or path) on onnxruntime's CPU provider, by output name."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def op_counts(model):
    from collections import Counter
    return Counter(n.op_type for n in model.graph.node)


def max_rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture(autouse=True)
def _private_tune_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's tuning cache or calibration; CPU planning rests on the shipped
    Zen 3 profile on every host (tests of the basis selection and of auto-tuning unset this)."""
    monkeypatch.setenv("GCONV_REWRITE_CACHE", str(tmp_path / "tune-cache.json"))
    monkeypatch.setenv("GCONV_REWRITE_PROFILE", "cpu")

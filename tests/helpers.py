"""Helpers the tests share: where things are, running a model on onnxruntime's CPU provider, comparing outputs.

One module (imported as `helpers`; pytest puts tests/ on the path), so that conftest.py holds fixtures only.
"""

import pathlib
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "exporters"
MODELS = ROOT / "models"

ort.set_default_logger_severity(3)


def session(model) -> ort.InferenceSession:
    """A CPU session of `model` (ModelProto or path): the real library, as users run it."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def run_ort(model, feed) -> dict:
    """Outputs of `model` on onnxruntime's CPU provider, by output name."""
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def run_first(model, feed) -> np.ndarray:
    """The first output of `model` on onnxruntime's CPU provider."""
    return session(model).run(None, feed)[0]


def op_counts(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def max_rel_err(a, b) -> float:
    """Largest absolute difference relative to the magnitude of `b` (the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def canonical(model) -> tuple[dict, set]:
    """What a model computes with, independent of node names: its ops (Identity aside) and the bytes of
    its Convs' weights and biases (initializers or Constant nodes)."""
    ops = {op: n for op, n in op_counts(model).items() if op not in ("Identity", "Constant")}
    values = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = n.attribute[0].t
    used = {name for n in model.graph.node if n.op_type == "Conv" for name in n.input[1:]}
    return ops, {onnx.numpy_helper.to_array(values[name]).tobytes() for name in used if name in values}

"""Numeric parity of two models with the same inputs and outputs, measured with onnxruntime."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import ModelProto, helper

from . import model_io, runtime
from .errors import GconvError

DEFAULT_BATCH = 2
# Largest error allowed, relative to the reference output's magnitude (max |ref|), by dtype.
# float32: reordered sums in ResNeXt-size models stay near 1e-6; a wrong weight gives >1e-3.
RELATIVE_TOLERANCE = {"float16": 2e-2, "bfloat16": 5e-2, "float32": 1e-4, "float64": 1e-10}


@dataclass
class OutputParity:
    """Per-output comparison, as Polygraphy reports it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float  # max |a-b| / max(|b|): error relative to the output's magnitude
    magnitude: float
    tolerance: float  # the max_rel this output must stay under
    passed: bool

    @property
    def min_atol(self) -> float:
        """Smallest absolute tolerance that would pass."""
        return self.max_abs

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (f"{verdict:<4} {self.name} {self.dtype}{list(self.shape)}: max abs {self.max_abs:.3g}, "
                f"max rel {self.max_rel:.3g} (limit {self.tolerance:.0e}, |ref| max {self.magnitude:.3g})")


@dataclass
class VerifyReport:
    provider: str
    provider_note: str
    samples: int
    outputs: list[OutputParity] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def lines(self) -> list[str]:
        head = f"parity on {self.provider} ({self.provider_note}), {self.samples} sample(s): " + (
            "PASS" if self.passed else "FAIL")
        return [head] + ["  " + o.line() for o in self.outputs]


def verify(original: model_io.ModelSource, rewritten: model_io.ModelSource, provider: str = "auto", *,
           inputs: list[dict[str, np.ndarray]] | None = None, input_shapes: dict[str, tuple[int, ...]] | None = None,
           seed: int = 0, tolerance: float | None = None) -> VerifyReport:
    """Run both models on the same inputs with onnxruntime and compare every output.

    `inputs`: samples (name -> array); generated with `seed` when None. `input_shapes` resolves
    symbolic dims (the batch defaults to 2). `tolerance` overrides the per-dtype limit on the
    error relative to each output's magnitude.
    """
    choice = runtime.choose_provider(provider)
    a, _ = _as_model(original)
    b, _ = _as_model(rewritten)
    names_a = [o.name for o in a.graph.output]
    names_b = [o.name for o in b.graph.output]
    if sorted(names_a) != sorted(names_b):
        raise GconvError(f"the models have different outputs: {names_a} vs {names_b}")
    if inputs is None:
        inputs = [generate_inputs(a, input_shapes or {}, seed)]
    with _Sessions(a, b, choice) as (sa, sb):
        report = VerifyReport(choice.name, choice.note, len(inputs))
        results_a = [sa.run(names_a, feed) for feed in inputs]
        results_b = [sb.run(names_a, feed) for feed in inputs]
    for i, name in enumerate(names_a):
        ref = [r[i] for r in results_a]
        got = [r[i] for r in results_b]
        report.outputs.append(_compare(name, ref, got, tolerance))
    return report


def _compare(name, refs, gots, tolerance) -> OutputParity:
    max_abs, magnitude = 0.0, 0.0
    dtype = str(np.asarray(refs[0]).dtype)
    shape = tuple(np.asarray(refs[0]).shape)
    same_shapes = all(np.shape(r) == np.shape(g) for r, g in zip(refs, gots))
    if not same_shapes:
        return OutputParity(name, dtype, shape, float("inf"), float("inf"), 0.0, 0.0, False)
    for r, g in zip(refs, gots):
        r, g = np.asarray(r), np.asarray(g)
        if r.dtype.kind in "fc":
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            if r.size:
                finite = np.isfinite(r64) & np.isfinite(g64)
                if not np.array_equal(np.isfinite(r64), np.isfinite(g64)) or not np.array_equal(
                        np.isnan(r64), np.isnan(g64)):
                    return OutputParity(name, dtype, shape, float("inf"), float("inf"), 0.0, 0.0, False)
                max_abs = max(max_abs, float(np.max(np.abs(r64 - g64)[finite], initial=0.0)))
                magnitude = max(magnitude, float(np.max(np.abs(r64)[finite], initial=0.0)))
        else:
            if not np.array_equal(r, g):
                return OutputParity(name, dtype, shape, float("inf"), float("inf"), 0.0, 0.0, False)
    limit = tolerance if tolerance is not None else RELATIVE_TOLERANCE.get(dtype, 1e-4)
    max_rel = max_abs / magnitude if magnitude > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputParity(name, dtype, shape, max_abs, max_rel, magnitude, limit, max_rel <= limit)


def generate_inputs(model: ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """One sample for every graph input, in a sensible range for its dtype; fixed by `seed`."""
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    feed = {}
    unknown = [n for n in shapes if n not in {i.name for i in model.graph.input}]
    if unknown:
        raise GconvError(f"--input-shape names unknown input '{unknown[0]}'")
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise GconvError(f"input '{vi.name}' is not a tensor; pass inputs explicitly")
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if vi.name in shapes:
            dims = list(shapes[vi.name])
        else:
            dims = []
            for axis, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value"):
                    dims.append(d.dim_value)
                elif axis == 0:
                    dims.append(DEFAULT_BATCH)
                else:
                    unresolved = [x.dim_param or "?" for i, x in enumerate(tt.shape.dim)
                                  if i > 0 and not x.HasField("dim_value")]
                    raise GconvError(f"input '{vi.name}' has unresolved dims {', '.join(unresolved)}; "
                                     f"give its shape with --input-shape {vi.name}:" + "x".join(
                                         str(x.dim_value) if x.HasField("dim_value") else (x.dim_param or "?")
                                         for x in tt.shape.dim))
        if np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            value = rng.random(dims) < 0.5
        elif np.issubdtype(dtype, np.integer):
            value = rng.integers(0, 10, size=dims).astype(dtype)
        else:
            raise GconvError(f"input '{vi.name}' has dtype {dtype}, which cannot be generated; pass inputs explicitly")
        feed[vi.name] = value
    return feed


def _as_model(src: model_io.ModelSource) -> tuple[ModelProto, str | None]:
    if isinstance(src, ModelProto):
        return src, None
    model, info = model_io.load(src)
    return model, info.path


class _Sessions:
    """Two sessions; models over protobuf's 2 GB limit go through a temporary folder."""

    def __init__(self, a: ModelProto, b: ModelProto, choice):
        self.models, self.choice, self.tmp = (a, b), choice, None

    def __enter__(self):
        sources = []
        for i, m in enumerate(self.models):
            if m.ByteSize() > 2**31 - (64 << 20):
                if self.tmp is None:
                    self.tmp = tempfile.TemporaryDirectory(prefix="gconv-verify-")
                path = os.path.join(self.tmp.name, f"model{i}.onnx")
                model_io.save(m, path, external_data=True)
                sources.append(path)
            else:
                sources.append(m)
        return tuple(runtime.session(s, self.choice) for s in sources)

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()

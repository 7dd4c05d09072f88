"""Prove a rewrite: numeric parity and latency of two models with the same inputs and outputs,
measured with onnxruntime.

Parity is reported per output as Polygraphy does (max abs / rel error, the smallest tolerances
that would pass); latency is measured in separate sessions with identical options, warmed up,
interleaved round by round, and reported as medians with their spread and the median of
per-round ratios, with an honest "within noise" verdict.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import ModelProto, TensorProto, helper, numpy_helper

from . import model_io, runtime
from .errors import GconvError
from .graph import _inferred_value_infos
from .wording import VERIFY_REPORT, schema

DEFAULT_BATCH = 2
# The analysis traces symbolic dims at batch 2 and spatial sizes below this (tracing.conv_output_sizes): a
# verification sample beyond it checks a size no proof step was ever evaluated at.
LARGEST_PROBE = 40
# Largest error allowed relative to the reference output's magnitude (max |ref|), by dtype.
# float32 on CPU, measured on ResNeXt-50 at 224x224 (benchmarks/RESULTS.md): every exact rewrite
# stays at 2.8e-7, while two input channels swapped in one group of one grouped Conv give
# 7.1e-6 (the least visible of the 16 convs) to 3.4e-2 (median 4.1e-3). 3e-6 sits 10x above
# the noise and 2.4x below the weakest mutation.
RELATIVE_TOLERANCE = {"float16": 2e-2, "bfloat16": 5e-2, "float32": 3e-6, "float64": 1e-10}
# The least visible wrong model of that evidence (one swapped channel pair, grouped Conv 7): every
# float32 limit must stay below it, or a known-wrong model passes.
WEAKEST_MUTATION_FLOAT32 = 7.1e-6
# On CUDA (parity sessions with TF32 off) the rounding noise of exact rewrites is not measured yet:
# until it is, the CPU limit, 2.4x below the weakest mutation. A GPU whose noise exceeds it fails
# parity loudly (exit 1) instead of passing a wrong model; measure it (benchmarks/parity_evidence.py
# --provider cuda) before widening, and never to WEAKEST_MUTATION_FLOAT32 or above.
CUDA_FLOAT32_TOLERANCE = 3e-6
# float16 against a float32 twin: the rewritten model may be at most this much worse than the original.
FP16_SLACK, FP16_FLOOR = 2.0, 1e-3
# A latency difference is claimed only beyond this (relative), even when the spread is smaller.
MIN_EFFECT = 0.03


@dataclass
class OutputParity:
    """One output compared, as Polygraphy reports it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_abs: float  # also the smallest atol that would pass
    max_rel: float  # max |a-b| / max |ref|: the error relative to the output's magnitude (what is judged)
    min_rtol: float  # smallest elementwise rtol that would pass: max |a-b| / |ref|
    magnitude: float
    tolerance: float  # the limit on max_rel
    passed: bool
    reference: str = "original"  # or "float32 twin of the original"

    def line(self) -> str:
        """Two lines (80 columns): the output and its verdict, then its errors."""
        verdict = "ok" if self.passed else "FAIL"
        head = f"{verdict:<4} {self.name} {self.dtype}{list(self.shape)}"
        if self.reference != "original":
            head += f" [vs {self.reference}]"
        return (f"{head}\n   rel to magnitude {self.max_rel:.3g} (limit {self.tolerance:.1g}); "
                f"max abs {self.max_abs:.3g}; min rtol {self.min_rtol:.3g}")


@dataclass
class LatencyReport:
    """Interleaved latency of A (original) and B (rewritten) on one provider."""

    provider: str
    settings: dict
    rounds: int
    runs_per_round: int
    warmup_runs: tuple[int, int]
    a_median_ms: float
    b_median_ms: float
    a_iqr_ms: tuple[float, float]
    b_iqr_ms: tuple[float, float]
    ratio: float  # median over rounds of t_B / t_A (< 1: B is faster)
    ratio_iqr: tuple[float, float]
    noise: float  # half-width of the ratio's ~95% interval
    verdict: str  # "faster" | "slower" | "within noise"

    @property
    def speedup(self) -> float:
        return 1.0 / self.ratio

    def verdict_text(self) -> str:
        if self.verdict == "within noise":
            return f"ratio {self.ratio:.3f} ±{self.noise:.3f}: no difference beyond the noise"
        factor = f"{self.speedup:.2f}x faster" if self.ratio < 1 else f"{self.ratio:.2f}x slower"
        return f"{factor} (ratio {self.ratio:.3f} ±{self.noise:.3f})"

    def line(self) -> str:
        """Two lines (80 columns): the verdict, then both medians with their interquartile ranges."""
        return (f"latency on {self.provider}: {self.verdict_text()}\n"
                f"  original {self.a_median_ms:.3f} ms (IQR {self.a_iqr_ms[0]:.3f}-{self.a_iqr_ms[1]:.3f}), "
                f"rewritten {self.b_median_ms:.3f} ms (IQR {self.b_iqr_ms[0]:.3f}-{self.b_iqr_ms[1]:.3f})")


@dataclass
class Divergence:
    """The first node (in the original's order) whose output differs between the models."""

    node: str
    op_type: str
    tensor: str
    max_rel: float
    rewritten_node: str = ""  # the node producing the same tensor in the rewritten model
    rewritten_op_type: str = ""

    def line(self) -> str:
        return (f"first divergence: '{self.tensor}', from {self.op_type} '{self.node}' in the original and "
                f"{self.rewritten_op_type} '{self.rewritten_node}' in the rewritten model "
                f"(rel error {self.max_rel:.3g})")


@dataclass
class VerifyReport:
    provider: str
    provider_note: str
    samples: int
    outputs: list[OutputParity] = field(default_factory=list)
    latency: LatencyReport | None = None
    divergence: Divergence | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every output of every sample within its tolerance."""
        return all(o.passed for o in self.outputs)

    def lines(self) -> list[str]:
        """The terminal report: parity verdict, each output, notes, divergence, latency."""
        head = f"parity on {self.provider}, {self.samples} sample(s): {'PASS' if self.passed else 'FAIL'}" \
               f" ({self.provider_note})"
        out = [textwrap.fill(head, 80, subsequent_indent="  ")] + ["  " + o.line() for o in self.outputs]
        out += [textwrap.fill(n, 80, initial_indent="  ", subsequent_indent="    ") for n in self.notes]
        if self.divergence is not None:
            out.append(textwrap.fill(self.divergence.line(), 80, initial_indent="  ", subsequent_indent="    "))
        if self.latency is not None:
            out.append(self.latency.line())
        return out

    def to_dict(self) -> dict:
        """Plain data (schema gconv-rewrite/verify-report, docs/reports.md)."""
        return schema(VERIFY_REPORT) | asdict(self) | {"passed": self.passed}


def verify(original: model_io.ModelSource, rewritten: model_io.ModelSource, provider: str = "auto", *,
           inputs: list[dict[str, np.ndarray]] | None = None, input_shapes: dict[str, tuple[int, ...]] | None = None,
           seed: int = 0, tolerance: float | None = None, latency: bool = True, rounds: int = 20,
           compare_all: bool = False, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Run both models on the same inputs with onnxruntime; compare every output, and time them.

    inputs: samples (name -> array); one generated from `seed` when None. input_shapes resolves
    symbolic dims (a symbolic batch defaults to 2). tolerance overrides the per-dtype limit on
    the error relative to each output's magnitude. compare_all names the first node whose
    outputs diverge when parity fails. latency: interleaved timing over `rounds` rounds.
    """
    check_arguments(rounds, tolerance)
    choice = runtime.choose_provider(provider)
    a, path_a = _as_model(original)
    b, path_b = _as_model(rewritten)
    names = [o.name for o in a.graph.output]
    if sorted(names) != sorted(o.name for o in b.graph.output):
        raise GconvError(f"the models have different outputs: {names} vs {[o.name for o in b.graph.output]}")
    _check_same_inputs(a, b)
    labels: list[str] = []
    if inputs is not None:
        inputs = check_inputs(a, inputs)
    else:
        inputs, labels = generate_samples(a, input_shapes or {}, seed)
    report = VerifyReport(choice.name, choice.note, len(inputs))
    with _Sources(path_a or a, path_b or b) as (src_a, src_b):
        try:
            sess_a = runtime.session(src_a, choice, label="the original model")
        except GconvError as exc:  # it passed onnx.checker at load: not a bad model, a runtime's limit
            raise GconvError(f"{exc}; the model is valid ONNX, which this onnxruntime cannot run, so nothing can "
                             f"be verified here (--no-verify writes the rewrite unverified)") from None
        inputs, got_a = _run_original(sess_a, names, inputs, labels, report)
        try:
            sess_b = runtime.session(src_b, choice, label="the rewritten model")
            got_b = [_run(sess_b, names, feed) for feed in inputs]
        except GconvError as exc:
            raise CandidateError(str(exc)) from None
        report.samples = len(inputs)
        report.notes += branch_notes(a, b, inputs, choice)
        references = None
        if any(o.type.tensor_type.elem_type == TensorProto.FLOAT16 for o in a.graph.output):
            references = _float32_reference(_with_weights(a, path_a), names, inputs, choice, report)
        for i, name in enumerate(names):
            ra, rb = [r[i] for r in got_a], [r[i] for r in got_b]
            if references is not None and np.asarray(ra[0]).dtype == np.float16:
                report.outputs.append(_compare_fp16(name, [r[i] for r in references], ra, rb, tolerance, choice.name))
            else:
                report.outputs.append(_compare(name, ra, rb, tolerance, choice.name))
        if compare_all and not report.passed:
            report.divergence = first_divergence(_with_weights(a, path_a), _with_weights(b, path_b), inputs[0],
                                                 choice, tolerance)
        if choice.name == "cuda":
            report.notes.append(f"parity sessions on CUDA: {runtime.settings_text('parity')}")
        if latency:
            if choice.name == "cuda":  # timed as deployed, not with the parity settings
                sess_a = runtime.session(src_a, choice, purpose="timing", label="the original model")
                sess_b = runtime.session(src_b, choice, purpose="timing", label="the rewritten model")
            report.latency = measure_latency(sess_a, sess_b, inputs[0], choice, rounds, progress)
    return report


class CandidateError(GconvError):
    """The second model cannot be loaded or run where the first runs (in a rewrite: the tool's fault)."""


def _run_original(sess, names, inputs, labels, report: VerifyReport):
    """Outputs of the original on each sample. A generated extra size at which the original itself
    does not run (a model made for some sizes only) is dropped, saying so; the first sample must run."""
    kept, got = [], []
    for i, feed in enumerate(inputs):
        try:
            got.append(_run(sess, names, feed))
            kept.append(feed)
        except GconvError:
            if i == 0 or not labels:
                raise
            report.notes.append(f"the original itself does not run at {labels[i]} (onnxruntime fails), so the "
                                f"models are not compared there")
            labels[i] = ""
    if labels:
        report.notes.insert(0, "inputs generated at sizes " + "; ".join(f"({x})" for x in labels if x))
    return kept, got


def check_arguments(rounds: int, tolerance: float | None) -> None:
    """Timing rounds and tolerance that can mean something, else a GconvError."""
    if rounds < 3:
        raise GconvError(f"rounds must be at least 3 (a median and its spread need them), not {rounds}")
    if tolerance is not None and not 0 < tolerance < float("inf"):
        raise GconvError(f"tolerance must be a positive finite number, not {tolerance}")


def _run(sess, names, feed):
    try:
        return sess.run(names, feed)
    except GconvError:  # already one clear line (e.g. the CUDA provider failed)
        raise
    except Exception as exc:  # noqa: BLE001 - any onnxruntime run failure becomes one clear line
        text = str(exc).strip().splitlines()
        detail = next((line for line in reversed(text) if line.strip() and "Please fix" not in line), str(exc))
        raise GconvError(f"onnxruntime failed to run the model: {' '.join(detail.split())}") from None


# -- branch coverage ----------------------------------------------------------------------------

def branch_notes(a: ModelProto, b: ModelProto, inputs, choice) -> list[str]:
    """Say which rewritten subgraphs the samples did not prove: an If branch of the main graph that
    differs between the models and that no sample took; a rewritten Loop/Scan body (proven only as
    far as the samples ran it)."""
    others = {n.output[0]: n for n in b.graph.node if n.output}
    branches, bodies = [], []
    for node in a.graph.node:
        other = others.get(node.output[0]) if node.output else None
        if other is None or other.op_type != node.op_type or not node.attribute:
            continue
        for att in node.attribute:
            twin = next((t for t in other.attribute if t.name == att.name), None)
            if att.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) and (
                    twin is None or twin.SerializeToString() != att.SerializeToString()):
                (branches if node.op_type == "If" else bodies).append((node, att.name))
    notes = [f"the rewritten body of {n.op_type} '{n.name or n.output[0]}' is proven only as far as the samples "
             f"run it" for n, _ in bodies]
    if branches:
        taken = _branches_taken(a, [n for n, _ in branches], inputs, choice)
        for node, name in branches:
            label = f"{name} of If '{node.name or node.output[0]}'"
            if taken is None:
                notes.append(f"the rewritten {label} may not have run: which branches the samples took is unknown")
            elif name not in taken[node.input[0]]:
                notes.append(f"the rewritten {label} was never executed by the samples: it is not verified "
                             f"(give --inputs that take it)")
    return notes


def _branches_taken(model: ModelProto, ifs, inputs, choice) -> dict[str, set[str]] | None:
    """For each If's condition, the branches ('then_branch', 'else_branch') the samples took; None if
    the conditions cannot be read."""
    conds = list(dict.fromkeys(n.input[0] for n in ifs))
    probe = ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(c, TensorProto.BOOL, None) for c in conds
                              if c not in present)
    try:
        with _Sources(probe) as (src,):
            sess = runtime.session(src, choice)
            values = [sess.run(conds, feed) for feed in inputs]
    except Exception:  # noqa: BLE001 - a condition that cannot be an output: say it is unknown
        return None
    taken: dict[str, set[str]] = {c: set() for c in conds}
    for row in values:
        for c, v in zip(conds, row):
            taken[c].add("then_branch" if bool(np.asarray(v).reshape(-1)[0]) else "else_branch")
    return taken


# -- parity -------------------------------------------------------------------------------------

def _errors(refs, gots) -> tuple[float, float, float, bool]:
    """max abs, max |ref|, min elementwise rtol; False when shapes, non-finite patterns or exact values differ."""
    max_abs = magnitude = min_rtol = 0.0
    for r, g in zip(refs, gots):
        r, g = np.asarray(r), np.asarray(g)
        if r.shape != g.shape:
            return np.inf, 0.0, np.inf, False
        if r.dtype.kind not in "fc":
            if not np.array_equal(r, g):
                return np.inf, 0.0, np.inf, False
            continue
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        if not np.array_equal(np.isnan(r64), np.isnan(g64)) or not np.array_equal(
                np.where(np.isinf(r64), r64, 0), np.where(np.isinf(g64), g64, 0)):
            return np.inf, 0.0, np.inf, False  # NaN/Inf must sit at the same places, with the same signs
        finite = np.isfinite(r64)
        if not finite.any():
            continue
        diff = np.abs(r64[finite] - g64[finite])
        ref = np.abs(r64[finite])
        max_abs = max(max_abs, float(diff.max()))
        magnitude = max(magnitude, float(ref.max()))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(diff == 0, 0.0, diff / ref)
        min_rtol = max(min_rtol, float(rel.max()))
    return max_abs, magnitude, min_rtol, True


def tolerance_for(dtype: str, provider: str = "cpu") -> float:
    """Default limit on an output's error relative to its magnitude."""
    if provider == "cuda" and dtype == "float32":
        return CUDA_FLOAT32_TOLERANCE
    return RELATIVE_TOLERANCE.get(dtype, 0.0)


def _compare(name, refs, gots, tolerance, provider="cpu") -> OutputParity:
    dtype = str(np.asarray(refs[0]).dtype)
    shape = tuple(np.shape(refs[0]))
    max_abs, magnitude, min_rtol, ok = _errors(refs, gots)
    limit = tolerance if tolerance is not None else tolerance_for(dtype, provider)
    max_rel = _relative(max_abs, magnitude)
    return OutputParity(name, dtype, shape, max_abs, max_rel, min_rtol, magnitude, limit, ok and max_rel <= limit)


def _relative(max_abs: float, magnitude: float) -> float:
    if max_abs == 0:
        return 0.0
    return max_abs / magnitude if magnitude > 0 else float("inf")


def _compare_fp16(name, refs32, got_a, got_b, tolerance, provider: str = "cpu") -> OutputParity:
    """float16: both models against the float32 twin; B may be at most FP16_SLACK times worse than A."""
    abs_a, mag, _, ok_a = _errors(refs32, [np.asarray(g, np.float32) for g in got_a])
    if not ok_a:  # the original itself overflows where its twin does not: judge B against A directly
        return _compare(name, got_a, got_b, tolerance, provider)
    abs_b, _, rtol_b, ok_b = _errors(refs32, [np.asarray(g, np.float32) for g in got_b])
    rel_a, rel_b = _relative(abs_a, mag), _relative(abs_b, mag)
    limit = tolerance if tolerance is not None else max(FP16_SLACK * rel_a, FP16_FLOOR)
    return OutputParity(name, "float16", tuple(np.shape(got_a[0])), abs_b, rel_b, rtol_b, mag, limit,
                        ok_b and rel_b <= limit, reference="float32 twin of the original")


def _float32_reference(model: ModelProto, names, inputs, choice, report: VerifyReport):
    """Outputs of the original computed in float32 (for float16 models); None when no twin runs."""
    try:
        twin = float32_twin(model)
        with _Sources(twin) as (src,):
            sess = runtime.session(src, choice)
            feeds = [{k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in feed.items()}
                     for feed in inputs]
            refs = [sess.run(names, feed) for feed in feeds]
    except runtime.CudaFallbackError:
        raise
    except Exception as exc:  # noqa: BLE001 - an op without a float32 kernel, a Cast we cannot retarget ...
        report.notes.append(f"float16 outputs compared with each other: no float32 twin ({str(exc).splitlines()[0]})")
        return None
    report.notes.append(f"float16 outputs judged against a float32 twin of the original: the rewritten model may be "
                        f"at most {FP16_SLACK:g}x less accurate than the original (or {FP16_FLOOR:g} of the magnitude)")
    return refs


def float32_twin(model: ModelProto) -> ModelProto:
    """The same model with every float16 tensor, type and Cast target turned into float32."""
    twin = ModelProto()
    twin.CopyFrom(model)

    def fix_type(t):
        if t.HasField("tensor_type") and t.tensor_type.elem_type == TensorProto.FLOAT16:
            t.tensor_type.elem_type = TensorProto.FLOAT

    def fix_tensor(t: TensorProto):
        if t.data_type == TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    def fix_graph(g):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            fix_type(vi.type)
        for t in g.initializer:
            fix_tensor(t)
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    fix_tensor(a.t)
                if a.HasField("g"):
                    fix_graph(a.g)
                for sub in a.graphs:
                    fix_graph(sub)
                if a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == TensorProto.FLOAT16:
                    a.i = TensorProto.FLOAT

    fix_graph(twin.graph)
    return twin


def first_divergence(a: ModelProto, b: ModelProto, feed, choice, tolerance) -> Divergence | None:
    """Mark every value both models compute as an output and find the first (in A's order) that differs."""
    infos_a, infos_b = _inferred_value_infos(a), _inferred_value_infos(b)
    produced_b = {o: n for n in b.graph.node for o in n.output}
    order = [(n, o) for n in a.graph.node for o in n.output
             if o in produced_b and o in infos_a and o in infos_b
             and infos_a[o].type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)]
    if not order:
        return None
    names = list(dict.fromkeys(o for _, o in order))
    marked = []
    for model, infos in ((a, infos_a), (b, infos_b)):
        m = ModelProto()
        m.CopyFrom(model)
        existing = {o.name for o in m.graph.output}
        m.graph.output.extend(infos[n] for n in names if n not in existing)
        marked.append(m)
    with _Sources(*marked) as (sa, sb):
        out_a = runtime.session(sa, choice).run(names, feed)
        out_b = runtime.session(sb, choice).run(names, feed)
    values = {n: (x, y) for n, x, y in zip(names, out_a, out_b)}
    for node, out in order:
        parity = _compare(out, [values[out][0]], [values[out][1]], tolerance, choice.name)
        if not parity.passed:
            other = produced_b[out]
            return Divergence(node.name or out, node.op_type, out, parity.max_rel, other.name or out, other.op_type)
    return None


# -- latency ------------------------------------------------------------------------------------

def measure_latency(sess_a, sess_b, feed, choice, rounds: int = 20, progress=None) -> LatencyReport:
    """Interleaved timing of two sessions with identical options (see runtime.time_interleaved)."""
    timing = runtime.time_interleaved(runtime.Runner(sess_a, feed, choice), runtime.Runner(sess_b, feed, choice),
                                      rounds=rounds, progress=progress)
    ratios = np.array(timing.ratios)
    q25, q75 = np.percentile(ratios, [25, 75])
    ratio = float(np.median(ratios))
    # ~95% interval of a median: 1.96 * 1.253 * sigma / sqrt(n), sigma ~ IQR / 1.349
    noise = float(1.96 * 1.253 * (q75 - q25) / 1.349 / np.sqrt(len(ratios)))
    if abs(ratio - 1) <= max(noise, MIN_EFFECT):
        verdict = "within noise"
    else:
        verdict = "faster" if ratio < 1 else "slower"
    settings = {"intra_op_spinning": False, "onnxruntime": runtime.ort_version()}
    if choice.name == "cuda":
        settings |= {"io_binding": True} | runtime.cuda_settings("timing")
    a, b = np.array(timing.a_ms), np.array(timing.b_ms)
    return LatencyReport(choice.name, settings, rounds, timing.runs_per_round, timing.warmup_runs,
                         float(np.median(a)), float(np.median(b)), tuple(np.percentile(a, [25, 75]).tolist()),
                         tuple(np.percentile(b, [25, 75]).tolist()), ratio, (float(q25), float(q75)), noise, verdict)


# -- inputs -------------------------------------------------------------------------------------

def graph_inputs(model: ModelProto) -> list[onnx.ValueInfoProto]:
    init_names = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in init_names]


def _signature(vi: onnx.ValueInfoProto) -> str:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return "a non-tensor"
    dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "?"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return f"{dtype}[{', '.join(dims)}]"


def _check_same_inputs(a: ModelProto, b: ModelProto) -> None:
    """Both models must take the same inputs (names, dtypes, static dims): else say which differs."""
    ins_a, ins_b = {vi.name: vi for vi in graph_inputs(a)}, {vi.name: vi for vi in graph_inputs(b)}
    if set(ins_a) != set(ins_b):
        raise GconvError(f"the models have different inputs: {sorted(ins_a)} vs {sorted(ins_b)}")
    for name, va in ins_a.items():
        ta, tb = va.type.tensor_type, ins_b[name].type.tensor_type
        dims_a, dims_b = list(ta.shape.dim), list(tb.shape.dim)
        clash = ta.elem_type != tb.elem_type or (ta.HasField("shape") and tb.HasField("shape") and (
            len(dims_a) != len(dims_b) or any(x.HasField("dim_value") and y.HasField("dim_value")
                                              and x.dim_value != y.dim_value for x, y in zip(dims_a, dims_b))))
        if clash:
            raise GconvError(f"input '{name}' differs: {_signature(va)} in the first model, "
                             f"{_signature(ins_b[name])} in the second")


def check_inputs(model: ModelProto, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """User samples must name exactly the model's inputs."""
    wanted = {vi.name for vi in graph_inputs(model)}
    if not samples:
        raise GconvError("no input samples given")
    for i, sample in enumerate(samples):
        missing, unknown = wanted - set(sample), set(sample) - wanted
        if missing or unknown:
            what = f"missing {sorted(missing)}" if missing else f"unknown {sorted(unknown)}"
            raise GconvError(f"input sample {i + 1}: {what} (the model's inputs are {sorted(wanted)})")
    return [{k: np.asarray(v) for k, v in s.items()} for s in samples]


def load_inputs(paths: list[str]) -> list[dict[str, np.ndarray]]:
    """One sample per .npz file, arrays named after the graph inputs."""
    samples = []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as data:
                samples.append({k: data[k] for k in data.files})
        except (OSError, ValueError) as exc:
            raise GconvError(f"{path}: cannot read inputs ({exc})") from None
    return samples


def _symbolic_batch(model: ModelProto, shapes) -> bool:
    return any(vi.name not in shapes and vi.type.tensor_type.shape.dim and
               not vi.type.tensor_type.shape.dim[0].HasField("dim_value") for vi in graph_inputs(model))


def generate_samples(model: ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0
                     ) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """Inputs at two or more sizes of every symbolic dim, and each sample's sizes in words.

    The first sample is at the given shapes (a symbolic batch: 2); where the batch is symbolic,
    one at batch 1 (Squeeze and broadcasting treat 1 specially); where any dim is symbolic, one
    with every symbolic dim larger than the first and than anything the analysis traced at, so
    that a rewrite proven at small sizes is also run at a size no probe saw.
    """
    if seed < 0:
        raise GconvError(f"seed must be a non-negative integer, not {seed}")
    model_io.check_input_shapes(model, shapes)
    symbols = symbolic_dims(model, shapes)
    if not symbols:
        return _with_bools_negated([generate_inputs(model, shapes, seed)], [])
    base = {key: size for key, (size, _) in symbols.items()}
    plans = [base]
    if any(batch and base[key] != 1 for key, (_, batch) in symbols.items()):
        plans.append({key: (1 if batch else size) for key, (size, batch) in symbols.items()})
    plans.append({key: (max(size + 1, DEFAULT_BATCH + 1) if batch else _larger(size))
                  for key, (size, batch) in symbols.items()})
    samples = [generate_inputs(model, _shapes_with(model, shapes, plan), seed + i) for i, plan in enumerate(plans)]
    labels = [", ".join(f"{key}={size}" for key, size in plan.items()) for plan in plans]
    return _with_bools_negated(samples, labels)


def _with_bools_negated(samples: list[dict], labels: list[str]) -> tuple[list[dict], list[str]]:
    """One more sample with every bool input negated: an If on an input flag then runs both branches."""
    if not any(v.dtype == np.bool_ for v in samples[0].values()):
        return samples, labels
    flipped = {k: (np.asarray(~v) if v.dtype == np.bool_ else v) for k, v in samples[0].items()}
    return samples + [flipped], labels + ([f"{labels[0]}, bool inputs negated"] if labels else [])


def _larger(size: int) -> int:
    """A size above `size` and above every analysis probe; steps of 32 keep a multiple of 32 one."""
    return max(size + 32 if size >= 32 else 2 * size, LARGEST_PROBE + 1)


def symbolic_dims(model: ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, bool]]:
    """Each symbolic input dim (by dim_param; unnamed ones by input and axis): its first sample's
    size (given with `shapes`, else the default batch) and whether it is a batch dim (axis 0)."""
    out: dict[str, tuple[int, bool]] = {}
    for vi in graph_inputs(model):
        if not vi.type.HasField("tensor_type"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                continue
            key = d.dim_param or f"{vi.name}[{axis}]"
            size = shapes[vi.name][axis] if vi.name in shapes else DEFAULT_BATCH if axis == 0 else None
            if size is None:
                raise GconvError(_unresolved(vi.name, vi.type.tensor_type.shape.dim, DEFAULT_BATCH))
            out.setdefault(key, (int(size), axis == 0))
    return out


def _shapes_with(model: ModelProto, shapes: dict, plan: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every input's shape with its symbolic dims at the sizes of `plan`."""
    out = {}
    for vi in graph_inputs(model):
        if not vi.type.HasField("tensor_type"):
            continue
        given = shapes.get(vi.name)
        if not vi.type.tensor_type.HasField("shape"):
            if given:
                out[vi.name] = tuple(given)
            continue
        dims = []
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                dims.append(given[axis] if given else d.dim_value)
            else:
                dims.append(plan[d.dim_param or f"{vi.name}[{axis}]"])
        out[vi.name] = tuple(dims)
    return out


def generate_inputs(model: ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0,
                    batch: int = DEFAULT_BATCH) -> dict[str, np.ndarray]:
    """One sample for every graph input, in a sensible range for its dtype; fixed by `seed`.

    Floats: standard normal; integers: 0..9; bool: fair coin. A symbolic batch (dim 0) is
    `batch`; other symbolic dims must be given in `shapes`.
    """
    rng = np.random.default_rng(seed)
    inputs = graph_inputs(model)
    model_io.check_input_shapes(model, shapes)
    feed = {}
    for vi in inputs:
        if not vi.type.HasField("tensor_type"):
            raise GconvError(f"input '{vi.name}' is not a tensor; pass inputs explicitly")
        tt = vi.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if vi.name in shapes:
            dims = list(shapes[vi.name])
        else:
            dims = []
            for axis, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value"):
                    dims.append(d.dim_value)
                elif axis == 0:
                    dims.append(batch)
                else:
                    raise GconvError(_unresolved(vi.name, tt.shape.dim, batch))
        if np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            value = rng.random(dims) < 0.5
        elif np.issubdtype(dtype, np.integer):
            value = rng.integers(0, 10, size=dims).astype(dtype)
        else:
            raise GconvError(f"input '{vi.name}' has dtype {dtype}, which cannot be generated; pass inputs explicitly")
        feed[vi.name] = np.asarray(value)  # a 0-d draw is a numpy scalar; onnxruntime wants an array
    return feed


def _unresolved(name: str, dims, batch: int) -> str:
    """The error for an input with symbolic non-batch dims: which, and the option to give them."""
    symbols = [d.dim_param or f"dim {axis}" for axis, d in enumerate(dims) if axis > 0 and not d.HasField("dim_value")]
    template = "x".join(str(d.dim_value) if d.HasField("dim_value") else str(batch) if axis == 0 else
                        f"<{d.dim_param or 'dim ' + str(axis)}>" for axis, d in enumerate(dims))
    return (f"input '{name}' has symbolic dims {', '.join(symbols)}; give its shape with "
            f"--input-shape {name}:{template}, each <...> replaced by a size")


def _as_model(src: model_io.ModelSource) -> tuple[ModelProto, str | None]:
    """The model, and its path when onnxruntime can load it from there directly (no temporary copy)."""
    if isinstance(src, gs.Graph):
        return model_io.from_graphsurgeon(src), None
    if isinstance(src, ModelProto):
        return src, None
    return model_io.load(src, weights=False)[0], os.fspath(src)


def _with_weights(model: ModelProto, path: str | None) -> ModelProto:
    return model_io.load(path)[0] if path and model_io.uses_external_data(model) else model


class _Sources:
    """Session sources for models: the ModelProto itself, or a temporary file past protobuf's 2 GB limit."""

    def __init__(self, *models: ModelProto | str):
        self.models, self.tmp = models, None

    def __enter__(self):
        sources = []
        for i, m in enumerate(self.models):
            if isinstance(m, str):
                sources.append(m)
            elif model_io.needs_external_data(m):
                if self.tmp is None:
                    self.tmp = tempfile.TemporaryDirectory(prefix="gconv-verify-")
                path = os.path.join(self.tmp.name, f"model{i}.onnx")
                model_io.save(m, path, external_data=True)
                sources.append(path)
            else:
                sources.append(m)
        return tuple(sources)

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()

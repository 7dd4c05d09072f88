"""The Python API: `rewrite` and `verify`, taking ModelProtos or paths."""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from . import basis, model_io, runtime, tuning
from .decide import DIRECTIONS, Direction
from .errors import GconvError, InternalError
from .geometry import FORMS, Form, Probe
from .inspection import InspectReport, inspect
from .model_io import ModelSource
from .report import RewriteResult
from .rewrite import rewrite_model
from .tune_cache import TuneCache, cached_planner, target_key
from .tune_report import TuneEntry, TuneReport
from .verify import CandidateError, VerifyReport, check_arguments, verify

__all__ = ["rewrite", "verify", "inspect", "tune", "RewriteResult", "VerifyReport", "InspectReport", "TuneReport"]

# The default command on a device without its own calibration measures the model's geometries first, for at
# most this long (ResNeXt-50's 7 geometries take 5-10 s on 2 cores); geometries left over keep the profile's picks.
AUTO_TUNE_BUDGET_S = 12.0


def rewrite(model: ModelSource, direction: Direction = "auto", *, form: Form | None = None, verify_result: bool = True,
            provider: str = "auto", inputs: Sequence[dict[str, np.ndarray]] | None = None,
            input_shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0, latency: bool = True,
            rounds: int = 20, tolerance: float | None = None, compare_all: bool = False, tune_first: bool = False,
            cache: str | None = None, progress=None, tune_progress=None, device: str | None = None,
            auto_tune: bool | None = None, profile: str | None = None) -> RewriteResult:
    """Rewrite grouped Convs and their emulations in `model` (a ModelProto or a path); `model` is never modified.

    direction: "fuse" turns every exact emulation into one Conv; "expand" turns every native
    grouped Conv into depthwise Conv + Reshape + ReduceSum + Reshape; "auto" picks per node
    the form the cost model (or `tune`'s measurements) says is fastest on `provider`, and
    undoes the rewrite if verification does not measure it faster (never-regress guard).
    form: force every grouped conv, native or emulated, into "native", "dw" (the depthwise
    emulation), "split" (Split -> G Convs -> Concat) or "dense" (block-diagonal weights).
    provider: the target ("auto": CUDA where it works, else CPU; "cuda" with verify_result=False
    plans for CUDA even where it does not run); auto mode plans for it with
    its cost profile, and measured times from the tune cache (`cache`, default: the user's
    cache directory) override predictions. tune_first: run `tune` on this model first.
    device: with provider "cuda" and verify_result=False, plan for this GPU model with its shipped
    CUDA profile (e.g. "NVIDIA H200"); the report says so.
    auto_tune (default: on unless $GCONV_REWRITE_AUTOTUNE=0): in auto mode with verification, on a
    device the cost model was not calibrated on, tune this model's geometries first, within
    AUTO_TUNE_BUDGET_S (cached: once per device). profile: the cost profile to plan with (a shipped
    profile's name or a file; default: this device's calibration, else the closest machine class).
    input_shapes: concrete shapes of inputs with symbolic dims (name -> shape), used to plan
    (the written graph keeps its symbolic dims) and to generate verification inputs.
    verify_result: prove the rewrite with onnxruntime on `provider` (`result.verification`):
    parity of every output and, with `latency`, interleaved timing; skipped when nothing
    changed. The other arguments are those of `verify`.
    """
    if direction not in DIRECTIONS:
        raise GconvError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
    if form is not None and form not in FORMS:
        raise GconvError(f"form must be one of {', '.join(FORMS)}, not {form!r}")
    check_arguments(rounds, tolerance)
    if device and (verify_result or tune_first):
        raise GconvError(f"--device '{device}' plans for a GPU that need not be here; verifying and tuning run here: "
                         "use it with --no-verify (or inspect)")
    original, info = model_io.load(model)  # our own copy
    # Planning alone runs nothing: a CPU-only machine may plan for CUDA; verifying or tuning needs it here.
    choice = (runtime.choose_provider if verify_result or tune_first else runtime.target_provider)(provider)
    chosen = basis.select(choice.name, named=profile)
    warnings = list(chosen.warnings)
    tune_report = None
    if tune_first or _tunes_first(auto_tune, chosen, verify_result, direction, form):
        tune_report = _tune_before_planning(original, info, choice.name, tune_first, warnings, cache=cache,
                                            input_shapes=input_shapes, progress=tune_progress, profile=profile)
    planner = cached_planner(choice.name, cache, chosen.profile, device=device)
    rewritten = original
    if verify_result:  # keep the original for the comparison
        rewritten = type(original)()
        rewritten.CopyFrom(original)
    plan_shapes = model_io.shapes_at(original, input_shapes) if input_shapes else None
    decisions = rewrite_model(rewritten, direction, form, info.value_infos, planner, plan_shapes)
    result = RewriteResult(rewritten, decisions, direction, info, provider=choice.name, planner=planner.describe(),
                           tuning=tune_report, warnings=warnings + ([planner.warning] if planner.warning else []))
    if result.changed:
        _check_rewritten(rewritten)
    if verify_result and result.changed:
        # onnxruntime reads a big original from its file rather than from a temporary copy
        reference = (info.path if info.path and (info.external_data or model_io.needs_external_data(original))
                     else original)
        try:
            result.verification = verify(reference, rewritten, provider,
                                         inputs=list(inputs) if inputs is not None else None, input_shapes=input_shapes,
                                         seed=seed, latency=latency, rounds=rounds, tolerance=tolerance,
                                         compare_all=compare_all, progress=progress)
        except CandidateError as exc:  # the original runs, so this is the tool's fault
            raise InternalError(f"the rewrite produced a model onnxruntime cannot run ({exc})") from None
    if direction == "auto" and form is None and result.verification is not None:
        _never_regress(result, original)
    if direction == "auto" and form is None and result.changed and (result.verification is None or not latency):
        result.warnings.append("not timed (--no-verify or --no-latency): the never-regress guard did not run")
    return result


def _check_rewritten(model) -> None:
    """A rewritten model that onnx.checker or shape inference rejects is a bug of the tool, never
    written (also with --no-verify)."""
    try:
        model_io.validate(model, "the rewritten model")
    except GconvError as exc:
        raise InternalError(f"the rewrite produced an invalid model ({exc})") from None


def _tune_before_planning(model, info, provider: str, asked: bool, warnings: list[str], **kwargs) -> TuneReport | None:
    """`tune` before planning: asked for (--tune: no budget, errors are errors) or automatic (a time budget; an
    unusable cache is a warning, the picks then rest on the profile). None when there was nothing to tune."""
    try:
        report = tune(model, provider, budget_s=None if asked else AUTO_TUNE_BUDGET_S, _info=info, **kwargs)
    except GconvError as exc:
        if asked:
            raise
        warnings.append(f"not tuned first ({exc}): picks rest on the cost profile")
        return None
    report.why = "asked with --tune" if asked else "this device is not calibrated (--no-tune skips)"
    if not asked and not (report.entries or report.over_budget or report.skipped):
        return None  # no grouped conv: nothing was tuned, nothing to report
    return report


def _tunes_first(auto_tune: bool | None, chosen: basis.Basis, verify_result: bool, direction: str, form) -> bool:
    """The default command measures before planning where nothing calibrated this device: verification runs the
    provider here anyway, and a profile of another machine picks within 5% of the best far less often."""
    if auto_tune is None:
        auto_tune = os.environ.get("GCONV_REWRITE_AUTOTUNE", "1") != "0"
    return auto_tune and verify_result and direction == "auto" and form is None and not chosen.this_device


def _never_regress(result: RewriteResult, original) -> None:
    """auto mode: a rewrite that is not measurably faster is undone (as a whole: the timing is end to end)."""
    latency = result.verification.latency
    if latency is None or latency.verdict == "faster" or not result.verification.passed:
        return
    result.model = original
    why = ("not faster beyond the noise" if latency.verdict == "within noise"
           else f"{1 / latency.speedup:.2f}x slower")
    for d in result.decisions:
        if d.action in ("fused", "expanded", "converted"):
            d.action, d.reason = "reverted", f"the rewritten model was {why} ({latency.verdict_text()})"
            d.form = d.was
            d.nodes_removed = d.nodes_added = 0


def tune(model: ModelSource, provider: str = "auto", *, rounds: int = 9, cache: str | None = None, force: bool = False,
         input_shapes: dict[str, tuple[int, ...]] | None = None, progress=None, budget_s: float | None = None,
         profile: str | None = None, _info=None) -> TuneReport:
    """Measure every distinct grouped-conv geometry of `model` in each exact form on `provider`.

    Each geometry becomes a single-conv model per form, timed like verification does (own
    sessions, spinning off, forms rotated round by round). Results are cached per (device,
    provider, onnxruntime version, geometry, dtype) in `cache` (default: the user's cache
    directory, see tune_cache.cache_path); cached geometries are not measured again unless `force`.
    `rewrite` then uses the measured times instead of the predictions. `input_shapes` gives
    symbolic input dims a size (name -> shape), so that symbolic-size convs can be measured.
    budget_s: start no new measurement after this many seconds; the geometries with the most predicted
    time go first, the rest are listed in the report (`over_budget`) and keep their predictions.
    """
    check_arguments(rounds, None)
    start = time.monotonic()
    if _info is None:
        model, _info = model_io.load(model)
    choice = runtime.choose_provider(provider)
    store = TuneCache(cache)
    store.check_writable()  # before minutes of measuring, not after
    target = target_key(choice)
    report = TuneReport(target, store.path)
    groups: dict[str, tuple[Probe, list[str]]] = {}
    weight: dict[str, float] = {}  # predicted time of each geometry in the model: what to measure first
    for finding in inspect(model, provider=choice.name, input_shapes=input_shapes, profile=profile,
                           _info=_info).findings:
        if finding.status == "skipped" or finding.spec is None or finding.spec.is_depthwise:
            continue
        probe = Probe.from_spec(finding.spec)
        if probe is None:
            report.skipped.append(finding.node)
            continue
        groups.setdefault(probe.key(), (probe, []))[1].append(finding.node)
        times = finding.prediction.times_ms if finding.prediction is not None else {}
        weight[probe.key()] = weight.get(probe.key(), 0.0) + times.get("native", 0.0)
    todo = [key for key in groups if force or store.get(target, groups[key][0]) is None]
    done = 0
    for key in sorted(groups, key=lambda k: (k in todo, -weight.get(k, 0.0))):
        probe, nodes = groups[key]
        cached = key not in todo
        if cached:
            m = store.get(target, probe)
        elif budget_s is not None and time.monotonic() - start > budget_s:
            report.over_budget.append(key)
            continue
        else:
            tuning.wait_for_quiet(max_wait_s=2.0)
            m = tuning.measure(probe, choice, rounds=rounds)
            store.put(target, m)
            store.save()  # an interrupted tune keeps what it measured
            done += 1
            if progress is not None:
                progress(done, len(todo))
        report.entries.append(TuneEntry(key, nodes, m.times_ms, m.best(), cached, m.notes))
    report.seconds = round(time.monotonic() - start, 2)
    return report

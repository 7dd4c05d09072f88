"""The Python API: `rewrite` and `verify`, taking ModelProtos or paths."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import model_io
from .model_io import ModelSource
from .rewrite import DIRECTIONS, Direction, Form, RewriteResult, rewrite_model
from .inspection import InspectReport, inspect
from .verify import VerifyReport, verify

__all__ = ["rewrite", "verify", "inspect", "RewriteResult", "VerifyReport", "InspectReport"]


def rewrite(model: ModelSource, direction: Direction = "auto", *, form: Form | None = None, verify_result: bool = True,
            provider: str = "auto", inputs: Sequence[dict[str, np.ndarray]] | None = None,
            input_shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0, latency: bool = True, rounds: int = 20,
            tolerance: float | None = None, compare_all: bool = False, progress=None) -> RewriteResult:
    """Rewrite grouped Convs and their emulations in `model` (a ModelProto or a path); `model` is never modified.

    direction: "fuse" turns every exact emulation into one Conv; "expand" turns every native
    grouped Conv into depthwise Conv + Reshape + ReduceSum + Reshape; "auto" picks per node
    (today: fuse emulations, keep native grouped Convs, the fastest form on onnxruntime CPU).
    form: force every grouped conv, native or emulated, into "native", "dw" (the depthwise
    emulation), "split" (Split -> G Convs -> Concat) or "dense" (block-diagonal weights).
    verify_result: prove the rewrite with onnxruntime on `provider` (`result.verification`):
    parity of every output and, with `latency`, interleaved timing; skipped when nothing
    changed. The other arguments are those of `verify`.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    original, info = model_io.load(model)  # our own copy
    rewritten = original
    if verify_result:  # keep the original for the comparison
        rewritten = type(original)()
        rewritten.CopyFrom(original)
    decisions = rewrite_model(rewritten, direction, form, info.value_infos)
    result = RewriteResult(rewritten, decisions, direction, info)
    if verify_result and result.changed:
        # onnxruntime reads a big original from its file rather than from a temporary copy
        reference = info.path if info.path and (info.external_data or model_io.needs_external_data(original)) else original
        result.verification = verify(reference, rewritten, provider,
                                     inputs=list(inputs) if inputs is not None else None, input_shapes=input_shapes, seed=seed,
                                     latency=latency, rounds=rounds, tolerance=tolerance, compare_all=compare_all,
                                     progress=progress)
    if direction == "auto" and form is None and result.verification is not None:
        _never_regress(result, original)
    return result


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
            d.action, d.reason = "reverted", f"the rewritten model was {why} ({latency.line().split('; ')[-1]})"
            d.nodes_removed = d.nodes_added = 0

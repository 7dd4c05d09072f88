"""Where the decision is made: per candidate, which form to write (or none), and why.

The policy: a forced `form` is obeyed where the conv has it; `fuse` / `expand` turn emulations
into one Conv / native grouped Convs into the depthwise emulation; `auto` writes the form the
planner picks (measured times first, else the cost model's predictions on the target).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .analysis import SKIPPED_WHAT, Candidate, Composite, NativeGrouped, Skip, anchor, planning_spec
from .cost import Planner
from .geometry import FORMS, Form
from .graph import ShapeTable
from .report import Decision
from .tracing import node_label

Direction = Literal["auto", "expand", "fuse"]
DIRECTIONS = ("auto", "expand", "fuse")
_FORM_TEXT = {"native": "one Conv(group=G)", "dw": "depthwise Conv + Reshape + ReduceSum + Reshape",
              "split": "Split -> G Convs -> Concat", "dense": "one dense Conv with block-diagonal weights"}


@dataclass(frozen=True)
class Intent:
    """What the user asked for and what planning needs: the decision policy's input, one per model.

    form: forces every grouped conv into one form (None: `direction` decides); planner: the cost
    model of the target (None only with a forced form: nothing is planned then, nor predicted);
    resolved: value shapes at concrete input shapes, for planning convs whose dims are symbolic.
    """

    direction: Direction = "auto"
    form: Form | None = None
    planner: Planner | None = None
    resolved: ShapeTable | None = None


def decide(cand: Candidate, intent: Intent, opset: int) -> tuple[Decision, str | None]:
    """What to do with a candidate: a Decision, and the form to write (None: leave it)."""
    direction, form, planner, resolved = intent.direction, intent.form, intent.planner, intent.resolved
    spec = planning_spec(cand, resolved)
    if isinstance(cand, Skip):
        return Decision(node_label(cand.node), cand.kind, "skipped", SKIPPED_WHAT[cand.kind], cand.reason, spec,
                        code=cand.code), None
    comp = isinstance(cand, Composite)
    label = node_label(anchor(cand))
    if isinstance(cand, NativeGrouped):
        kind, current, computes = "grouped_conv", "native", f"grouped Conv {cand.spec.describe()}"
    elif comp:
        kind, current, computes = cand.kind, cand.was, f"{cand.found_as}: a {cand.grouping.describe()}"
    else:
        kind, current, computes = "emulation", "dw", f"emulation of a {cand.grouping.describe()}"
    native = current == "native"
    as_written = not comp or cand.as_written  # a composite in its form may still differ from how it is written
    depthwise = not isinstance(cand, NativeGrouped) and cand.grouping.is_depthwise
    available = ("native",) if depthwise else tuple(f for f in FORMS if f != "dw" or opset >= 5)
    prediction = planner.plan(spec, available) if planner is not None and not depthwise else None

    def decision(action, reason, now):
        return Decision(label, kind, action, computes, reason, spec, form=now, prediction=prediction, was=current)

    if form is None:
        if direction == "expand" and not native:
            return decision("kept", "direction=expand keeps emulations", current), None
        if direction == "fuse" and native:
            return decision("kept", "direction=fuse keeps native grouped Convs", current), None
        if direction == "auto":
            form = prediction.form if prediction is not None else "native"
            if form == current and as_written:
                return decision("kept", prediction.why, current), None
        else:
            form = {"expand": "dw", "fuse": "native"}[direction]
    elif depthwise and form != "native":
        skipped = decision("skipped", f"a depthwise Conv has no {form} form", current)
        skipped.code = "no_such_form"
        return skipped, None
    if form == current and as_written and (native or comp):
        return decision("kept", f"already in the {form} form", current), None
    if form == "dw" and opset < 5:
        skipped = decision("skipped", f"opset {opset} < 5: Reshape takes no shape input, "
                                      "so the emulation cannot be written", current)
        skipped.code = "opset_too_old"
        return skipped, None
    action = {"native": "fused" if not isinstance(cand, NativeGrouped) else "kept",
              "dw": "expanded" if native else "converted"}.get(form, "converted")
    reason = "" if action == "fused" else f"to {_FORM_TEXT[form]}"
    if depthwise and cand.grouping.max_terms > 1:
        # Exact all the same: the model computes this, whatever its author meant.
        reason = ("NOT a grouped conv: it sums over the multiplier axis (Cog), not the in-group axis; "
                  "rewritten to the depthwise Conv it equals")
    if direction == "auto" and prediction is not None and prediction.form == form:
        reason = (reason + "; " if reason else "") + prediction.why
    return decision(action, reason, "depthwise" if depthwise else form), form

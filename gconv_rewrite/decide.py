"""Where the decision is made: per candidate, which form to write (or none), and why.

The policy: a forced `form` is obeyed where the conv has it; `fuse` / `expand` turn emulations
into one Conv / native grouped Convs into the depthwise emulation; `auto` writes the form the
planner picks (measured times first, else the cost model's predictions on the target).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .analysis import Candidate, NativeGrouped, Skip, node_label, planning_spec
from .cost import Planner
from .geometry import FORMS, Form
from .graph import ShapeTable
from .report import Decision

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
        return Decision(node_label(cand.node), cand.kind, "skipped",
                        "grouped Conv" if cand.kind == "grouped_conv" else "depthwise Conv followed by channel ops",
                        cand.reason, spec, code=cand.code), None
    native = isinstance(cand, NativeGrouped)
    label = node_label(cand.node if native else cand.dw)
    kind = "grouped_conv" if native else "emulation"
    computes = f"grouped Conv {cand.spec.describe()}" if native else f"emulation of a {cand.grouping.describe()}"
    current = "native" if native else "dw"
    depthwise = not native and cand.grouping.is_depthwise
    available = ("native",) if depthwise else tuple(f for f in FORMS if f != "dw" or opset >= 5)
    prediction = planner.plan(spec, available) if planner is not None and not depthwise else None

    def decision(action, reason, now):
        return Decision(label, kind, action, computes, reason, spec, form=now, prediction=prediction)

    if form is None:
        if direction == "expand" and not native:
            return decision("kept", "direction=expand keeps emulations", current), None
        if direction == "fuse" and native:
            return decision("kept", "direction=fuse keeps native grouped Convs", current), None
        if direction == "auto":
            form = prediction.form if prediction is not None else "native"
            if form == current:
                return decision("kept", prediction.why, current), None
        else:
            form = {"expand": "dw", "fuse": "native"}[direction]
    elif depthwise and form != "native":
        skipped = decision("skipped", f"a depthwise Conv has no {form} form", current)
        skipped.code = "no_such_form"
        return skipped, None
    if native and form == current:
        return decision("kept", f"already in the {form} form", current), None
    if form == "dw" and opset < 5:
        skipped = decision("skipped", f"opset {opset} < 5: Reshape takes no shape input, "
                                      "so the emulation cannot be written", current)
        skipped.code = "opset_too_old"
        return skipped, None
    action = {"native": "fused" if not native else "kept",
              "dw": "expanded" if native else "converted"}.get(form, "converted")
    reason = "" if action == "fused" else f"to {_FORM_TEXT[form]}"
    if depthwise and cand.grouping.max_terms > 1:
        # Exact all the same: the model computes this, whatever its author meant.
        reason = ("NOT a grouped conv: it sums over the multiplier axis (Cog), not the in-group axis; "
                  "rewritten to the depthwise Conv it equals")
    if direction == "auto" and prediction is not None and prediction.form == form:
        reason = (reason + "; " if reason else "") + prediction.why
    return decision(action, reason, "depthwise" if depthwise else form), form

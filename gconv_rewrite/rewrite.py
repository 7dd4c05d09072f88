"""Rewrite a model: the pass that walks its graphs (subgraphs first, bottom-up), asks the policy
(decide.py) what to do with each candidate, and has the edits applied (surgery.py) once per graph.
The decisions it returns are worded by report.py.
"""

from __future__ import annotations

from onnx import GraphProto, ModelProto

from .analysis import analyse
from .cost import Planner
from .decide import DIRECTIONS, Direction, Intent, decide
from .geometry import FORMS, Form
from .graph import GraphIndex, NameGen, ShapeTable, attr, default_opset, outer_references, subgraphs
from .report import Decision
from .surgery import Edit, apply_form
from .tracing import node_label
from .tune_cache import cached_planner


def rewrite_model(model: ModelProto, direction: Direction = "auto", form: Form | None = None,
                  value_infos: dict | None = None, planner: Planner | None = None,
                  plan_shapes: dict | None = None) -> list[Decision]:
    """Rewrite `model` in place (callers pass their own copy) and return the decisions.

    `form` forces every grouped conv (native or emulated) into one form; `direction` then is moot.
    `value_infos`: the model's inferred shapes when already known (model_io.load returns them).
    `planner`: the cost model of the target provider (default: onnxruntime CPU on this machine, with
    its tune cache; with a forced `form` and no planner nothing is planned, nor predicted).
    `plan_shapes`: value shapes at concrete input shapes (model_io.shapes_at), for planning and
    reports where the model's spatial dims are symbolic; the graph stays symbolic.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if form is not None and form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    shapes = ShapeTable(model, value_infos or None)
    names = NameGen(model)
    opset = default_opset(model)
    decisions: list[Decision] = []
    if planner is None and form is None:  # a forced form needs no plan
        planner = cached_planner("cpu")
    resolved = ShapeTable(model, plan_shapes) if plan_shapes else None
    _rewrite_graph(model.graph, shapes, opset, None, "main", Intent(direction, form, planner, resolved), names,
                   decisions, model.ir_version)
    for fn in model.functions:
        for node in fn.node:
            if node.op_type == "Conv" and attr(node, "group", 1) > 1:
                decisions.append(Decision(node_label(node), "grouped_conv", "skipped", "Conv inside a function",
                                          "model-local functions are not rewritten "
                                          "(no shapes or constant weights of their own)",
                                          graph=f"function {fn.name}", code="in_function"))
    return decisions


def _rewrite_graph(graph: GraphProto, shapes, opset: int, outer: GraphIndex | None, path: str,
                   intent: Intent, names: NameGen, decisions: list[Decision], ir_version: int) -> set[str]:
    """Rewrite one graph, its subgraphs first; returns the enclosing-scope names it no longer reads."""
    reads_before = outer_references(graph) if outer is not None else set()
    ix = GraphIndex(graph, shapes, opset, outer, path, ir_version)
    nested = [(node, sub) for node in ix.nodes if node.attribute for sub in subgraphs(node)]
    dropped: set[str] = set()
    for node, sub in nested:
        dropped |= _rewrite_graph(sub, shapes, opset, ix, f"{path}/{node_label(node)}/{sub.name or 'body'}",
                                  intent, names, decisions, ir_version)
    if nested:
        ix = GraphIndex(graph, shapes, opset, outer, path, ir_version)
    edit = Edit()
    edit.seeds = sorted(dropped)  # weights a rewritten body no longer reads may now be dead here
    for cand in analyse(ix):
        decision, target = decide(cand, intent, opset)
        decision.graph = path
        if target is not None:
            apply_form(ix, cand, target, names, edit, decision)
        decisions.append(decision)
    if edit:
        edit.commit(ix)
    return reads_before - outer_references(graph) if outer is not None else set()

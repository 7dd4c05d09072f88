"""The package's import graph: layered, acyclic, every module importable on its own, no imports in functions.

The flow is load -> analyse -> plan -> apply -> verify -> save + report (README, "Where things are"):
a module imports only modules of lower layers, so a cycle, or a stage reaching up into a later
one, fails here rather than as an ImportError that depends on which module was imported first.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gconv_rewrite"

# Lowest first. A module imports (at run time) only modules of lower layers; a new module must be placed here.
LAYERS = [
    {"errors", "wording"},                          # no imports from the package
    {"geometry", "graph", "samples"},               # the conv description; graph indexes; test-model builders
    {"symbolic"},                                   # shape values over symbolic sizes; ONNX-exact constant evaluation
    {"model_io", "runtime", "channelmap"},          # load/save; onnxruntime sessions; index propagation
    {"lowering"},                                   # each form's weight algebra and nodes (analysis and probes use it)
    {"tracing"},                                    # regions of channel-moving ops and their traces
    {"composites"},                                 # split forms, block-diagonal and mixed Convs
    {"analysis"},                                   # analyse: candidates and skip reasons
    {"cost"},                                       # plan: predictions
    {"cost_fit", "tuning"},                         # plan: fitting (offline); measuring probes
    {"tune_cache"},                                 # plan: measured times, and the planner that uses them
    {"report", "tune_report", "basis"},             # the reports' data and wording; which profile planning rests on
    {"decide", "surgery", "calibration"},           # plan: the decision policy; apply: graph edits; calibrating
    {"rewrite"},                                    # apply: the pass over a model's graphs
    {"verify"},                                     # verify: parity and latency
    {"inspection"},                                 # inspect: analyse + plan, nothing written
    {"api"},
    {"cli"},
    {"__init__", "__main__"},
]
LAYER = {module: i for i, layer in enumerate(LAYERS) for module in layer}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(module: str) -> tuple[set[str], set[str], list[str]]:
    """The package modules `module` imports at run time, those it imports for annotations only
    (under `if TYPE_CHECKING:`), and its imports that are not at module level."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    runtime, typing_only, nested = set(), set(), []

    def targets(node) -> set[str]:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                return {node.module.split(".")[0]}
            return {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gconv_rewrite."):
            return {node.module.split(".")[1]}
        return set()

    for stmt in tree.body:
        if isinstance(stmt, ast.If) and _is_type_checking(stmt):
            for inner in stmt.body:
                typing_only |= targets(inner)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            runtime |= targets(stmt)
    top = {id(s) for s in tree.body} | {id(s) for s in tree.body if isinstance(s, ast.If) and _is_type_checking(s)
                                        for s in s.body}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            names = [a.name for a in node.names]
            if not (isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None
                    and names == ["__version__"]):  # the package's version, read when a report is written
                nested.append(f"line {node.lineno}: import {', '.join(names)}")
    return runtime, typing_only, nested


def _modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_every_module_has_a_layer():
    assert sorted(set(_modules()) - set(LAYER)) == [], "place new modules in LAYERS"
    assert sorted(set(LAYER) - set(_modules())) == [], "LAYERS names modules that no longer exist"


def test_imports_go_down_the_layers_only():
    upward = []
    for module in _modules():
        runtime, _, _ = _imports(module)
        upward += [f"{module} (layer {LAYER[module]}) imports {dep} (layer {LAYER[dep]})"
                   for dep in sorted(runtime) if LAYER[dep] >= LAYER[module]]
    assert upward == []


def test_the_import_graph_has_no_cycle_even_counting_annotation_only_imports():
    graph = {m: _imports(m)[0] | _imports(m)[1] for m in _modules()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return path + [module, dep]
            if dep not in state and (cycle := visit(dep, path + [module])):
                return cycle
        state[module] = "done"
        return None

    for module in graph:
        if module not in state:
            assert visit(module, []) is None


def test_no_imports_inside_functions():
    nested = {m: n for m in _modules() if (n := _imports(m)[2])}
    assert nested == {}


def test_each_module_imports_on_its_own():
    """Each module imported first, in a fresh package (its __init__ not run): no order-dependent cycle."""
    script = f"""
import importlib, sys, types
failed = []
for name in {_modules()!r}:
    for key in [k for k in sys.modules if k == "gconv_rewrite" or k.startswith("gconv_rewrite.")]:
        del sys.modules[key]
    package = types.ModuleType("gconv_rewrite")
    package.__path__ = [{str(PACKAGE)!r}]
    package.__version__ = "0"
    sys.modules["gconv_rewrite"] = package
    if name in ("__init__", "__main__"):
        continue
    try:
        importlib.import_module("gconv_rewrite." + name)
    except Exception as exc:
        failed.append(f"{{name}}: {{type(exc).__name__}}: {{exc}}")
print(failed)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

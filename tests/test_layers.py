"""The package's layers, read from its imports (ast, nothing imported): no module imports a higher layer, and no
import cycle exists between modules (docs/architecture.md draws the layers)."""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "relex_callback")

# lowest first; a module may import its own layer and the layers before it
LAYERS = [
    ("ground", {"errors", "config", "params", "compat"}),
    ("core", {"core"}),
    ("files", {"files"}),
    ("trajectory", {"trajectory"}),
    ("pipeline", {"pipeline"}),
    ("offline", {"offline"}),
    ("trainer", {"trainer"}),
    ("examples", {"examples"}),
    ("public", {"__init__"}),
]


def _modules() -> dict:
    """Dotted module name (under relex_callback) -> path."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), PKG)[:-3].replace(os.sep, ".")
                out[rel] = os.path.join(d, f)
    return out


MODULES = _modules()


def layer_of(mod: str) -> int:
    head = mod.split(".")[0]
    for i, (_, members) in enumerate(LAYERS):
        if head in members:
            return i
    raise AssertionError(f"relex_callback.{mod} belongs to no layer: add it to LAYERS (and docs/architecture.md)")


def _resolve(mod: str, node: ast.ImportFrom) -> list:
    """The package modules an ``import`` statement of ``mod`` names (relative or absolute), every name resolved."""
    if node.level:
        pkg = mod.split(".")[:-1] if not mod.endswith("__init__") else mod.split(".")[:-1]
        base = pkg[: len(pkg) - (node.level - 1)]
    elif node.module and node.module.split(".")[0] == "relex_callback":
        base = []
    else:
        return []
    parts = base + ([p for p in node.module.split(".") if p] if node.module else [])
    if not node.level:
        parts = parts[1:]  # drop "relex_callback"
    found = []
    for alias in node.names:  # "from .x import y": y may be a module of package x
        cand = ".".join(parts + [alias.name])
        if cand in MODULES or cand + ".__init__" in MODULES:
            found.append(cand if cand in MODULES else cand + ".__init__")
    target = ".".join(parts)
    if target in MODULES:
        found.append(target)
    elif (target + ".__init__" if target else "__init__") in MODULES:
        found.append(target + ".__init__" if target else "__init__")
    return found


def imports_of(mod: str) -> set:
    tree = ast.parse(open(MODULES[mod]).read())
    out = set()
    for node in ast.walk(tree):  # every import, also those inside functions (deferred imports count too)
        if isinstance(node, ast.ImportFrom):
            out.update(_resolve(mod, node))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("relex_callback."):
                    name = alias.name.split(".", 1)[1]
                    out.add(name if name in MODULES else name + ".__init__")
    out.discard(mod)
    return {m for m in out if m in MODULES}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer_and_every_subpackage_says_what_it_owns():
    for mod in MODULES:
        layer_of(mod)
    for d in {m.rsplit(".", 1)[0] for m in MODULES if "." in m}:
        init = os.path.join(PKG, *d.split("."), "__init__.py")
        if d.count(".") == 0:  # the layers' sub-packages (kernels inside core is a part of core)
            doc = ast.get_docstring(ast.parse(open(init).read()))
            assert doc and "May import" in doc, (
                f"relex_callback/{d}/__init__.py must say what the layer owns and may import"
            )


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_module_imports_a_higher_layer(mod):
    up = upward(mod, GRAPH)
    assert not up, (f"relex_callback.{mod} ({LAYERS[layer_of(mod)][0]}) imports {up} from a higher layer: move the "
                    "shared piece down, or pass it in")


def find_cycles(graph: dict) -> list:
    """Every import circle of ``graph`` (module -> imported modules) found by a depth-first walk."""
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t.endswith("__init__") and t != "__init__" and t.rsplit(".", 1)[0] == m.rsplit(".", 1)[0]:
                continue  # a module and its own package's docstring-only __init__
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif not state.get(t):
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)
    return cycles


def upward(mod: str, graph: dict) -> list:
    """The modules ``mod`` imports from a higher layer."""
    return sorted(t for t in graph[mod] if layer_of(t) > layer_of(mod))


def test_no_import_cycle():
    cycles = find_cycles(GRAPH)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_an_upward_import_and_a_cycle():
    """The rule catches a violation: a core module importing the trainer, and two modules importing each other
    (the checks above run the same functions on the real graph)."""
    fake = {m: set(v) for m, v in GRAPH.items()}
    fake["core.solver"].add("trainer.callback")
    assert upward("core.solver", fake) == ["trainer.callback"]
    circle = {m: set(v) for m, v in GRAPH.items()}
    circle["files.fs"].add("files.state")  # files.state already imports files.fs
    assert "files.fs" in GRAPH["files.state"]
    (cycle,) = find_cycles(circle)  # the one cycle the added import makes (directly, or through files.checkpoints)
    assert cycle[0] == cycle[-1] and {"files.state", "files.fs"} <= set(cycle), cycle
    assert not upward("core.solver", GRAPH) and not find_cycles(GRAPH)
    assert "trajectory.tiers" in GRAPH["trajectory.plan"]  # the plan measures memory through the tiers...
    assert "trajectory.plan" not in GRAPH["trajectory.tiers"]  # ...and the tiers never import the plan (was a cycle)

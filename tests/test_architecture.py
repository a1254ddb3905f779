"""The package's import graph: no cycles, nothing imports upward, no companion import hidden in a function.

Layers (docs/architecture.md has the picture): a module may import modules of its own layer or below, never above.
The walk reads the source with ``ast`` (nothing is imported), so a new cycle or upward import fails here with the
offending line, before it can surprise anyone at run time.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "companion"

# Bottom to top. Within a layer, imports are allowed as long as they form no cycle.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),                                             # what may go wrong
    ("device", "assets", "samplers", "taxonomy"),            # where things run and live; the sampler registry
    ("schedules", "data", "speed"),                          # noise levels, data sets, speed options for a network
    ("nets", "features", "oracle", "provenance", "caching", "token_merging"),  # other networks; exact scores; what produced a result; feature caching; token merging
    ("models", "pipelines", "random_pipelines"),             # the diffusion-model interface and the one loader; pipelines (and random ones)
    ("denoiser",),                                           # the one guided network call and the run record
    ("sampling",),                                           # diffusers' scheduler loop: sample(), cascade()
    ("sde", "partial", "reference", "quantise"),             # other chains; reference solutions; int8 networks
    ("metrics",),                                            # quality with intervals
    ("calibration",),                                        # metrics checked on populations with known answers
    ("bench", "sharding", "design", "orders", "verdicts", "text_to_image"),  # sweeps (over ranks too), costs, measured orders; rules stated before a run; real models side by side
    ("train", "distill", "quality", "flows", "recipes", "quicktrain"),  # training and what it records on the cards; rectified flow; training in seconds
    ("plots", "report", "exercises", "offline", "implement", "diagrams", "book"),  # figures, images and tables for readers; self-checks; offline views; implement-it graders; drawn diagrams; the static site
    ("widgets",),                                            # the panels
    ("cli", "__init__", "__main__"),                         # entry points
]
LAYER = {m: i for i, mods in enumerate(LAYERS) for m in mods}


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported companion module, line, inside a function) for every relative import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            inner = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                names = [child.module.split(".")[0]] if child.module else [a.name for a in child.names]
                found.extend((n, child.lineno, in_func) for n in names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("companion"):
                parts = child.module.split(".")
                names = [parts[1]] if len(parts) > 1 else [a.name for a in child.names]
                found.extend((n, child.lineno, in_func) for n in names)
            visit(child, inner)

    visit(tree, False)
    return found


def test_every_module_has_a_layer():
    missing = sorted(set(_modules()) - set(LAYER))
    assert not missing, f"modules without a layer in tests/test_architecture.py (and docs/architecture.md): {missing}"


def test_nothing_imports_upward():
    bad = []
    for name, path in _modules().items():
        for target, line, _ in _imports(path):
            if target in LAYER and name in LAYER and LAYER[target] > LAYER[name]:
                bad.append(f"companion/{name}.py:{line} imports {target} (layer {LAYER[target]} > {LAYER[name]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_companion_import_inside_a_function():
    bad = [f"companion/{name}.py:{line} imports {target} inside a function"
           for name, path in _modules().items() for target, line, in_func in _imports(path)
           if in_func and target in LAYER and name not in ("__init__",)]
    assert not bad, "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: {t for t, _, _ in _imports(path) if t in mods and t != name} for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_import_graph_has_no_cycle():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


@pytest.mark.parametrize("source, expected", [
    ("from . import models\n", [("models", 1, False)]),
    ("def f():\n    from .sampling import sample\n", [("sampling", 2, True)]),
    ("from companion.metrics import fd\n", [("metrics", 1, False)]),
])
def test_the_import_walker_sees_every_form(tmp_path, source, expected):
    p = tmp_path / "m.py"
    p.write_text(source)
    assert _imports(p) == expected

"""Imports only go down the layers of DESIGN.md, and no two packages import each other in a circle.

Every `import within...` / `from within... import` in within/ counts, including the ones inside
functions: a lazy import is still a dependency (the cycle models -> pipeline -> postfit -> models
ran through one).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "within"
# lowest first; a module may import its own package and anything on a lower layer
LAYERS = [
    {"calibration", "features", "privacy"},
    {"nn", "data", "monitoring"},
    {"models", "lit"},
    {"postfit", "explain"},
    {"pipeline"},
    {"predictor", "serve"},  # the user facade that can train, and the HTTP service
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def unit(module: str) -> str:
    """The layer unit of a dotted module name: within.<unit>...; the package root is 'within'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "within"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def within_imports(path: Path) -> set[str]:
    """The within modules `path` imports, anywhere in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "within"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "within":
                out.add(base)
    return out


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): within_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Upward imports (by layer) and imports of a package no layer names."""
    bad = []
    for mod, targets in graph.items():
        src = unit(mod)
        if src == "within":  # the root only names public classes lazily, by string
            continue
        if src not in LEVEL:
            bad.append(f"{mod}: within.{src} is on no layer of DESIGN.md; add it to LAYERS")
            continue
        for target in sorted(targets):
            dst = unit(target)
            if dst == src:
                continue
            if dst not in LEVEL:
                bad.append(f"{mod} imports {target}, which is on no layer")
            elif LEVEL[dst] > LEVEL[src]:
                bad.append(f"{mod} (layer {LEVEL[src]}: {src}) imports {target} (layer {LEVEL[dst]}: {dst}): upward")
    return bad


def package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between packages (within.a -> within.b -> ... -> within.a)."""
    edges: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        edges.setdefault(unit(mod), set()).update(unit(t) for t in targets if unit(t) != unit(mod))
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    return cycles


def test_imports_only_go_down_the_layers():
    bad = violations(import_graph())
    assert not bad, "imports against DESIGN.md's layers:\n" + "\n".join(bad)


def test_no_two_packages_import_each_other_in_a_circle():
    cycles = package_cycles(import_graph())
    assert not cycles, "package import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("graph, found", [
    ({"within.models.network": {"within.pipeline.train"}}, "upward"),      # a model importing the pipeline
    ({"within.features.spec": {"within.nn.encoders"}}, "upward"),           # features importing nn
    ({"within.gadgets.x": {"within.features.spec"}}, "on no layer"),
])
def test_the_checker_catches_an_upward_import(graph, found):
    assert any(found in v for v in violations(graph))


def test_the_checker_catches_a_cycle():
    graph = {"within.models.a": {"within.lit.b"}, "within.lit.b": {"within.models.c"}}
    assert package_cycles(graph) == [["lit", "models", "lit"]] or package_cycles(graph) == [["models", "lit", "models"]]


def test_relative_imports_resolve(tmp_path):
    import within

    assert "within.models.base" in within_imports(Path(within.__file__).parent / "models" / "network.py")

"""The library's import graph: no cycles, nothing outside twig_jax/, layers in one direction, and no
private names imported across modules (read from the source with ast; nothing is imported)."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = os.path.join(ROOT, "twig_jax")

# Each package may import its own modules and those of lower rank only.
RANK = {"assets": 0, "progress": 0, "files": 0, "model": 1, "data": 1, "parallel": 1, "twig": 2, "convert": 2, "decode": 3,
        "pipeline": 4, "eval": 5, "train": 5, "bench": 4.5, "cli": 6}
OUTSIDE = ("infer", "train", "research", "tests", "scripts")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def source_files(top: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs if f.endswith(".py"))


def imports_of(path: str) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import statement, at any depth (lazy imports count)."""
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


def library_graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in source_files(LIBRARY)}
    graph = {}
    for mod, path in mods.items():
        deps = set()
        for target, names in imports_of(path):
            if not target.startswith("twig_jax"):
                continue
            # `from twig_jax.x import y` names module twig_jax.x.y when that is a module
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            deps.update(subs or [target])
        graph[mod] = {d for d in deps if d in mods and d != mod}
    return graph


def package_of(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_library_has_no_import_cycle():
    assert find_cycle(library_graph()) is None


def test_library_imports_nothing_outside_itself():
    bad = [(module_name(p), t) for p in source_files(LIBRARY) for t, _ in imports_of(p)
           if t.split(".")[0] in OUTSIDE]
    assert bad == []


def test_layers_import_downwards():
    graph = library_graph()
    assert set(map(package_of, graph)) - {"__init__"} <= set(RANK), "a new package needs a rank"
    bad = [(m, d) for m, deps in graph.items() for d in deps
           if package_of(m) != package_of(d) and RANK.get(package_of(d), 99) >= RANK.get(package_of(m), -1)]
    assert bad == []


@pytest.mark.parametrize("top", ["twig_jax", "research", "infer", "train"])
def test_no_private_names_imported_across_modules(top):
    bad = [(module_name(p), t, n) for p in source_files(os.path.join(ROOT, top)) for t, names in imports_of(p)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == []

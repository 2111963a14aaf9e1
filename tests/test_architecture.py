"""The package's shape, checked from the source: imports run one way, no private name crosses
modules, no function grows past 100 lines.

The import graph is built from every ``import`` statement in ``bunny/`` (module level AND inside
functions: a lazy import still ties two modules together, it only hides the tie) parsed with
``ast``. Nodes are modules (``bunny/model/loading.py`` -> ``bunny.model.loading``; a package is its
``__init__``). ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``.
The implicit "a module's parent package is imported first" is not an edge: a package ``__init__``
may import its own parts (discovery, re-exports), and the parts then import siblings (``.base``),
never the package name, so each package reads bottom to top.

Covered: every module of ``bunny/`` must be on no import cycle, and so does the private-name check.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "bunny"
COVERED = ("bunny",)
LONG_FUNCTION_SCOPE = ("bunny",)
MAX_FUNCTION_LINES = 100


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """``(target module, imported names, line)`` for every bunny import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "bunny":
                    out.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "bunny":
                continue
            names = [a.name for a in node.names]
            sub = [f"{source}.{n}" for n in names if f"{source}.{n}" in modules]
            if sub and len(sub) == len(names):
                out += [(s, [], node.lineno) for s in sub]
            else:
                out.append((source, [n for n in names if f"{source}.{n}" not in modules], node.lineno))
                out += [(s, [], node.lineno) for s in sub]
    return out


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, _ in imports_of(name, path, modules):
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def covered(name: str, scope: tuple[str, ...] = COVERED) -> bool:
    return any(name == p or name.startswith(p + ".") for p in scope)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_edges_include_function_level_and_submodule_imports(tmp_path):
    modules = all_modules()
    edges = {t for t, _, _ in imports_of("bunny.model.loading", modules["bunny.model.loading"], modules)}
    assert "bunny.model.layouts" in edges  # from bunny.model.layouts import ...
    edges = {t for t, _, _ in imports_of("bunny.model.cli_export", modules["bunny.model.cli_export"], modules)}
    assert "bunny.model.loading" in edges  # imported inside run()


def test_no_import_cycle_in_covered_packages():
    bad = [c for c in cycles(import_graph()) if any(covered(m) for m in c)]
    assert not bad, "import cycles: " + "; ".join(" <-> ".join(c) for c in bad)


def test_no_private_name_imported_across_modules():
    modules = all_modules()
    bad = []
    for name, path in modules.items():  # the whole package
        for target, names, line in imports_of(name, path, modules):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != name:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: from {target} import {', '.join(private)}")
    assert not bad, "\n".join(bad)


def test_no_function_over_100_lines():
    long = []
    for name, path in all_modules().items():
        if not covered(name, LONG_FUNCTION_SCOPE):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {node.name} ({lines} lines)")
    assert not long, "\n".join(long)


#: the layers of bunny.model, bottom (0) to top, as docs/architecture.md draws them
MODEL_LAYERS = [
    ["files", "hub", "gguf"],
    ["vision", "vision.base", "vision.s2", "vision.clip", "vision.siglip", "vision.eva_clip", "projectors",
     "language", "minicpm", "attention", "fused", "lora_dropout"],
    ["modeling", "processing"],
    ["special_tokens", "generation"],
    ["finish"],
    ["assemble", "tiny"],
    ["layouts", "layouts.base", "layouts.weights", "layouts.ours", "layouts.lora", "layouts.original",
     "layouts.llava"],
    ["loading"],
    ["cli_export"],
]


def test_model_imports_run_down_the_layers():
    graph = import_graph()
    level = {f"bunny.model.{m}": k for k, layer in enumerate(MODEL_LAYERS) for m in layer}
    level["bunny.model"] = 0  # the package __init__: registration only
    unplaced = sorted(m for m in graph if m.startswith("bunny.model.") and m not in level)
    assert not unplaced, f"place these modules in a layer (and in the picture): {unplaced}"
    upward = [f"{m} (layer {level[m]}) imports {t} (layer {level[t]})"
              for m in level for t in graph.get(m, ()) if t in level and level[t] > level[m]
              and m != "bunny.model"]
    assert not upward, "\n".join(upward)

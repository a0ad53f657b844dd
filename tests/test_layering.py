"""The layering the design promises: no import circle among persample's modules, lazy imports included;
the value type (stats.py) and the error types depend on nothing above them."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "persample"


def _graph() -> dict[str, set[str]]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
            graph[module] |= {t for t in (submodules or [base]) if t in mods and t != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(n):
        index[n] = low[n] = counter[0]
        counter[0] += 1
        stack.append(n)
        on.add(n)
        for w in graph[n]:
            if w not in index:
                visit(w)
                low[n] = min(low[n], low[w])
            elif w in on:
                low[n] = min(low[n], index[w])
        if low[n] == index[n]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == n:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for n in graph:
        if n not in index:
            visit(n)
    return found


def test_no_import_circle_lazy_imports_included():
    assert _cycles(_graph()) == []


def test_the_value_type_and_the_errors_depend_on_nothing_above_them():
    graph = _graph()
    assert graph["persample.errors"] == set()
    assert graph["persample.stats"] <= {"persample._sharding"}
    assert graph["persample._sharding"] <= {"persample.errors", "persample.contract"}
    assert graph["persample.contract"] == {"persample.errors"}

"""The house's structure: no module of gfo/ or models/ imports one that imports it back (directly or
through others; imports inside functions count), and gfo/'s top level stays a dozen modules."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in ("gfo", "models"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the modules of gfo/ and models/ it names in an `import` or `from … import` anywhere."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in map(resolve, targets) if t is not None}
        graph[module] = deps - {module}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert {"models.hf", "models.gguf"} <= graph["models.pretrained"]  # the graph is read (a known edge)

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return seen

    assert [m for m in sorted(graph) if m in reaches(m)] == []


def test_gfo_top_level_holds_at_most_a_dozen_modules():
    top = sorted(p.stem for p in (ROOT / "gfo").glob("*.py"))
    assert len(top) <= 12, top
    assert {"optim", "run", "tasks"} <= {p.name for p in (ROOT / "gfo").iterdir() if p.is_dir()}

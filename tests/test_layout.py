"""The library's shape: imports go one way (no cycles), modules stay readable, the README maps every package."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "course_lib"
MAX_LINES = 330          # "~300": a module a student reads top to bottom


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The course_lib modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("course_lib"):
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("course_lib"))
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = sorted(LIB.rglob("*.py"))
    modules = {_module(p) for p in paths}
    return {_module(p): _imports(p, modules) - {_module(p)} for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if not state.get(nxt) and (cycle := visit(nxt, stack)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (cycle := visit(node, [])):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    assert find_cycle(import_graph()) is None


def test_lower_layers_never_import_upper_ones():
    """Data flows one way: model -> ONNX -> precision -> TensorRT -> backends -> pipeline -> toy -> serve -> bench
    -> homework -> CLI (env, files, timing, samples and score, the metrics, are the ground floor everything may use)."""
    layers = [("course_lib.cnsd", "course_lib.yolov5"), ("course_lib.onnx",), ("course_lib.precision",),
              ("course_lib.trt",), ("course_lib.backends",), ("course_lib.pipeline",), ("course_lib.toy",),
              ("course_lib.serve",), ("course_lib.bench",), ("course_lib.homework",),
              ("course_lib.cli", "course_lib.__main__")]

    def layer(module: str) -> int | None:
        for i, prefixes in enumerate(layers):
            if any(module == p or module.startswith(p + ".") for p in prefixes):
                return i
        return None                                         # env, files, timing, samples: the ground floor

    upward = [(m, d) for m, deps in import_graph().items() for d in deps
              if layer(m) is not None and layer(d) is not None and layer(d) > layer(m)]
    ground = [(m, d) for m, deps in import_graph().items() for d in deps if layer(m) is None and layer(d) is not None]
    assert upward == [] and ground == []


def test_modules_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in LIB.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_readme_maps_every_package():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Repository map"):]
    packages = sorted(p.parent.name for p in LIB.glob("*/__init__.py"))
    assert [p for p in packages if not re.search(rf"\b{p}/", section)] == []

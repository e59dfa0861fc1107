"""course_lib uses only TensorRT 10/11 Python API names (chapter 2's rule), checked statically.

The same checks as the shared tool ``check_trt_names.py``, written here so the test runs anywhere:
an attribute removed in TensorRT 10.0/11.0 used outside a hasattr/getattr feature guard, and a
``trt.<Name>`` that TensorRT 11.1's bindings do not define (``tests/data/trt11_api_names.txt``).
Strings and comments may mention removed names (the TRT 8 -> 10 table does).

Then: every TensorRT attribute and method course_lib/trt calls, resolved on the real module of each
installed flavour (``tensorrt`` and/or ``tensorrt_rtx``) by introspection.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRT11_NAMES = set((Path(__file__).parent / "data" / "trt11_api_names.txt").read_text().split())
REMOVED = {
    "max_workspace_size", "build_engine", "num_bindings", "get_binding_shape", "get_binding_dtype",
    "get_binding_name", "get_binding_index", "binding_is_input", "set_binding_shape", "get_binding_format",
    "execute_async_v2", "EXPLICIT_BATCH", "platform_has_fast_fp16", "platform_has_fast_int8",
    "platform_has_tf32", "int8_calibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator",
    "IInt8EntropyCalibrator", "IInt8LegacyCalibrator", "set_dynamic_range", "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS", "create_execution_context_without_device_memory", "get_profile_shape",
    "FP16", "INT8", "BF16", "FP8", "set_calibration_profile", "set_quantization_flag",
}


def _guarded(tree: ast.AST) -> set[str]:
    """Names used as the second argument of hasattr/getattr: a feature check makes them legal."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
            if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                out.add(node.args[1].value)
    return out


def _trt_aliases(tree: ast.AST) -> set[str]:
    """``import tensorrt as X`` and ``X = f("tensorrt")`` bind X; ``trt`` always counts."""
    aliases = {"trt"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "tensorrt"}
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and node.value.args:
            first = node.value.args[0]
            if isinstance(first, ast.Constant) and first.value == "tensorrt":
                aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return aliases


def trt_name_problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    guarded, aliases = _guarded(tree), _trt_aliases(tree)
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or node.attr in guarded:
            continue
        if node.attr in REMOVED:
            problems.append(f"{path}:{node.lineno}: removed TensorRT API {node.attr!r} used without a feature guard")
        if isinstance(node.value, ast.Name) and node.value.id in aliases and node.attr not in TRT11_NAMES:
            problems.append(f"{path}:{node.lineno}: '{node.value.id}.{node.attr}' is not in the TensorRT 11 API")
    return problems


def test_course_lib_uses_only_trt11_names():
    files = sorted((ROOT / "course_lib").rglob("*.py"))
    assert any(f.parent.name == "trt" for f in files), "course_lib/trt is missing"
    problems = [p for f in files for p in trt_name_problems(f)]
    assert problems == [], "\n".join(problems)


def test_planted_bad_usage_is_reported(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import tensorrt as trt\n"
        "config.max_workspace_size = 1 << 30\n"
        "engine = builder.build_engine(network, config)\n"
        "ctx.execute_async_v2(bindings, stream)\n"
        "config.set_flag(trt.BuilderFlag.FP16)\n"
        "flag = trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH\n"
        "x = trt.NotARealName\n"
        "note = 'strings may say build_engine and max_workspace_size'\n"
    )
    problems = "\n".join(trt_name_problems(bad))
    for name in ("max_workspace_size", "build_engine", "execute_async_v2", "FP16", "EXPLICIT_BATCH",
                 "trt.NotARealName"):
        assert name in problems
    assert ":8:" not in problems  # the string on line 8 is fine
    assert len(problems.splitlines()) == 6


def test_feature_guard_and_aliases(tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text(
        "import tensorrt as tensor_rt\n"
        "if hasattr(tensor_rt.BuilderFlag, 'FP16'):\n"
        "    config.set_flag(tensor_rt.BuilderFlag.FP16)\n"
        "pool = tensor_rt.MemoryPoolType.WORKSPACE\n"
    )
    assert trt_name_problems(ok) == []
    aliased = tmp_path / "aliased.py"
    aliased.write_text("t = importlib.import_module('tensorrt')\nt.Builder(logger)\nt.IInt8Calibrator\n")
    assert len(trt_name_problems(aliased)) == 1  # IInt8Calibrator is not in the TRT 11 list


# --- every TensorRT name the project calls resolves on the real installed module -------------------
#
# Collected from the AST of course_lib/trt/*.py: ``trt.X`` (and ``trt.X.Y``), ``getattr(obj, "name")``,
# and every attribute used on a TensorRT object. An object's class is found by following the code:
# ``trt.Builder(...)`` is a Builder, ``builder.create_network(...)`` returns what the real binding's
# signature says (``-> ...INetworkDefinition``), and so on. A function parameter has no assignment to
# follow: its name says its class (RECEIVERS, the course's naming convention). Each use is then looked up
# with hasattr on the real class of whichever flavour is installed; a name it lacks must belong to a
# feature that course_lib.trt.flavour reports missing for that flavour (and the code checks first).

RECEIVERS = {"builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser", "config": "IBuilderConfig",
             "runtime": "Runtime", "engine": "ICudaEngine", "context": "IExecutionContext",
             "runtime_config": "IRuntimeConfig", "error": "ParserError"}


def _returns(trt, owner, method: str):
    """The class a method returns, from the pybind11 signature in its docstring (None when not a TensorRT class)."""
    doc = getattr(getattr(owner, method, None), "__doc__", None) or ""
    match = re.search(r"->\s*([\w.:]+)", doc)
    name = re.split(r"\.|::", match.group(1))[-1] if match else ""
    for candidate in (name, name[1:] if name.startswith("I") else ""):   # C++ nvonnxparser::IParserError -> ParserError
        if candidate and isinstance(getattr(trt, candidate, None), type):
            return getattr(trt, candidate)
    return None


class _Uses(ast.NodeVisitor):
    """Attribute uses on the TensorRT module and on TensorRT objects: (owner object, name, line)."""

    def __init__(self, trt):
        self.trt, self.types, self.uses = trt, {}, []
        self.conventional = {name: getattr(trt, cls) for name, cls in RECEIVERS.items()}

    @staticmethod
    def key(node) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return f"self.{node.attr}"
        return None

    def type_of(self, node, record: bool = True):
        """The real TensorRT object (module, class, enum) an expression stands for, or None."""
        if isinstance(node, ast.Name) and node.id == "trt":
            return self.trt
        key = self.key(node)
        if key in self.types:
            return self.types[key]
        if key in self.conventional:
            return self.conventional[key]
        if isinstance(node, ast.Attribute):
            owner = self.type_of(node.value, record)
            if owner is None:
                return None
            if record:
                self.uses.append((owner, node.attr, node.lineno))
            value = getattr(owner, node.attr, None)
            return value if owner is self.trt or isinstance(value, type) else None
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                owner = self.type_of(node.args[0], record)
                if owner is not None and len(node.args) == 2:
                    if record:
                        self.uses.append((owner, node.args[1].value, node.lineno))
                    return getattr(owner, node.args[1].value, None)
                return None
            if isinstance(node.func, ast.Attribute):
                owner = self.type_of(node.func.value, record)
                if owner is self.trt:
                    if record:
                        self.uses.append((owner, node.func.attr, node.lineno))
                    value = getattr(owner, node.func.attr, None)
                    return value if isinstance(value, type) else None    # trt.Builder(...) is a Builder
                if owner is not None:
                    if record:
                        self.uses.append((owner, node.func.attr, node.lineno))
                    return _returns(self.trt, owner, node.func.attr)
        return None

    def learn(self, tree) -> None:
        """Types of assigned names (to a fixed point); a name never assigned keeps its conventional class."""
        assigns = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and len(n.targets) == 1]
        for _ in range(4):
            for node in assigns:
                key = self.key(node.targets[0])
                if key is not None and key not in self.types:
                    found = self.type_of(node.value, record=False)
                    if found is not None and found is not self.trt:
                        self.types[key] = found
        for node in assigns:                              # assigned something else (e.g. course_lib's Engine):
            key = self.key(node.targets[0])               # not a TensorRT object, whatever its name says
            if key is not None:
                self.types.setdefault(key, None)

    def generic_visit(self, node):
        if isinstance(node, (ast.Attribute, ast.Call)):
            self.type_of(node)                            # a chain seen again from inside: the same (owner, name, line)
        super().generic_visit(node)


def trt_uses(path: Path, trt) -> list[tuple[str, str, int, bool]]:
    """``(owner name, attribute, line, exists)`` for every TensorRT name ``path`` uses."""
    tree = ast.parse(path.read_text(), str(path))
    visitor = _Uses(trt)
    visitor.learn(tree)
    visitor.visit(tree)
    out = []
    for owner, attr, line in visitor.uses:
        owner_name = "trt" if owner is trt else getattr(owner, "__name__", str(owner))
        out.append((owner_name, attr, line, hasattr(owner, attr)))
    return sorted(set(out), key=lambda u: (u[2], u[0], u[1]))


def _installed_flavours():
    from course_lib.env import has_module

    return [name for name in ("tensorrt", "tensorrt_rtx") if has_module(name)]


def _gated(trt, owner: str, attr: str) -> str | None:
    """The feature of course_lib.trt.flavour that lists this name and is missing here (the code checks it)."""
    from course_lib.trt.flavour import FEATURES, has_feature

    for feature, spec in FEATURES.items():
        names = {n for n in spec.needs} | {n.split(".")[-1] for n in spec.needs if "." not in n}
        if (f"{owner}.{attr}" in names or (owner == "trt" and attr in names)) and not has_feature(trt, feature):
            return feature
    return None


@pytest.mark.parametrize("flavour", _installed_flavours() or ["none"])
def test_every_tensorrt_name_the_project_calls_exists(flavour):
    if flavour == "none":
        pytest.fail("neither tensorrt nor tensorrt_rtx is installed: the dev extra installs tensorrt-rtx")
    from course_lib.trt.flavour import load

    trt = load(flavour)
    files = sorted((ROOT / "course_lib" / "trt").glob("*.py"))
    uses = {f.name: trt_uses(f, trt) for f in files}
    checked = {(o, a) for us in uses.values() for o, a, _, _ in us}
    for expected in (("Builder", "build_serialized_network"), ("IBuilderConfig", "set_memory_pool_limit"),
                     ("OnnxParser", "parse_from_file"), ("ICudaEngine", "create_execution_context"),
                     ("IExecutionContext", "execute_async_v3"), ("IExecutionContext", "set_tensor_address"),
                     ("Runtime", "deserialize_cuda_engine"), ("IRuntimeConfig", "create_runtime_cache"),
                     ("IRuntimeCache", "serialize"), ("ParserError", "node_operator"), ("trt", "ILogger")):
        assert expected in checked, f"the collector missed {expected}: it would check nothing"
    missing = [f"course_lib/trt/{name}:{line}: {owner}.{attr}" for name, us in uses.items()
               for owner, attr, line, ok in us if not ok and not _gated(trt, owner, attr)]
    assert len(checked) > 60 and missing == [], "\n".join(missing)


def test_the_collector_catches_a_misspelt_method(tmp_path):
    from course_lib.trt.flavour import load

    flavours = _installed_flavours()
    if not flavours:
        pytest.skip("no TensorRT flavour installed")
    trt = load(flavours[0])
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def build(trt, logger, path):\n"
        "    builder = trt.Builder(logger)\n"
        "    network = builder.create_network(0)\n"
        "    cfg = builder.create_builder_config()\n"
        "    cfg.set_memory_pool_limt(trt.MemoryPoolType.WORKSPACE, 1)\n"
        "    network.num_layers_total\n"
        "    return builder.build_serialized_network(network, cfg), trt.NoSuchThing\n")
    problems = {(o, a) for o, a, _, ok in trt_uses(bad, trt) if not ok}
    assert problems == {("IBuilderConfig", "set_memory_pool_limt"), ("INetworkDefinition", "num_layers_total"),
                        ("trt", "NoSuchThing")}

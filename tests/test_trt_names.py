"""course_lib uses only TensorRT 10/11 Python API names (chapter 2's rule), checked statically.

The same checks as the shared tool ``check_trt_names.py``, written here so the test runs anywhere:
an attribute removed in TensorRT 10.0/11.0 used outside a hasattr/getattr feature guard, and a
``trt.<Name>`` that TensorRT 11.1's bindings do not define (``tests/data/trt11_api_names.txt``).
Strings and comments may mention removed names (the TRT 8 -> 10 table does).
"""
from __future__ import annotations

import ast
from pathlib import Path

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

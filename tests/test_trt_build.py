"""The builder's pure parts and its behaviour without TensorRT (chapter 2), on CPU.

Real builds: test_trt_builds.py (TensorRT for RTX, on the CPU) and test_trt_engine_gpu.py (a GPU).
"""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from course_lib.env import MissingDependency
from course_lib.trt import require_tensorrt
from course_lib.trt.build import TRT8_TO_TRT10, build_engine_plan, build_plans, migration_table, onnx_precision
from course_lib.trt.network import parser_error_line


def _onnx(path, dtype=np.float32):
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    x = helper.make_tensor_value_info("x", elem, [1, 4])
    y = helper.make_tensor_value_info("y", elem, [1, 4])
    node = helper.make_node("Add", ["x", "b"], ["y"])
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(np.ones(4, dtype), "b")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_migration_table_covers_the_removed_calls():
    old = " ".join(o for o, _ in TRT8_TO_TRT10)
    for name in ("max_workspace_size", "build_engine", "EXPLICIT_BATCH", "BuilderFlag.FP16", "execute_async_v2",
                 "binding_is_input", "set_binding_shape", "get_binding_shape", "without_device_memory",
                 "platform_has_fast_fp16", "int8_calibrator", "set_dynamic_range"):
        assert name in old, name
    table = migration_table()
    assert table.splitlines()[0].startswith("TensorRT 8") and "set_memory_pool_limit" in table
    assert len(table.splitlines()) == len(TRT8_TO_TRT10) + 1


def test_parser_errors_are_one_line_naming_node_and_op():
    msg = parser_error_line([("act", "NotARealOp", "No importer\nregistered"), ("", "", "bad graph")], "d/m.onnx",
                            "TensorRT 10.13.3.9")
    assert msg == ("TensorRT 10.13.3.9 cannot parse m.onnx: node 'act' (op NotARealOp): No importer registered "
                   "(and 1 more error(s))")
    assert "node '?' (op ?)" in parser_error_line([("", "", "x")], "m.onnx")
    assert "gave no reason" in parser_error_line([], "m.onnx")


def test_onnx_precision(tmp_path):
    assert onnx_precision(_onnx(tmp_path / "a.onnx")) == "float32"
    assert onnx_precision(_onnx(tmp_path / "b.onnx", np.float16)) == "float16"


def test_without_tensorrt_building_says_what_to_install(tmp_path, monkeypatch):
    for name in ("tensorrt", "tensorrt_rtx"):        # None in sys.modules: Python's way to make an import fail
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependency) as info:
        build_engine_plan(_onnx(tmp_path / "a.onnx"), tmp_path / "a.plan", {})
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("neither tensorrt nor tensorrt_rtx is installed for building")
    assert "pip install tensorrt-cu13" in msg and "pip install tensorrt-rtx" in msg
    with pytest.raises(MissingDependency):
        require_tensorrt()
    assert not (tmp_path / "a.plan").exists()


def test_build_errors_before_tensorrt_is_needed(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        build_engine_plan(tmp_path / "missing.onnx", tmp_path / "a.plan", {})
    with pytest.raises(ValueError, match="opt_level 7"):
        build_engine_plan(_onnx(tmp_path / "a.onnx"), tmp_path / "a.plan", {}, opt_level=7)
    with pytest.raises(FileNotFoundError, match="unet.onnx"):
        build_plans(tmp_path / "empty", tmp_path / "plans")
    with pytest.raises(ValueError, match="'fast'"):
        build_plans(tmp_path, tmp_path / "plans", profile="fast")

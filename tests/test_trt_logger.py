"""TensorRT's log through Python logging (chapter 2): the level mapping, and the real ILogger subclass.

The subclass is made from whichever TensorRT flavour is installed (CI: TensorRT for RTX, on the CPU).
"""
from __future__ import annotations

import logging
import sys

import pytest

from course_lib.env import MissingDependency, has_module
from course_lib.trt.logger import get_logger, make_logger, python_level, severity_value


def test_severities_map_to_python_levels():
    assert [python_level(v) for v in range(5)] == [
        logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG]
    assert [severity_value(n) for n in ("internal_error", "error", "Warning", "INFO", "verbose")] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="expected 0..4"):
        python_level(5)
    with pytest.raises(ValueError, match="'loud'"):
        severity_value("loud")


def test_without_tensorrt_the_logger_says_what_to_install(monkeypatch):
    for name in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependency, match="neither tensorrt nor tensorrt_rtx is installed.*tensorrt-rtx"):
        make_logger()


@pytest.mark.skipif(not (has_module("tensorrt") or has_module("tensorrt_rtx")), reason="no TensorRT flavour installed")
def test_the_real_parser_logs_through_python(caplog, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from course_lib.trt import require_tensorrt

    trt = require_tensorrt()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "r.onnx"))
    logger = make_logger("info")
    assert isinstance(logger, trt.ILogger) and get_logger(trt=trt) is get_logger()
    with caplog.at_level(logging.DEBUG, logger="course_lib.trt"):
        network = trt.Builder(logger).create_network(0)
        assert trt.OnnxParser(network, logger).parse_from_file(str(tmp_path / "r.onnx"))
    assert any(r.name == "course_lib.trt" and r.message.startswith("[TensorRT] Input filename") for r in caplog.records)
